"""The row ops of the loss: one implementation per backend x weight family, picked from one table
per backend (``TORCH_ROW_OPS``, ``triton_row_ops()``: triton imported at its first use), and the ``torch.library`` custom ops that wrap the same bodies under
``torch.compile`` (``opcheck`` and ``fullgraph=True`` included).

- ``statistics(inputs, config)``: the per-row statistics ``(B, NUM_STATS)``
  (``core/config.py``) and, on the plain-PyTorch path when asked, the two ``(B, C)`` gradient
  directions ``softmax(s/T) - softmax(t/T)`` and ``v' (d - mu)`` (empty otherwise: the
  backward recomputes them);
- ``finish(stats, config)``: the 0-dim loss and the batch totals ``(NUM_TOTALS,)``;
- ``loss_and_statistics``: both, in one call where the backend fuses them (pair weights under
  Triton: the pair kernel's column parts, finished by the core's finishing kernel);
- ``gradients(grad, state, config, need_ds, need_dt)``: ``(ds, dt)`` from a ``RowState``.

The custom ops: ``gkl_kernels::rank1_row_stats``, ``gkl_kernels::rank1_finish`` and
``gkl_kernels::rank1_loss_backward``; they take the config as ``RowConfig.floats`` / ``.ints``.
In eager mode the bodies run without the ops' dispatch (host time a GPU step waits on).
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from gkl_kernels.buffers import fake_gradients
from gkl_kernels.core.config import (NUM_STATS, NUM_TOTALS, SOURCE_JSD, SOURCE_PAIRS,
                                     WMSE_SOURCES, RowConfig, compute_dtype)
from gkl_kernels.jsd.torch_impl import jsd_gradients_torch, jsd_row_stats_torch
from gkl_kernels.pairs.torch_impl import pair_loss_stats_torch
from gkl_kernels.rank1.torch_impl import finish_loss_torch, loss_backward_torch, row_stats_torch


class RowInputs(NamedTuple):
    """The row op's tensors: ``(B, C)`` logits, the weight factor (``(B, C)``, a ``(C, C)`` prior
    or pair weights; None for teacher weights; for the generalized JSD's KL sums over a
    vocabulary shard the whole rows' normalisers ``(B, NUM_STATS)``) and the ``(B,)`` labels (or
    None)."""

    student: Tensor
    teacher: Tensor
    factor: Optional[Tensor]
    labels: Optional[Tensor]


class RowState(NamedTuple):
    """What a backward needs: the inputs, their statistics and the batch totals, and the kept
    gradient directions (None or empty: recomputed from the inputs and statistics)."""

    inputs: RowInputs
    stats: Tensor
    totals: Tensor
    softmax_difference: Optional[Tensor] = None
    weighted_deviation: Optional[Tensor] = None


@dataclass(frozen=True)
class RowOps:
    """One backend x weight family (or divergence): ``statistics(inputs, config, keep) -> (stats,
    q - p, v' (d - mu))``, ``finish(stats, config) -> (loss, totals)``, ``fused(*inputs, config)
    -> (loss, stats, totals)`` or None, ``gradients(grad, state, config, need_ds, need_dt)``."""

    statistics: Callable
    finish: Callable
    fused: Optional[Callable]
    gradients: Callable
    keeps_directions: bool = False  # statistics can keep the gradient's directions


def _without_directions(stats):
    return stats, None, None


def _directions(state):
    """The kept directions of a ``RowState``, empty tensors where there are none."""
    return tuple(state.stats.new_empty(0) if direction is None else direction
                 for direction in (state.softmax_difference, state.weighted_deviation))


def _gradients_torch(grad, state, config, need_ds, need_dt):
    return loss_backward_torch(grad, *state.inputs, state.stats, state.totals, config, need_ds,
                               need_dt, *_directions(state))


def _gradients_torch_pairs(grad, state, config, need_ds, need_dt):
    if not _directions(state)[1].numel():  # pair weights' directions: formed again
        _, softmax_difference, weighted_deviation = pair_loss_stats_torch(*state.inputs, config,
                                                                          True)
        state = state._replace(softmax_difference=softmax_difference,
                               weighted_deviation=weighted_deviation)
    return _gradients_torch(grad, state, config, need_ds, need_dt)


TORCH_ROW_OPS = {  # family -> RowOps of the plain-PyTorch path
    "rank1": RowOps(
        statistics=lambda inputs, config, keep: row_stats_torch(*inputs, config, keep),
        finish=finish_loss_torch, fused=None, gradients=_gradients_torch, keeps_directions=True),
    "pairs": RowOps(
        statistics=lambda inputs, config, keep: pair_loss_stats_torch(*inputs, config, keep),
        finish=finish_loss_torch, fused=None, gradients=_gradients_torch_pairs,
        keeps_directions=True),
    "jsd": RowOps(
        statistics=lambda inputs, config, keep: _without_directions(
            jsd_row_stats_torch(inputs.student, inputs.teacher, inputs.labels, config,
                                given=inputs.factor)),
        finish=finish_loss_torch, fused=None,
        gradients=lambda grad, state, config, need_ds, need_dt: jsd_gradients_torch(
            grad, *state.inputs[:2], state.stats, state.totals, config, need_ds)),
}


@lru_cache(maxsize=None)
def triton_row_ops():
    """family -> RowOps of the Triton kernels; triton is imported here, at the first Triton row
    op (it is optional: the plain-PyTorch path runs without it)."""
    from gkl_kernels.core.kernels import finish_loss
    from gkl_kernels.jsd.kernels import jsd_backward, jsd_row_stats
    from gkl_kernels.pairs.launchers import pair_loss_backward_triton, pair_loss_triton
    from gkl_kernels.rank1 import kernels

    return {
        "rank1": RowOps(
            statistics=lambda inputs, config, keep: _without_directions(
                kernels.row_stats(*inputs, config)),
            finish=finish_loss, fused=None,
            gradients=lambda grad, state, config, need_ds, need_dt: kernels.loss_backward(
                grad, *state.inputs, state.stats, state.totals, config, need_ds, need_dt)),
        "pairs": RowOps(
            statistics=lambda inputs, config, keep: _without_directions(
                pair_loss_triton(*inputs, config)[1]),
            finish=finish_loss, fused=pair_loss_triton,
            gradients=lambda grad, state, config, need_ds, need_dt: pair_loss_backward_triton(
                grad, *state.inputs, state.stats, state.totals, config, need_ds, need_dt)),
        "jsd": RowOps(
            statistics=lambda inputs, config, keep: _without_directions(
                jsd_row_stats(inputs.student, inputs.teacher, inputs.labels, config,
                              inputs.factor)),
            finish=finish_loss, fused=None,
            gradients=lambda grad, state, config, need_ds, need_dt: jsd_backward(
                grad, *state.inputs[:2], state.stats, state.totals, config, need_ds)),
    }


def row_ops(config):
    """The ``RowOps`` of a ``RowConfig``: Triton (CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1``) or plain PyTorch; rank-one weights, pair weights or the generalized
    JSD."""
    family = "pairs" if config.source == SOURCE_PAIRS else \
        "jsd" if config.source == SOURCE_JSD else "rank1"
    return (triton_row_ops() if config.use_triton else TORCH_ROW_OPS)[family]


@lru_cache(maxsize=256)
def _config(floats, ints):
    return RowConfig.unpack(floats, ints)


def config_of(floats, ints):
    """The ``RowConfig`` of an op's ``floats``, ``ints`` arguments."""
    return _config(tuple(floats), tuple(ints))


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("gkl_kernels::rank1_row_stats", mutates_args=())
def rank1_row_stats(student: Tensor, teacher: Tensor, factor: Optional[Tensor],
                    labels: Optional[Tensor], floats: list[float], ints: list[int]) -> Tensor:
    """Per-row statistics ``(B, NUM_STATS)``, float32 (float64 for float64 logits)."""
    config = config_of(floats, ints)
    return row_ops(config).statistics(RowInputs(student, teacher, factor, labels), config,
                                      False)[0]


@rank1_row_stats.register_fake
def _row_stats_fake(student, teacher, factor, labels, floats, ints):
    return student.new_empty(student.shape[0], NUM_STATS, dtype=compute_dtype(student, teacher))


@torch.library.custom_op("gkl_kernels::rank1_finish", mutates_args=())
def rank1_finish(stats: Tensor, floats: list[float], ints: list[int]) -> tuple[Tensor, Tensor]:
    """``(loss (), totals (NUM_TOTALS,))`` in the statistics' dtype."""
    config = config_of(floats, ints)
    return row_ops(config).finish(stats, config)


@rank1_finish.register_fake
def _finish_fake(stats, floats, ints):
    return stats.new_empty(()), stats.new_empty(NUM_TOTALS)


@torch.library.custom_op("gkl_kernels::rank1_loss_backward", mutates_args=())
def rank1_loss_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                        factor: Optional[Tensor], labels: Optional[Tensor], stats: Tensor,
                        totals: Tensor, softmax_difference: Tensor, weighted_deviation: Tensor,
                        floats: list[float], ints: list[int], need_ds: bool, need_dt: bool
                        ) -> tuple[Tensor, Tensor]:
    """Gradients of the loss w.r.t. student and teacher (empty when not needed), scaled by
    ``grad_loss`` (0-dim, or one per row); one kernel on the Triton path."""
    config = config_of(floats, ints)
    state = RowState(RowInputs(student, teacher, factor, labels), stats, totals,
                     softmax_difference, weighted_deviation)
    return row_ops(config).gradients(grad_loss, state, config, need_ds, need_dt)


