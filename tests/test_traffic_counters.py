"""The traffic counters of ``bench.traffic`` against hand counts: Triton loads and stores under the
interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``), aten ops under the dispatch mode, and
the per-case counts of the loss."""

import json

import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import interpreter

import gkl_kernels
from gkl_kernels.functional import row_config
from gkl_kernels.options import GKLOptions
from gkl_kernels.rank1.config import SOURCE_PRIOR
from gkl_kernels.rank1.op import rank1_loss
from bench.cases import (CIFAR100_ADV, EXPLICIT, IMAGENET, PER_ROW, PRIOR, SHARED, TEACHER,
                         Case, make_inputs)
from bench.providers import (KL_DIV, PACKAGE, PACKAGE_TRITON, REFERENCE_COMPILED, make_passes,
                             select_providers)
from bench.traffic import (HOST_STEPS, LAUNCH_LATENCY_SECONDS, PASSES, STEP_COUNT_ELEMENTS,
                           STEP_COUNT_ROWS, DispatchCounter, InductorKernelCounter, KernelTraffic,
                           OpTraffic, PassLaunches, TritonTrafficCounter, count_case,
                           count_provider_step, count_step, format_modelled_step,
                           format_traffic_table, modelled_h100_seconds, modelled_step, run_steps,
                           run_traffic, step_count_batch, traffic_cases, triton_launches_stubbed,
                           value_checks_as_on_a_gpu)

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


def test_dispatch_counter_sees_the_torch_path_ops():
    case = Case("teacher", 4, 50, TEACHER, IMAGENET)
    student, teacher, kwargs = make_inputs(case)
    with DispatchCounter() as counter:
        loss = gkl_kernels.gkl_loss(student, teacher, backend="torch", **kwargs)
    per_op = counter.per_op()
    assert not [name for name in per_op if name.startswith("gkl_kernels")]
    # rows of exponentials: both softmaxes and the teacher weights' factor (T2 = T: the
    # weights' normaliser is the teacher softmax's)
    assert IMAGENET["weight_temperature"] == IMAGENET["temperature"] != IMAGENET["gamma"]
    assert per_op["aten.exp_.default"].launches == 3
    with DispatchCounter() as backward:
        torch.autograd.grad(loss, [student])
    # the forward formed the gradient: the backward scales it, one product
    backward_ops = backward.per_op()
    assert not [name for name in backward_ops if name.startswith("gkl_kernels")]
    assert "aten.exp_.default" not in backward_ops
    assert backward_ops["aten.mul.Tensor"].launches == 1


def test_triton_path_counts_kernels_once_and_torch_ops_around_them():
    """The interpreter copies every tensor argument at a launch; those copies are not ops of the
    loss, so no torch op may move a whole ``B x C`` tensor on the Triton path."""
    case = Case("teacher", 4, 50, TEACHER, IMAGENET)
    student, teacher, kwargs = make_inputs(case)
    with TritonTrafficCounter() as kernels, DispatchCounter() as ops:
        gkl_kernels.gkl_loss(student, teacher, backend="triton", **kwargs)
    rows, logits = case.batch, student.nbytes
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
def test_eager_triton_path_dispatches_no_custom_op(reduction, launches):
    """In eager mode the Triton path launches its kernels from autograd functions: the custom
    ops (for ``torch.compile``) and their dispatch, host time a GPU step waits on, are not run;
    the recorder does see them when they are."""
    case = Case("prior", 4, 50, PRIOR, IMAGENET)
    student, teacher, kwargs = make_inputs(case)
    with TritonTrafficCounter() as kernels, OpNames() as ops:
        loss = gkl_kernels.gkl_loss(student, teacher, backend="triton", reduction=reduction,
                                    **kwargs)
        torch.autograd.grad(loss.sum(), [student])
    assert kernels.launches == launches
    assert not [name for name in ops.names if name.startswith("gkl_kernels")], ops.names
    config = row_config(GKLOptions(backend="triton"), SOURCE_PRIOR, True, True)
    with OpNames() as ops:
        rank1_loss(student, teacher, kwargs["class_prior"], kwargs["labels"], config.floats,
                   config.ints, False)
    assert "gkl_kernels.rank1_loss.default" in ops.names


