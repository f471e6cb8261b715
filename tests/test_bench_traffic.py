"""The bench's counts per case (``bench.traffic``): the traffic of each pass against hand counts,
the rows and table of part 4, the launches per step of ``python -m bench``'s cases at fewer rows,
and the modelled H100 step of part 3 (``tools.h100_model``) with the host times of part 2's
goal."""

import json

import pytest

from bench.cases import (CIFAR100_ADV, EXPLICIT, IMAGENET, PER_ROW, PRIOR, SHARED, TEACHER,
                         Case, make_inputs)
from bench.overhead import HOST_STEP_CASE
from bench.providers import KL_DIV, PACKAGE, PACKAGE_TRITON, make_passes, select_providers
from bench.traffic import (PASSES, STEP_COUNT_ELEMENTS, STEP_COUNT_ROWS, count_case,
                           count_modelled_step, count_provider_step, format_traffic_table,
                           run_steps, run_traffic, step_count_batch, traffic_cases)
from gkl_kernels.testing.dispatch import DispatchCounter
from gkl_kernels.testing.traffic import KernelTraffic
from tools.h100_model import LAUNCH_LATENCY_SECONDS, format_modelled_step, modelled_h100_seconds


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


def test_modelled_step_is_the_model_of_the_counted_step():
    case = Case("small prior", 16, 100, PRIOR, IMAGENET)
    step = count_modelled_step(case)
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
    # the host times of part 2's goal, at their own shape
    assert (step["host_batch"], step["host_classes"]) == (HOST_STEP_CASE.batch,
                                                          HOST_STEP_CASE.classes) == (32, 10)
    assert all(0 < row["host_seconds"] < 0.05 for row in step["steps"])
    lines = format_modelled_step(step).splitlines()
    assert len(lines) == 3 and "host" not in format_modelled_step(step)
    assert lines[0].startswith("modelled (not measured) H100 step at B=16 C=100 float32")
    assert f"= {step['ratio']:.2f}x (target: at most 0.3x: " in lines[0]
