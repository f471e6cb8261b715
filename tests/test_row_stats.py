"""The rank-one row statistics: one merge rule for tiles, column splits and shards, the same
statistics on both backends, and the launch / host-sync budget of a training step."""

import math

import pytest
import torch

from gkl_kernels import functional, gkl_loss
from gkl_kernels.core.config import (SOURCE_EXPLICIT, SOURCE_PRIOR, SOURCE_TEACHER, STAT_ERROR,
                                     STAT_KEPT, STAT_ZS, STAT_ZT, RowConfig)
from gkl_kernels.rank1.torch_impl import finish_rows_torch, merge_row_stats, row_sum
from gkl_kernels.row_ops import rank1_finish, rank1_row_stats
from gkl_kernels.testing.dispatch import DispatchCounter
from gkl_kernels.testing.traffic import TritonTrafficCounter
from tests.conftest import make_inputs

SOURCES = {"teacher": SOURCE_TEACHER, "prior": SOURCE_PRIOR, "explicit": SOURCE_EXPLICIT}
OPTIONS = dict(gamma=0.6, temperature=2.0, weight_temperature=3.0, mse_weight=0.5, ce_weight=1.0)
MASK = -1e9


def _case(source, generator, batch=4, num_classes=40):
    student, teacher, kwargs = make_inputs(batch, num_classes, source, generator)
    # masked columns (vocabulary padding) near the split points used below
    for column in (0, 15, 16, 29):
        student[:, column] = teacher[:, column] = MASK
    student[1, 5] = teacher[1, 5] = float("-inf")
    factor = kwargs.get("class_prior", kwargs.get("weights"))
    return student, teacher, factor, kwargs.get("labels")


def _config(source, use_triton, block_c=0, **changes):
    return RowConfig(source=SOURCES[source], **OPTIONS, has_labels=source == "prior",
                     use_triton=use_triton, block_c=block_c, **changes)


def _stats(student, teacher, factor, labels, config, columns=slice(None)):
    """Row statistics of the logit columns ``columns`` (the factor's columns with them)."""
    if factor is not None:
        factor = factor[:, columns]
    return rank1_row_stats(student[:, columns], teacher[:, columns], factor, labels,
                           config.floats, config.ints)


def _finished(stats, config):
    """What the statistics determine: per-row (E, wmse', ce), the loss and the totals."""
    loss, totals = rank1_finish(stats, config.floats, config.ints)
    return (*finish_rows_torch(stats, config), loss, totals[:6])


def _assert_same(actual, expected, rtol=2e-6):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item() + 1e-30)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("block_c", [16, 32])
def test_one_tile_and_many_tiles_agree(source, block_c, generator):
    student, teacher, factor, labels = _case(source, generator)
    whole = _config(source, True)
    tiled = _config(source, True, block_c=block_c)
    _assert_same(_finished(_stats(student, teacher, factor, labels, tiled), tiled),
                 _finished(_stats(student, teacher, factor, labels, whole), whole))


@pytest.mark.parametrize("source", SOURCES)
def test_torch_backend_computes_the_same_statistics(source, generator):
    student, teacher, factor, labels = _case(source, generator)
    on_triton, on_torch = _config(source, True, block_c=16), _config(source, False)
    _assert_same(_finished(_stats(student, teacher, factor, labels, on_torch), on_torch),
                 _finished(_stats(student, teacher, factor, labels, on_triton), on_triton))


