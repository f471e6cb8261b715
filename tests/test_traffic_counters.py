"""The counters of ``gkl_kernels.testing`` against hand counts: Triton loads and stores under the
interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``), aten ops under the dispatch mode, the
kernels ``torch.compile`` generated, a step's launches per pass, and the stubbed launches."""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter

import gkl_kernels
from gkl_kernels.core.config import SOURCE_PRIOR
from gkl_kernels.options import GKLOptions
from gkl_kernels.row_ops import rank1_row_stats
from gkl_kernels.testing.dispatch import DispatchCounter, InductorKernelCounter, OpTraffic
from gkl_kernels.testing.launches import (PassLaunches, count_step, triton_launches_stubbed,
                                          value_checks_as_on_a_gpu)
from gkl_kernels.testing.traffic import KernelTraffic, TritonTrafficCounter
from reference import gkl_loss_reference
from tests.conftest import PAPER_SETTINGS, make_inputs

IMAGENET = PAPER_SETTINGS["imagenet_kd"]

BLOCK = 16
LENGTH = 37  # three programs, the last one with 5 active lanes of 16


@triton.jit
def copy_kernel(src_ptr, dst_ptr, n, src_stride, BLOCK: tl.constexpr):
    """``dst[i] = src[i * src_stride]`` for ``i < n``."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets * src_stride, mask=mask, other=0),
             mask=mask)


@triton.jit
def even_lanes_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """``dst[i] = src[i]`` for even ``i``, ``-1`` (the load's ``other``) for odd ``i``."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n
    values = tl.load(src_ptr + offsets, mask=in_range & (offsets % 2 == 0), other=-1.0)
    tl.store(dst_ptr + offsets, values, mask=in_range)


@triton.jit
def add_one_kernel(ptr, n, BLOCK: tl.constexpr):
    """``ptr[i] += 1`` atomically for ``i < n``."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(ptr + offsets, 1.0, mask=offsets < n)


@triton.jit
def add_first_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    """``dst[i] = src[i] + src[0]`` for ``i < n``: ``src[0]`` is read again by every program."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    values = tl.load(src_ptr + offsets, mask=mask, other=0.0) + tl.load(src_ptr)
    tl.store(dst_ptr + offsets, values, mask=mask)


def launch_copy(src, dst):
    """``dst[:] = src`` (1-D) with ``copy_kernel``: one launch."""
    copy_kernel[(triton.cdiv(dst.numel(), BLOCK),)](src, dst, dst.numel(), src.stride(0),
                                                      BLOCK=BLOCK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_copy_moves_two_bytes_per_byte_copied(dtype):
    src = torch.arange(LENGTH).to(dtype)
    dst = torch.zeros_like(src)
    with TritonTrafficCounter() as counter:
        launch_copy(src, dst)
        launch_copy(src, dst)
    copied = LENGTH * src.element_size()
    assert torch.equal(dst, src)
    assert (counter.bytes_read, counter.bytes_written, counter.launches) == (
        2 * copied, 2 * copied, 2)
    assert counter.per_kernel == {"copy_kernel": KernelTraffic(2, 2 * copied, 2 * copied)}


def test_strided_copy_reads_each_picked_element_once():
    base = torch.arange(3 * LENGTH, dtype=torch.float32)
    dst = torch.zeros(LENGTH)
    with TritonTrafficCounter() as counter:
        launch_copy(base[::3], dst)
    assert torch.equal(dst, base[::3])
    assert (counter.bytes_read, counter.bytes_written) == (4 * LENGTH, 4 * LENGTH)


def test_bytes_by_argument_and_distinct_addresses():
    """Each access is attributed to the launch argument it falls in; a re-read of an address
    within a launch counts in the requested bytes, not in the distinct ones."""
    src = torch.rand(LENGTH)
    dst = torch.zeros(LENGTH)
    names = {src.untyped_storage().data_ptr(): "src", dst.untyped_storage().data_ptr(): "dst"}
    programs = triton.cdiv(LENGTH, BLOCK)
    with TritonTrafficCounter(lambda t: names[t.untyped_storage().data_ptr()]) as counter:
        add_first_kernel[(programs,)](src, dst, LENGTH, BLOCK=BLOCK)
        add_first_kernel[(programs,)](src, dst, LENGTH, BLOCK=BLOCK)
    torch.testing.assert_close(dst, src + src[0])
    # per launch: src 37 elements and src[0] once per program (3), dst 37 elements written
    assert counter.per_category == {"src": KernelTraffic(0, 2 * 4 * (LENGTH + programs), 0),
                                    "dst": KernelTraffic(0, 0, 2 * 4 * LENGTH)}
    assert counter.unique_per_category == {"src": KernelTraffic(0, 2 * 4 * LENGTH, 0),
                                           "dst": KernelTraffic(0, 0, 2 * 4 * LENGTH)}


def test_masked_off_lanes_and_other_values_move_nothing():
    src = torch.arange(LENGTH, dtype=torch.float32)
    dst = torch.zeros(LENGTH)
    with TritonTrafficCounter() as counter:
        even_lanes_kernel[(triton.cdiv(LENGTH, BLOCK),)](src, dst, LENGTH, BLOCK=BLOCK)
    assert torch.equal(dst[::2], src[::2]) and bool((dst[1::2] == -1).all())
    assert (counter.bytes_read, counter.bytes_written, counter.launches) == (
        4 * (LENGTH + 1) // 2, 4 * LENGTH, 1)


def test_atomics_read_and_write_each_active_lane():
    values = torch.zeros(LENGTH)
    with TritonTrafficCounter() as counter:
        add_one_kernel[(triton.cdiv(LENGTH, BLOCK),)](values, LENGTH, BLOCK=BLOCK)
    assert bool((values == 1).all())
    assert (counter.bytes_read, counter.bytes_written) == (4 * LENGTH, 4 * LENGTH)


def interpreter_entry_points():
    """The interpreter's attributes that the counter wraps, as they are now."""
    builder = interpreter.InterpreterBuilder
    return {name: builder.__dict__.get(name) for name in dir(builder) if name.startswith("create_")
            } | {"launch": interpreter.GridExecutor.__call__}


def test_interpreter_is_restored_after_an_exception():
    before = interpreter_entry_points()
    with pytest.raises(ValueError), TritonTrafficCounter(), DispatchCounter():
        assert interpreter.InterpreterBuilder.create_masked_load is not before[
            "create_masked_load"]
        raise ValueError("inside the counters")
    assert interpreter_entry_points() == before
    src, dst = torch.ones(LENGTH), torch.zeros(LENGTH)
    counter = TritonTrafficCounter()
    launch_copy(src, dst)  # not counted: the counter is not active
    assert (counter.bytes_read, counter.launches) == (0, 0)


def test_dispatch_counter_matches_a_hand_count():
    x = torch.randn(4, 6)
    y = torch.randn(6, 4)
    with DispatchCounter() as counter:
        scaled = torch.exp(x.t() * 2.0) + y  # a transposed view: read in place, no copy
        scaled[:, :3].sum()  # a slice: 18 of the 24 elements
        x.detach()
        torch.empty(10)
    assert counter.ops == [OpTraffic("aten.mul.Tensor", 96, 96, False),
                           OpTraffic("aten.exp.default", 96, 96, False),
                           OpTraffic("aten.add.Tensor", 192, 96, False),
                           OpTraffic("aten.sum.dim_IntList", 72, 4, False)]
    assert (counter.launches, counter.bytes_read, counter.bytes_written) == (4, 456, 292)


def test_dispatch_counter_in_place_out_fill_copy_and_item():
    x = torch.randn(4, 6)
    out = torch.empty(4, 6)
    with DispatchCounter() as counter:
        x.mul_(3.0)  # reads and writes x
        torch.mul(x, x, out=out)  # writes out without reading it
        out.zero_()  # writes only
        x.t().contiguous()  # a copy: reads and writes
        x.contiguous()  # already contiguous: no kernel
        x[0, 0].item()  # one element to the host
    assert counter.ops == [OpTraffic("aten.mul_.Tensor", 96, 96, False),
                           OpTraffic("aten.mul.out", 192, 96, False),
                           OpTraffic("aten.zero_.default", 0, 96, False),
                           OpTraffic("aten.copy_.default", 96, 96, False),
                           OpTraffic("aten._local_scalar_dense.default", 4, 0, True)]
    assert counter.host_syncs == 1


def loss_inputs(batch, num_classes, source, generator):
    """``make_inputs`` with ImageNet's KD options and a student that needs gradients."""
    student, teacher, kwargs = make_inputs(batch, num_classes, source, generator)
    return student.requires_grad_(), teacher, {**kwargs, **IMAGENET}


def test_dispatch_counter_sees_the_torch_path_ops(generator):
    student, teacher, kwargs = loss_inputs(4, 50, "teacher", generator)
    with DispatchCounter() as counter:
        loss = gkl_kernels.gkl_loss(student, teacher, backend="torch", **kwargs)
    per_op = counter.per_op()
    assert not [name for name in per_op if name.startswith("gkl_kernels")]
    # rows of exponentials: both softmaxes, and the teacher weights' factor as a power of 2 (T2 =
    # T: the weights' normaliser is the teacher softmax's)
    assert IMAGENET["weight_temperature"] == IMAGENET["temperature"] != IMAGENET["gamma"]
    assert per_op["aten.exp_.default"].launches == 2
    assert per_op["aten.exp2_.default"].launches == 1
    with DispatchCounter() as backward:
        torch.autograd.grad(loss, [student])
    # the forward formed the gradient: the backward scales it, one product
    backward_ops = backward.per_op()
    assert not [name for name in backward_ops if name.startswith("gkl_kernels")]
    assert "aten.exp_.default" not in backward_ops
    assert backward_ops["aten.mul.Tensor"].launches == 1


def test_triton_path_counts_kernels_once_and_torch_ops_around_them(generator):
    """The interpreter copies every tensor argument at a launch; those copies are not ops of the
    loss, so no torch op may move a whole ``B x C`` tensor on the Triton path."""
    student, teacher, kwargs = loss_inputs(4, 50, "teacher", generator)
    with TritonTrafficCounter() as kernels, DispatchCounter() as ops:
        gkl_kernels.gkl_loss(student, teacher, backend="triton", **kwargs)
    rows, logits = student.shape[0], student.nbytes
    # the row kernel: s and t, 16 float32 statistics per row written; the finishing kernel: 14
    # of them read twice, the loss and 8 totals written
    assert kernels.per_kernel == {
        "row_stats_kernel": KernelTraffic(1, 2 * logits, 16 * 4 * rows),
        "finish_loss_kernel": KernelTraffic(1, 2 * 14 * 4 * rows, 4 + 8 * 4)}
    assert ops.launches == 0  # nothing around the kernels: the loss is finished in them


class OpNames(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction, launches", [("mean", 3), ("sum", 2), ("none", 2)])
def test_eager_triton_path_dispatches_no_custom_op(reduction, launches, generator):
    """In eager mode the Triton path launches its kernels from autograd functions: the custom
    ops (for ``torch.compile``) and their dispatch, host time a GPU step waits on, are not run;
    the recorder does see them when they are."""
    student, teacher, kwargs = loss_inputs(4, 50, "prior", generator)
    with TritonTrafficCounter() as kernels, OpNames() as ops:
        loss = gkl_kernels.gkl_loss(student, teacher, backend="triton", reduction=reduction,
                                    **kwargs)
        torch.autograd.grad(loss.sum(), [student])
    assert kernels.launches == launches
    assert not [name for name in ops.names if name.startswith("gkl_kernels")], ops.names
    config = GKLOptions(backend="triton").row_config(SOURCE_PRIOR, True, True)
    with OpNames() as ops:
        rank1_row_stats(student, teacher, kwargs["class_prior"], kwargs["labels"],
                        config.floats, config.ints)
    assert "gkl_kernels.rank1_row_stats.default" in ops.names


# ---- launches per step -----------------------------------------------------------------------

def step_of(loss_fn, student, teacher, kwargs):
    """``(forward, backward)`` of one training step of ``loss_fn``: the loss, then its gradient
    w.r.t. the student, after a warm-up step."""
    def forward():
        return loss_fn(student, teacher, **kwargs)

    def backward(loss):
        return torch.autograd.grad(loss, [student])
    backward(forward())
    return forward, backward


def kl_div(student, teacher):
    return F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1),
                    reduction="batchmean", log_target=True)


def test_count_step_of_an_eager_loss_matches_a_dispatch_counter_run(generator):
    """``count_step`` on an eager loss counts what a plain ``DispatchCounter`` counts, per pass:
    ``F.kl_div`` with both log-softmaxes, forward and backward."""
    student, teacher, _ = loss_inputs(16, 100, "teacher", generator)
    forward, backward = step_of(kl_div, student, teacher, {})
    counted = count_step(forward, backward)
    with DispatchCounter() as forward_ops:
        loss = forward()
    with DispatchCounter() as backward_ops:
        backward(loss)
    assert counted.forward == PassLaunches(forward_ops.launches, 0, 0, 0)
    assert counted.backward == PassLaunches(backward_ops.launches, 0, 0, 0)
    assert forward_ops.launches >= 3 and backward_ops.launches >= 2  # two log-softmaxes, the KL
    fields = counted.fields()
    assert (fields["forward_launches"], fields["backward_launches"], fields["launches"]) == (
        forward_ops.launches, backward_ops.launches, forward_ops.launches + backward_ops.launches)
    assert fields["host_syncs"] == 0


def test_count_step_counts_host_syncs_and_triton_launches(generator):
    """The Triton path under the interpreter, its value checks where a GPU has them (in the
    kernels): its kernels and the torch ops around them, as the two counters see them when run
    by hand; no host sync (on the interpreter's CPU tensors the checks would be host reads)."""
    student, teacher, kwargs = loss_inputs(8, 50, "prior", generator)
    loss_fn = gkl_kernels.gkl_loss
    with value_checks_as_on_a_gpu():
        counted = count_step(*step_of(loss_fn, student, teacher, {**kwargs, "backend": "triton"}))
        with TritonTrafficCounter() as kernels, DispatchCounter() as ops:
            loss = loss_fn(student, teacher, backend="triton", **kwargs)
    with TritonTrafficCounter() as backward_kernels, DispatchCounter() as backward_ops:
        torch.autograd.grad(loss, [student])
    assert counted.forward == PassLaunches(ops.launches, kernels.launches, 0, ops.host_syncs)
    assert counted.backward == PassLaunches(backward_ops.launches, backward_kernels.launches, 0,
                                            backward_ops.host_syncs)
    assert (kernels.launches, backward_kernels.launches) == (2, 1)
    assert counted.host_syncs == ops.host_syncs + backward_ops.host_syncs == 0
    with DispatchCounter() as checked:  # outside the context: the checks read on the host
        loss_fn(student, teacher, backend="triton", **kwargs)
    assert checked.host_syncs > 0


def test_compiled_code_is_counted_by_its_generated_kernels(generator):
    """Under a plain ``DispatchCounter`` Dynamo runs the compiled reference eagerly (every aten
    op of the reference); ``count_step`` counts the compiled graphs' own kernels instead (C++ on
    CPU), a handful, and leaves inductor's output code as it was."""
    student, teacher, kwargs = loss_inputs(8, 20, "teacher", generator)
    torch._dynamo.reset()
    forward, backward = step_of(torch.compile(gkl_loss_reference), student, teacher, kwargs)
    expected_loss = forward().detach()
    from torch._inductor.codecache import PyCodeCache
    before = [dict(vars(module)) for module in PyCodeCache.modules]
    counted = count_step(forward, backward)
    assert [dict(vars(module)) for module in PyCodeCache.modules] == before
    assert counted.forward.compiled >= 1 and counted.backward.compiled >= 1
    assert counted.forward.triton == counted.backward.triton == 0
    with InductorKernelCounter() as kernels:
        loss = forward()
    torch.testing.assert_close(loss.detach(), expected_loss)
    assert kernels.launches == counted.forward.compiled == sum(kernels.per_kernel.values())
    # last: after a call under a plain dispatch mode Dynamo skips the function for good
    with DispatchCounter() as eager:
        loss = forward()
    assert eager.launches > counted.forward.launches  # the fallback: the reference's ops
    torch.testing.assert_close(loss.detach(), expected_loss)


@triton.jit
def _fill_ones(out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.full((BLOCK,), 1.0, tl.float32), mask=offsets < n)


def test_stubbed_launches_run_nothing_and_are_restored():
    out = torch.zeros(8)
    with triton_launches_stubbed():
        _fill_ones[(1,)](out, 8, BLOCK=8)
    assert torch.equal(out, torch.zeros(8))
    _fill_ones[(1,)](out, 8, BLOCK=8)
    assert torch.equal(out, torch.ones(8))
