"""The traffic counters of ``bench.traffic`` against hand counts: Triton loads and stores under the
interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``), aten ops under the dispatch mode, and
the per-case counts of the loss."""

import json

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import gkl_kernels
from bench.cases import CIFAR100_ADV, IMAGENET, PER_ROW, TEACHER, Case, make_inputs
from bench.traffic import (LAUNCH_LATENCY_SECONDS, PASSES, DispatchCounter, KernelTraffic,
                           OpTraffic, TritonTrafficCounter, count_case, format_traffic_table,
                           modelled_h100_seconds, run_traffic, traffic_cases)

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


def test_dispatch_counter_descends_into_the_package_custom_ops():
    case = Case("teacher", 4, 50, TEACHER, IMAGENET)
    student, teacher, kwargs = make_inputs(case)
    with DispatchCounter() as counter:
        loss = gkl_kernels.gkl_loss(student, teacher, backend="torch", **kwargs)
    per_op = counter.per_op()
    assert not [name for name in per_op if name.startswith("gkl_kernels")]
    # rows of exponentials: the teacher factor and both softmaxes
    assert per_op["aten.exp_.default"].launches == 3
    with DispatchCounter() as backward:
        torch.autograd.grad(loss, [student])
    # the backward op scales the two directions the forward kept: no exponential
    backward_ops = backward.per_op()
    assert not [name for name in backward_ops if name.startswith("gkl_kernels")]
    assert "aten.exp_.default" not in backward_ops
    assert backward_ops["aten.mul.Tensor"].launches >= 2


def test_triton_path_counts_kernels_once_and_torch_ops_around_them():
    """The interpreter copies every tensor argument at a launch; those copies are not ops of the
    loss, so no torch op may move a whole ``B x C`` tensor on the Triton path."""
    case = Case("teacher", 4, 50, TEACHER, IMAGENET)
    student, teacher, kwargs = make_inputs(case)
    with TritonTrafficCounter() as kernels, DispatchCounter() as ops:
        gkl_kernels.gkl_loss(student, teacher, backend="triton", **kwargs)
    rows, logits = case.batch, student.nbytes
    # s and t, each row's first element again (the pivots); 7 float32 values per row written
    assert kernels.per_kernel == {
        "gkl_rank1_fwd_kernel": KernelTraffic(1, 2 * logits + 2 * 4 * rows, 7 * 4 * rows)}
    assert ops.launches > 0
    assert max(op.bytes_read + op.bytes_written for op in ops.ops) < logits


def test_rank_one_triton_moves_five_transfers_and_row_statistics():
    """Student gradient only: forward reads s, t; backward reads s, t and writes grad s. Per row
    the kernels also read the two pivots per pass and pass 7 float32 values from forward to
    backward (written, then read)."""
    case = Case("teacher", 8, 1000, TEACHER, IMAGENET)
    counted = count_case(case, "triton")
    transfer, rows = case.elements * 4, case.batch
    per_row = 4 * rows
    assert counted.forward.triton == KernelTraffic(1, 2 * transfer + 2 * per_row, 7 * per_row)
    assert counted.backward.triton == KernelTraffic(1, 2 * transfer + 9 * per_row, transfer)
    assert (counted.forward.floor_bytes, counted.backward.floor_bytes) == (
        2 * transfer, 3 * transfer)
    total = counted.total
    assert 5 * transfer == total.floor_bytes <= total.bytes
    assert total.triton.bytes == 5 * transfer + 18 * per_row
    # by argument: the B x C tensors 5 times plus the pivots' re-reads (the same addresses as
    # the first tile: distinct addresses give exactly 5 transfers), the row statistics 14 values
    assert total.category_bytes("B x C") == 5 * transfer + 4 * per_row
    assert total.category_bytes("B x C", unique=True) == 5 * transfer
    assert total.category_bytes("rows") == total.category_bytes("rows", unique=True) == \
        14 * per_row
    assert total.category_bytes("weights") == total.category_bytes("unknown") == 0
    assert total.torch.bytes < 0.02 * transfer  # row-sized ops around the kernels


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