def test_rank_one_triton_moves_five_transfers_and_row_statistics():
    """Student gradient only: forward reads s, t; backward reads s, t and writes grad s: 5
    transfers, each element once. Per row: 16 float32 statistics written forward, 14 of them
    read twice by the finishing kernel and once by the backward kernel with 3 totals and the
    incoming gradient."""
    case = Case("teacher", 8, 1000, TEACHER, IMAGENET)
    counted = count_case(case, "triton")
    transfer, rows = case.elements * 4, case.batch
    per_row = 4 * rows
    finished = 4 + 8 * 4  # the loss and the totals
    assert counted.forward.triton == KernelTraffic(2, 2 * transfer + 28 * per_row,
                                                   16 * per_row + finished)
    assert counted.backward.triton == KernelTraffic(1, 2 * transfer + 18 * per_row, transfer)
    assert (counted.forward.floor_bytes, counted.backward.floor_bytes) == (
        2 * transfer, 3 * transfer)
    total = counted.total
    assert 5 * transfer == total.floor_bytes <= total.bytes
    assert total.triton.bytes == 5 * transfer + 62 * per_row + finished
    assert total.category_bytes("B x C") == total.category_bytes("B x C", unique=True) == \
        5 * transfer
    assert total.category_bytes("rows") == 62 * per_row + finished
    assert total.category_bytes("weights") == total.category_bytes("unknown") == 0
    assert total.torch.bytes <= 4  # autograd's own: the incoming gradient of the loss


def test_per_row_weights_are_counted_each_pass():
    case = Case("adv per-row", 4, 16, PER_ROW, CIFAR100_ADV, adversarial=True)
    counted = count_case(case, "triton")
    assert counted.weight_bytes == 4 * 16 * 16 * 4
    assert counted.forward.triton.bytes_read >= counted.weight_bytes
    assert counted.backward.triton.bytes_read >= counted.weight_bytes
    # the (B, C, C) weight tensor is streamed exactly once per pass
    for traffic in (counted.forward, counted.backward):
        assert traffic.category_bytes("weights") == counted.weight_bytes
    assert counted.backward.floor_bytes == 4 * counted.transfer_bytes  # both gradients


def test_modelled_time():
    assert modelled_h100_seconds(3.35e12, 0) == pytest.approx(1.0)
    assert modelled_h100_seconds(0, 3) == pytest.approx(3 * LAUNCH_LATENCY_SECONDS)


def test_quick_run_rows_and_table():
    rows = run_traffic(quick=True, progress=lambda line: None)
    assert len(rows) == 3 * len(traffic_cases(quick=True))
    assert [row["backend"] for row in rows[:3]] == ["triton", "torch", "F.kl_div"]
    pass_keys = {"triton_bytes_read", "triton_bytes_written", "torch_bytes_read",
                 "torch_bytes_written", "bytes", "bytes_per_element", "transfers",
                 "triton_transfers", "torch_transfers", "floor_bytes", "floor_transfers",
                 "triton_launches", "torch_launches", "launches", "host_syncs",
                 "modelled_h100_seconds", "triton_kernels", "top_torch_ops",
                 "triton_bxc_transfers", "triton_bxc_unique_transfers",
                 "triton_row_bytes_per_row", "triton_weight_bytes", "triton_unattributed_bytes"}
    for row in rows:
        assert {"case", "shape", "dtype", "backend", "weight_bytes", "model", *PASSES} <= set(row)
        assert all(set(row[name]) == pass_keys for name in PASSES)
        assert row["total"]["transfers"] >= row["total"]["floor_transfers"] > 0
        assert (row["total"]["triton_launches"] > 0) == (row["backend"] == "triton")
        assert row["model"]["launch_latency_seconds"] == LAUNCH_LATENCY_SECONDS
    json.dumps(rows)
    table = format_traffic_table(rows).splitlines()
    assert len(table) == len(rows) + 2 and table[0].startswith("case")


