"""The Triton side of the pair-weight ops (``op``): the pair kernels' forward (column parts of
every row) and backward, for the rows' wMSE and for the whole loss with pair weights, finished by
the core's finishing kernel. Imported where a Triton op runs (triton is optional)."""

import torch

from gkl_kernels.core.config import DOT_PRECISIONS, NUM_STATS
from gkl_kernels.core.kernels import finish_loss
from gkl_kernels.pairs.loss_terms import PairLossTerms
from gkl_kernels.pairs.per_row_kernels import per_row_rows_backward, per_row_rows_forward
from gkl_kernels.pairs.shared_kernels import shared_rows_backward, shared_rows_forward


def pair_parts(student, teacher, weights, labels, per_row, block_c, dot_precision, config=None):
    """The Triton forward: ``(NUM_PART_PLANES, P, B)`` column parts of the rows
    (``config.PART_*``)."""
    if per_row:
        return per_row_rows_forward(student, teacher, weights, block_c or None, labels, config)
    return shared_rows_forward(student, teacher, weights, dot_precision, block_c or None, labels,
                               config)


def pair_backward(grad, student, teacher, weights, need_ds, need_dt, per_row, block_c,
                  dot_precision, loss=None):
    """The Triton backward of the rows' wMSE (``loss`` None) or of the whole loss."""
    if per_row:
        return per_row_rows_backward(grad, student, teacher, weights, need_ds, need_dt,
                                     block_c or None, loss)
    return shared_rows_backward(grad, student, teacher, weights, need_ds, need_dt, dot_precision,
                                block_c or None, loss)


def pair_loss_triton(student, teacher, weights, labels, config):
    """``(loss, stats, totals)`` of the loss with pair weights under Triton: the pair kernel's
    column parts (wMSE, weight sums, cross-entropy statistics, flags), finished by the rank-one
    finishing kernel, which also writes the rows' statistics."""
    parts = pair_parts(student, teacher, weights, labels, config.per_row, config.block_c,
                       DOT_PRECISIONS[config.dot_precision], config)
    stats = torch.empty(student.shape[0], NUM_STATS, dtype=parts.dtype, device=student.device)
    loss, totals = finish_loss(stats, config, parts)
    return loss, stats, totals


def pair_loss_backward_triton(grad_loss, student, teacher, weights, labels, stats, totals, config,
                              need_ds, need_dt):
    """``(ds, dt)`` of the loss with pair weights under Triton: one pair backward kernel."""
    return pair_backward(grad_loss, student, teacher, weights, need_ds, need_dt, config.per_row,
                         config.block_c, DOT_PRECISIONS[config.dot_precision],
                         PairLossTerms(stats, totals, labels, config))