def _merged_parts(student, teacher, factor, labels, config, splits):
    """The statistics of the column parts between ``splits``, merged left to right."""
    bounds = [0, *splits, student.shape[1]]
    parts = [_stats(student, teacher, factor, labels, config, slice(a, b))
             for a, b in zip(bounds[:-1], bounds[1:])]
    merged = parts[0]
    for part in parts[1:]:
        merged = merge_row_stats(merged, part, config)
    return merged


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("splits", [(1,), (16,), (17,), (39,), (10, 30), (15, 16, 29)])
def test_merge_of_column_parts_equals_the_whole_row(source, splits, use_triton, generator):
    """Any split point, masked columns on either side of it, two to four parts."""
    student, teacher, factor, labels = _case(source, generator)
    if source == "prior":  # a prior's columns are the classes: split the (C, C) matrix's columns
        factor = factor.index_select(0, labels)
        labels = None
        source = "explicit"
    config = _config(source, use_triton)
    merged = _merged_parts(student, teacher, factor, labels, config, splits)
    _assert_same(_finished(merged, config),
                 _finished(_stats(student, teacher, factor, labels, config), config))


def test_merge_is_associative_up_to_rounding(generator):
    student, teacher, factor, labels = _case("teacher", generator)
    config = _config("teacher", False)
    a, b, c = (_stats(student, teacher, None, None, config, cols)
               for cols in (slice(0, 7), slice(7, 23), slice(23, None)))
    left = merge_row_stats(merge_row_stats(a, b, config), c, config)
    right = merge_row_stats(a, merge_row_stats(b, c, config), config)
    _assert_same(_finished(left, config), _finished(right, config))


def _softmax_terms64(x, temperature):
    """``(e, z - 1)``: ``e_j = exp((x_j - m) / T)`` in float64 of the float32 differences
    ``x_j - m`` (rounded as in any float32 evaluation: ``|x_j - m| / T`` units of ``exp``) and per
    row their sum less 1, summed without the maximal term (the rows have one)."""
    difference = x - x.amax(dim=1, keepdim=True)
    e = (difference.double() / temperature).exp()
    return e, e.masked_fill(difference == 0, 0.0).sum(dim=1)


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("splits", [(), (20,), (7, 23)])
def test_merged_normalisers_stay_exact_near_one(splits, use_triton, generator):
    """Peaked rows (logits ``30 N(0, 1)``; rows 0 and 1 with a logit 80 and 40 above the others):
    ``z = 1 + x`` with ``x`` from 1e-17 up, all of which ``1 + x`` in float32 loses below 6e-8. The
    statistics hold the rests ``z - 1``: whole rows, tiles of 16 (Triton) and column parts merged
    keep them, and the rows' cross-entropies, to float32 precision (against float64)."""
    temperature = 2.0
    teacher = 30.0 * torch.randn(6, 40, generator=generator)
    teacher[:2, 25] = teacher[:2].amax(dim=1) + torch.tensor([80.0, 40.0])
    student = teacher + torch.randn(6, 40, generator=generator)
    config = RowConfig(source=SOURCE_TEACHER, temperature=temperature, use_triton=use_triton,
                       block_c=16 if use_triton else 0)
    merged = _merged_parts(student, teacher, None, None, config, splits)
    (_, rest_s), (e_t, rest_t) = (_softmax_terms64(x, temperature) for x in (student, teacher))
    assert rest_s.min() < 1e-15 and rest_s.max() > 1e-3
    for column, rest in ((STAT_ZS, rest_s), (STAT_ZT, rest_t)):
        torch.testing.assert_close(merged[:, column].double().log1p(), rest.log1p(), rtol=1e-6,
                                   atol=0.0)
    # CE = sum_j p_j (m_s - s_j) / T + log z_s
    shortfall = (student.amax(dim=1, keepdim=True) - student).double()
    ce = (e_t * shortfall).sum(dim=1) / (temperature * (1.0 + rest_t)) + rest_s.log1p()
    torch.testing.assert_close(finish_rows_torch(merged, config)[2].double(), ce, rtol=1e-6,
                               atol=0.0)


@pytest.mark.parametrize("use_triton", [True, False])
def test_ignored_rows_are_empty_and_marked(use_triton, generator):
    student, teacher, factor, labels = _case("prior", generator)
    labels = labels.clone()
    labels[2] = -100
    student[2] = float("nan")
    stats = _stats(student, teacher, factor, labels, _config("prior", use_triton))
    assert stats[:, STAT_KEPT].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert torch.isfinite(stats[2, :13]).logical_or(stats[2, :13] == float("-inf")).all()
    assert stats[:, STAT_ERROR].eq(0).all()