# ---- launches per step (python -m bench's launch columns, part 3's modelled step) ------------

def kl_div_passes(case):
    student, teacher, kwargs = make_inputs(case)
    return make_passes(select_providers([KL_DIV])[0].build(), student, teacher, kwargs)


def test_count_step_of_kl_div_matches_a_dispatch_counter_run():
    """``count_step`` on an eager loss counts what a plain ``DispatchCounter`` counts, per pass:
    ``F.kl_div`` with both log-softmaxes, forward and backward."""
    case = Case("prior", 16, 100, PRIOR, IMAGENET)
    passes = kl_div_passes(case)
    passes.step()
    counted = count_step(passes)
    with DispatchCounter() as forward:
        loss = passes.forward()
    with DispatchCounter() as backward:
        passes.backward(loss)
    assert counted.forward == PassLaunches(forward.launches, 0, 0, 0)
    assert counted.backward == PassLaunches(backward.launches, 0, 0, 0)
    assert forward.launches >= 3 and backward.launches >= 2  # two log-softmaxes and the KL
    fields = counted.fields()
    assert (fields["forward_launches"], fields["backward_launches"], fields["launches"]) == (
        forward.launches, backward.launches, forward.launches + backward.launches)
    assert fields["host_syncs"] == 0


def test_count_step_counts_host_syncs_and_triton_launches():
    """The Triton path under the interpreter, its value checks where a GPU has them (in the
    kernels): its kernels and the torch ops around them, as the two counters see them when run
    by hand; no host sync (on the interpreter's CPU tensors the checks would be host reads)."""
    case = Case("prior", 8, 50, PRIOR, IMAGENET)
    counted = count_provider_step(case, PACKAGE_TRITON)
    student, teacher, kwargs = make_inputs(case)
    with value_checks_as_on_a_gpu(), TritonTrafficCounter() as kernels, \
            DispatchCounter() as ops:
        loss = gkl_kernels.gkl_loss(student, teacher, backend="triton", **kwargs)
    with TritonTrafficCounter() as backward_kernels, DispatchCounter() as backward_ops:
        torch.autograd.grad(loss, [student])
    assert counted.forward == PassLaunches(ops.launches, kernels.launches, 0, ops.host_syncs)
    assert counted.backward == PassLaunches(backward_ops.launches, backward_kernels.launches, 0,
                                            backward_ops.host_syncs)
    assert (kernels.launches, backward_kernels.launches) == (2, 1)
    assert counted.host_syncs == ops.host_syncs + backward_ops.host_syncs == 0


def test_compiled_code_is_counted_by_its_generated_kernels():
    """Under a plain ``DispatchCounter`` Dynamo runs the compiled reference eagerly (every aten
    op of the reference); ``count_step`` counts the compiled graphs' own kernels instead (C++ on
    CPU), a handful, and leaves inductor's output code as it was."""
    case = Case("teacher", 8, 20, TEACHER, IMAGENET)
    student, teacher, kwargs = make_inputs(case)
    passes = make_passes(select_providers([REFERENCE_COMPILED])[0].build(), student, teacher,
                         kwargs)
    expected_loss, _ = passes.step()  # compiles
    from torch._inductor.codecache import PyCodeCache
    before = [dict(vars(module)) for module in PyCodeCache.modules]
    counted = count_step(passes)
    assert [dict(vars(module)) for module in PyCodeCache.modules] == before
    assert counted.forward.compiled >= 1 and counted.backward.compiled >= 1
    assert counted.forward.triton == counted.backward.triton == 0
    with InductorKernelCounter() as kernels:
        loss = passes.forward()
    torch.testing.assert_close(loss.detach(), expected_loss)
    assert kernels.launches == counted.forward.compiled == sum(kernels.per_kernel.values())
    # last: after a call under a plain dispatch mode Dynamo skips the function for good
    with DispatchCounter() as eager:
        loss = passes.forward()
    assert eager.launches > counted.forward.launches  # the fallback: the reference's ops
    torch.testing.assert_close(loss.detach(), expected_loss)


