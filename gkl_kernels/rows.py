"""The one autograd path of the loss over per-row statistics. ``RowLoss`` runs the row op on the
logits, a reduce step turns the statistics into the output and the batch totals, and the
backward op forms the logits' gradients from them. The entry points differ only in their reduce
step:

- ``MEAN``: the loss of the local rows (``gkl_loss``);
- ``PER_ROW``: the per-row losses ``(B,)`` (``reduction="none"`` / ``"sum"``, ``pairwise_wmse``);
- ``SyncedMean(group)``: the loss of every process's rows, totals all-reduced
  (``sync_normalizer``);
- ``ShardMerged(group)``: the loss of vocabulary shards, statistics merged over the group
  (``vocab_parallel_gkl_loss``, ``vocab_parallel_jsd_loss``).
"""

from dataclasses import dataclass, replace
from typing import Any

import torch

from gkl_kernels.core.config import (JSD_KL_SUMS, JSD_NORMALISERS, NUM_TOTALS, SOURCE_JSD,
                                     TOTAL_CE, TOTAL_DEN, TOTAL_ROWS, TOTAL_WMSE)
from gkl_kernels.distributed import all_process_totals, merged_row_stats, summed_kl_stats
from gkl_kernels.rank1.torch_impl import loss_gradients_torch, row_losses_torch
from gkl_kernels.row_ops import (RowInputs, RowState, finish, gradients, gradients_needed,
                                  loss_and_statistics, row_ops, statistics)


class RowReduce:
    """A reduce step: ``outputs(inputs, config, keep_directions) -> (output, RowState)``.
    ``per_row``: the output is ``(B,)`` and the backward gets one gradient per row;
    ``keeps_directions``: the torch path may keep the ``(B, C)`` gradient directions of the local
    statistics between the passes."""

    per_row = False
    keeps_directions = True


class _Mean(RowReduce):
    def outputs(self, inputs, config, keep_directions):
        return loss_and_statistics(inputs, config, keep_directions)


class _PerRow(RowReduce):
    per_row = True

    def outputs(self, inputs, config, keep_directions):
        stats, *directions = statistics(inputs, config, keep_directions)
        return row_losses_torch(stats, config), RowState(inputs, stats, per_row_totals(stats),
                                                         *directions)


MEAN, PER_ROW = _Mean(), _PerRow()


def per_row_totals(like):
    """The batch totals ``(NUM_TOTALS,)`` (``like``'s dtype and device) under which the row ops'
    gradient is that of the sum of the per-row losses: ``N = R = 1``."""
    totals = like.new_zeros(NUM_TOTALS)
    totals[TOTAL_DEN] = totals[TOTAL_ROWS] = 1.0
    return totals


def safe_ratio(numerator, denominator):
    """``numerator / denominator``, 0 (with no gradient through it) where ``denominator`` is 0."""
    empty = denominator == 0
    return torch.where(empty, 0.0, numerator / torch.where(empty, 1.0, denominator))


def loss_from_totals(totals, config):
    """``mse_weight wmse_sum / (4 N) + ce_weight ce_sum / R`` from batch totals (0-dim)."""
    rows = totals[TOTAL_ROWS].clamp_min(1.0)
    loss = totals.new_zeros(())
    if config.with_wmse:
        norm = rows if config.normalize_batch else totals[TOTAL_DEN]
        loss = (config.mse_weight / 4) * safe_ratio(totals[TOTAL_WMSE], norm)
    if config.with_ce:
        loss = loss + config.ce_weight * totals[TOTAL_CE] / rows
    return loss


@dataclass(frozen=True)
class SyncedMean(RowReduce):
    """The loss of every process's rows of ``group``: local statistics, all-reduced totals."""

    group: Any = None

    def outputs(self, inputs, config, keep_directions):
        stats, *directions = statistics(inputs, config, keep_directions)
        totals = all_process_totals(finish(stats, config)[1], self.group)
        return loss_from_totals(totals, config), RowState(inputs, stats, totals, *directions)


@dataclass(frozen=True)
class ShardMerged(RowReduce):
    """The loss of vocabulary shards over ``group``: the shards' statistics merged (the
    generalized JSD's in two rounds: the normalisers, then the KL sums from them); the backward
    recomputes its directions from the merged statistics (nothing ``(N, V_p)`` is kept)."""

    group: Any = None
    keeps_directions = False

    def outputs(self, inputs, config, keep_directions):
        if config.source == SOURCE_JSD:  # a row's KL sums need the whole row's normalisers
            rounds = (replace(config, jsd_round=JSD_NORMALISERS),
                      replace(config, jsd_round=JSD_KL_SUMS))
            normalisers = merged_row_stats(statistics(inputs, rounds[0])[0], config, self.group)
            stats = summed_kl_stats(statistics(inputs._replace(factor=normalisers), rounds[1])[0],
                                    config, self.group)
        else:
            stats = merged_row_stats(statistics(inputs, config)[0], config, self.group)
        loss, totals = finish(stats, config)
        return loss, RowState(inputs, stats, totals)


class RowLoss(torch.autograd.Function):
    """``reduce``'s output of the rows ``student``, ``teacher`` ``(B, C)`` with their ``factor``
    and ``labels``. On the plain-PyTorch path in eager mode a whole-batch output keeps
    ``d output / d logits`` from its forward (one product each in backward); elsewhere the
    backward op forms the gradients from the saved statistics and totals."""

    @staticmethod
    def forward(ctx, student, teacher, factor, labels, config, reduce):
        need_ds, need_dt = gradients_needed(ctx, config)
        keep = (need_ds or need_dt) and reduce.keeps_directions and not config.use_triton \
            and not torch.compiler.is_compiling() and row_ops(config).keeps_directions
        output, state = reduce.outputs(RowInputs(student, teacher, factor, labels), config, keep)
        ctx.config, ctx.per_row, ctx.prescaled = config, reduce.per_row, False
        if keep and not reduce.per_row:
            ds, dt = loss_gradients_torch(output.new_ones(()), *state.inputs, state.stats,
                                          state.totals, config, need_ds, need_dt,
                                          state.softmax_difference, state.weighted_deviation,
                                          overwrite=True)
            ctx.save_for_backward(ds, dt)
            ctx.prescaled, ctx.dtypes = True, (need_ds and student.dtype,
                                               need_dt and teacher.dtype)
        else:
            ctx.save_for_backward(*state.inputs, *state[1:])
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.prescaled:
            return (*((g * grad).to(dtype) if dtype else None
                      for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)), None, None, None, None)
        student, teacher, factor, labels, *rest = ctx.saved_tensors
        need_ds, need_dt = gradients_needed(ctx, ctx.config)
        state = RowState(RowInputs(student, teacher, factor, labels), *rest)
        ds, dt = gradients(grad.contiguous() if ctx.per_row else grad, state, ctx.config,
                           need_ds, need_dt)
        return ds if need_ds else None, dt if need_dt else None, None, None, None, None