@pytest.mark.parametrize("use_triton", [True, False])
def test_bad_labels_are_flagged_in_the_statistics(use_triton, generator):
    """What the compiled finishing kernel asserts on (device-side, no host sync)."""
    student, teacher, factor, labels = _case("prior", generator)
    labels = labels.clone()
    labels[1] = 40  # == C: out of range
    flags = _stats(student, teacher, factor, labels, _config("prior", use_triton))[:, STAT_ERROR]
    assert flags.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_bad_weights_are_flagged_by_the_row_kernel(generator):
    """(The torch path's weights are checked before it runs: host or device-side assertions.)"""
    student, teacher, _, _ = _case("explicit", generator)
    weights = torch.rand(4, 40, generator=generator)
    weights[3, 7] = -1.0
    weights[0, 2] = float("nan")
    flags = _stats(student, teacher, weights, None, _config("explicit", True))[:, STAT_ERROR]
    assert flags.tolist() == [2.0, 0.0, 0.0, 2.0]


# ----------------------------------------------------------------------- launches and host syncs

BUDGET_CASES = [("teacher", False), ("prior", False), ("explicit", False), ("teacher", True),
                ("prior", True), ("explicit", True)]


def _counted(fn):
    """``(launches, host syncs)`` of ``fn()``: aten kernels plus Triton launches."""
    with DispatchCounter() as ops, TritonTrafficCounter() as triton_launches:
        out = fn()
    return ops.launches + triton_launches.launches, ops.host_syncs, out


@pytest.mark.newest_triton
@pytest.mark.parametrize("source, with_ignored", BUDGET_CASES)
def test_triton_step_launches_and_host_syncs(source, with_ignored, generator, monkeypatch):
    """Default options, as on a GPU (where the kernels check values): 2 launches forward, 1
    backward, no host synchronisation."""
    monkeypatch.setattr(functional, "kernels_check_values", lambda use_triton, device: use_triton)
    student, teacher, kwargs = make_inputs(6, 30, source, generator)
    if with_ignored:
        kwargs["labels"] = torch.randint(0, 30, (6,), generator=generator)
        kwargs["labels"][[1, 4]] = -100
    student.requires_grad_()
    grad = torch.ones(())
    launches, syncs, loss = _counted(lambda: gkl_loss(student, teacher, backend="triton",
                                                      **kwargs))
    assert (launches, syncs) == (2, 0)
    launches, syncs, _ = _counted(lambda: loss.backward(grad))
    assert (launches, syncs) == (1, 0)
    assert torch.isfinite(student.grad).all()


@pytest.mark.torch_only
@pytest.mark.parametrize("columns", (32000, 32001))
def test_row_sums_under_torch_compile_are_as_exact_as_eager(columns, generator):
    """``row_sum`` of ``exp(x - max x)`` compiled by inductor (which otherwise fuses the maximum
    and the sum into one pass, rescaling the partial sums as the maximum grows: about 3e-6
    relative error on these rows) sums in parts: as exact as eager PyTorch."""
    x = 4 * torch.randn(4, columns, generator=generator)
    x[0, 7] = math.nan

    def normalisers(y, ignore_nan):
        return row_sum((y - y.amax(dim=1, keepdim=True)).exp(), ignore_nan)

    for ignore_nan in (False, True):
        exact = normalisers(x.double(), ignore_nan)
        got = torch.compile(normalisers, dynamic=False)(x, ignore_nan)
        # a NaN maximum makes every term NaN: the row's sum NaN, or 0 without them
        torch.testing.assert_close(got[0], exact[0].float(), equal_nan=True)
        error = ((got[1:].double() - exact[1:]).abs() / exact[1:]).max().item()
        assert error < 5e-7, (ignore_nan, error)