@pytest.mark.parametrize("provider", [PACKAGE_TRITON, PACKAGE])
@pytest.mark.parametrize("weights", [PRIOR, TEACHER, EXPLICIT, SHARED, PER_ROW])
def test_launches_do_not_depend_on_the_batch(provider, weights):
    """What ``step_count_batch`` relies on: the same launches and host syncs at 2 rows as at 24
    (C kept), for every weight source."""
    case = Case(weights, 24, 64, weights, CIFAR100_ADV, adversarial=weights == PER_ROW)
    assert count_provider_step(case, provider, batch=2) == count_provider_step(case, provider)


def test_step_count_batch():
    assert step_count_batch(Case("small", 4, 100, TEACHER, IMAGENET)) == 4
    assert step_count_batch(Case("small", 32, 100, TEACHER, IMAGENET)) == STEP_COUNT_ROWS
    assert step_count_batch(Case("imagenet", 256, 1000, PRIOR, IMAGENET)) == \
        STEP_COUNT_ELEMENTS // 1000 < STEP_COUNT_ROWS
    assert step_count_batch(Case("vocabulary", 64, 262144, TEACHER, IMAGENET)) == 2


def test_run_steps_rows():
    cases = [Case("teacher", 4, 30, TEACHER, IMAGENET),
             Case("adv per-row", 4, 16, PER_ROW, CIFAR100_ADV, adversarial=True)]
    lines = []
    rows = run_steps(cases, [PACKAGE_TRITON, KL_DIV], progress=lines.append)
    assert [(row["case"], row["provider"]) for row in rows] == [
        (case.name, name) for case in cases for name in (PACKAGE_TRITON, KL_DIV)]
    for row, line in zip(rows, lines):
        assert row["batch"] == 4
        assert row["launches"] == row["forward_launches"] + row["backward_launches"]
        assert row["host_syncs"] == row["forward_host_syncs"] + row["backward_host_syncs"]
        kinds = row["launch_kinds"]
        assert row["forward_launches"] == sum(kinds["forward"].values())
        assert (kinds["forward"]["triton"] > 0) == (row["provider"] == PACKAGE_TRITON)
        assert f"fwd {row['forward_launches']} + bwd {row['backward_launches']} launches, " \
               f"{row['host_syncs']} syncs" in line
    json.dumps(rows)


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


def test_modelled_step_is_the_model_of_the_counted_step():
    case = Case("small prior", 16, 100, PRIOR, IMAGENET)
    step = modelled_step(case)
    package, kl_div = step["steps"]
    assert (package["provider"], kl_div["provider"]) == (PACKAGE_TRITON, KL_DIV)
    for counted, row in ((count_case(case, "triton"), package),
                         (count_case(case, "F.kl_div"), kl_div)):
        total = counted.total
        assert (row["bytes"], row["launches"]) == (total.bytes, total.launches)
        assert row["launches"] == row["forward_launches"] + row["backward_launches"]
        assert row["modelled_seconds"] == modelled_h100_seconds(total.bytes, total.launches)
    assert step["ratio"] == pytest.approx(package["modelled_seconds"] / kl_div["modelled_seconds"])
    assert step["met"] == (step["ratio"] <= step["target"] == 0.3)
    # F.kl_div's launches as a plain DispatchCounter counts them
    passes = kl_div_passes(case)
    with DispatchCounter() as forward:
        loss = passes.forward()
    with DispatchCounter() as backward:
        passes.backward(loss)
    assert kl_div["launches"] == forward.launches + backward.launches
    assert (step["host_batch"], step["host_classes"]) == (32, 10)
    assert all(0 < row["host_seconds"] < 0.05 for row in step["steps"])
    host_line = format_modelled_step(step).splitlines()[-1]
    assert host_line.startswith(f"  host time of one step, measured on this CPU at B=32 C=10 "
                                f"(median of {HOST_STEPS} steps): {PACKAGE_TRITON} ")
    line = format_modelled_step(step).splitlines()[0]
    assert line.startswith("modelled (not measured) H100 step at B=16 C=100 float32")
    assert f"= {step['ratio']:.2f}x (target: at most 0.3x: " in line