@rank1_loss_backward.register_fake
def _rank1_loss_backward_fake(grad_loss, student, teacher, factor, labels, stats, totals,
                              softmax_difference, weighted_deviation, floats, ints, need_ds,
                              need_dt):
    return fake_gradients(student, teacher, need_ds, need_dt)


# ----------------------------------------------------------------------------- the row ops

def statistics(inputs, config, keep_directions=False):
    """``(stats, softmax_difference, weighted_deviation)``; the directions only on the
    plain-PyTorch path in eager mode with ``keep_directions`` (else None or empty)."""
    if torch.compiler.is_compiling():
        return rank1_row_stats(*inputs, config.floats, config.ints), None, None
    return row_ops(config).statistics(inputs, config, keep_directions)


def finish(stats, config):
    """``(loss, totals)`` of the rows' statistics."""
    if torch.compiler.is_compiling():
        return rank1_finish(stats, config.floats, config.ints)
    return row_ops(config).finish(stats, config)


def loss_and_statistics(inputs, config, keep_directions=False):
    """``(loss, RowState)``: the loss of the rows and what its backward needs; one row kernel
    and one finishing kernel on the Triton path."""
    if torch.compiler.is_compiling():
        stats = rank1_row_stats(*inputs, config.floats, config.ints)
        loss, totals = rank1_finish(stats, config.floats, config.ints)
        return loss, RowState(inputs, stats, totals)
    ops = row_ops(config)
    if ops.fused is not None:
        loss, stats, totals = ops.fused(*inputs, config)
        return loss, RowState(inputs, stats, totals)
    stats, softmax_difference, weighted_deviation = ops.statistics(inputs, config,
                                                                   keep_directions)
    loss, totals = ops.finish(stats, config)
    return loss, RowState(inputs, stats, totals, softmax_difference, weighted_deviation)


def gradients(grad, state, config, need_ds, need_dt):
    """``(ds, dt)`` in the logits' dtypes (empty when not needed), ``grad`` times the loss's
    gradient (``grad`` 0-dim, or ``(B,)`` per-row weights with totals ``N = R = 1``)."""
    if torch.compiler.is_compiling():
        return rank1_loss_backward(grad, *state.inputs, state.stats, state.totals,
                                   *_directions(state), config.floats, config.ints, need_ds,
                                   need_dt)
    return row_ops(config).gradients(grad, state, config, need_ds, need_dt)


def gradients_needed(ctx, config):
    """``(need_ds, need_dt)`` of an autograd context whose first two inputs are the student and
    teacher logits: the teacher's probabilities are constants, it gets only the wMSE's gradient
    (none from the generalized JSD, as in TRL's and Liger-Kernel's distillation losses)."""
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1] and config.source in WMSE_SOURCES
