"""The rank-one loss as ``torch.library`` custom ops with autograd: one opaque operator per pass
for eager mode, ``torch.compile(fullgraph=True)`` and ``opcheck``.

- ``gkl_kernels::rank1_loss(s, t, factor, labels, floats, ints, keep_directions) -> (loss,
  stats, totals, softmax_difference, weighted_deviation)``: the 0-dim loss, the per-row
  statistics and the batch totals (``config.py``); the last two are the torch path's kept
  gradient directions (empty on the Triton path, which recomputes them).
- ``gkl_kernels::rank1_row_stats`` and ``gkl_kernels::rank1_finish``: the two halves of the
  forward, for callers that merge statistics first (vocabulary shards) or finish once over
  several chunks.
- ``gkl_kernels::rank1_loss_backward(grad_loss, ..., stats, totals, ...) -> (ds, dt)``.

``RankOneLoss`` is ``rank1_loss``'s loss with its autograd in eager mode, on both backends,
without the custom ops' dispatch: on the plain-PyTorch path its forward also forms the gradients
for a unit incoming gradient, so that its backward is one product per logit tensor.

``floats``/``ints`` are a ``RowConfig`` (``RowConfig.floats``, ``.ints``): its ``use_triton``
picks the Triton launchers (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or the
plain-PyTorch path.
"""

from functools import lru_cache
from typing import Optional

import torch
from torch import Tensor

from gkl_kernels.buffers import fake_gradients
from gkl_kernels.rank1 import kernels
from gkl_kernels.pairs.op import pair_loss_backward_triton, pair_loss_triton
from gkl_kernels.pairs.torch_impl import pair_loss_stats_torch
from gkl_kernels.rank1.config import (NUM_STATS, NUM_TOTALS, SOURCE_NONE, SOURCE_PAIRS, RowConfig,
                                      compute_dtype)
from gkl_kernels.rank1.torch_impl import (finish_loss_torch, loss_backward_torch,
                                          loss_gradients_torch, row_stats_torch)


@lru_cache(maxsize=256)
def _config(floats, ints):
    return RowConfig.unpack(floats, ints)


def config_of(floats, ints):
    """The ``RowConfig`` of an op's ``floats``, ``ints`` arguments."""
    return _config(tuple(floats), tuple(ints))


def _torch_stats(student, teacher, factor, labels, config, keep_directions):
    """The plain-PyTorch statistics and directions: rank-one, or pair weights (``factor`` the
    ``(C, C)`` / ``(B, C, C)`` weights)."""
    if config.source == SOURCE_PAIRS:
        return pair_loss_stats_torch(student, teacher, factor, labels, config, keep_directions)
    return row_stats_torch(student, teacher, factor, labels, config, keep_directions)


def _row_stats_of(student, teacher, factor, labels, config):
    """``rank1_row_stats``' statistics for a ``RowConfig``."""
    if config.use_triton and config.source == SOURCE_PAIRS:
        return pair_loss_triton(student, teacher, factor, labels, config)[1]
    if config.use_triton:
        return kernels.row_stats(student, teacher, factor, labels, config)
    return _torch_stats(student, teacher, factor, labels, config, False)[0]


@torch.library.custom_op("gkl_kernels::rank1_row_stats", mutates_args=())
def rank1_row_stats(student: Tensor, teacher: Tensor, factor: Optional[Tensor],
                    labels: Optional[Tensor], floats: list[float], ints: list[int]) -> Tensor:
    """Per-row statistics ``(B, NUM_STATS)``, float32 (float64 on the torch path for float64
    logits)."""
    return _row_stats_of(student, teacher, factor, labels, config_of(floats, ints))


@rank1_row_stats.register_fake
def _row_stats_fake(student, teacher, factor, labels, floats, ints):
    return student.new_empty(student.shape[0], NUM_STATS, dtype=compute_dtype(student, teacher))


def _finished(stats, config):
    """``rank1_finish``'s loss and totals for a ``RowConfig``."""
    if config.use_triton:
        return kernels.finish_loss(stats, config)
    return finish_loss_torch(stats, config)


@torch.library.custom_op("gkl_kernels::rank1_finish", mutates_args=())
def rank1_finish(stats: Tensor, floats: list[float], ints: list[int]) -> tuple[Tensor, Tensor]:
    """``(loss (), totals (NUM_TOTALS,))`` float32 from per-row statistics."""
    return _finished(stats, config_of(floats, ints))


@rank1_finish.register_fake
def _finish_fake(stats, floats, ints):
    return stats.new_empty(()), stats.new_empty(NUM_TOTALS)


def loss_outputs(student, teacher, factor, labels, config, keep_directions):
    """``rank1_loss``'s outputs for a ``RowConfig``."""
    if config.use_triton:
        if config.source == SOURCE_PAIRS:
            loss, stats, totals = pair_loss_triton(student, teacher, factor, labels, config)
        else:
            stats = kernels.row_stats(student, teacher, factor, labels, config)
            loss, totals = kernels.finish_loss(stats, config)
        empty = stats.new_empty(0)
        return loss, stats, totals, empty, torch.empty_like(empty)
    stats, softmax_difference, weighted_deviation = _torch_stats(
        student, teacher, factor, labels, config, keep_directions)
    loss, totals = finish_loss_torch(stats, config)
    return loss, stats, totals, softmax_difference, weighted_deviation


@torch.library.custom_op("gkl_kernels::rank1_loss", mutates_args=())
def rank1_loss(student: Tensor, teacher: Tensor, factor: Optional[Tensor],
               labels: Optional[Tensor], floats: list[float], ints: list[int],
               keep_directions: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss, its statistics and totals, and (torch path, ``keep_directions``) the gradient
    directions; one row kernel and one finishing kernel on the Triton path."""
    return loss_outputs(student, teacher, factor, labels, config_of(floats, ints),
                        keep_directions)


@rank1_loss.register_fake
def _rank1_loss_fake(student, teacher, factor, labels, floats, ints, keep_directions):
    config = config_of(floats, ints)
    dtype = compute_dtype(student, teacher)
    stats = student.new_empty(student.shape[0], NUM_STATS, dtype=dtype)
    directions = [student.new_empty(student.shape if keep_directions and wanted else (0,),
                                    dtype=dtype)
                  for wanted in (config.with_ce, config.source != SOURCE_NONE)]
    if config.use_triton:
        directions = [stats.new_empty(0), stats.new_empty(0)]
    return stats.new_empty(()), stats, stats.new_empty(NUM_TOTALS), *directions


def loss_gradients(grad_loss, student, teacher, factor, labels, stats, totals,
                   softmax_difference, weighted_deviation, config, need_ds, need_dt):
    """``rank1_loss_backward``'s gradients for a ``RowConfig``."""
    if config.use_triton and config.source == SOURCE_PAIRS:
        return pair_loss_backward_triton(grad_loss, student, teacher, factor, labels, stats,
                                         totals, config, need_ds, need_dt)
    if config.use_triton:
        return kernels.loss_backward(grad_loss, student, teacher, factor, labels, stats, totals,
                                     config, need_ds, need_dt)
    if config.source == SOURCE_PAIRS and not weighted_deviation.numel():
        # pair weights' directions are not recomputed from the statistics: form them again
        _, softmax_difference, weighted_deviation = pair_loss_stats_torch(
            student, teacher, factor, labels, config, True)
    return loss_backward_torch(grad_loss, student, teacher, factor, labels, stats, totals,
                               config, need_ds, need_dt, softmax_difference, weighted_deviation)


@torch.library.custom_op("gkl_kernels::rank1_loss_backward", mutates_args=())
def rank1_loss_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor,
                        factor: Optional[Tensor], labels: Optional[Tensor], stats: Tensor,
                        totals: Tensor, softmax_difference: Tensor, weighted_deviation: Tensor,
                        floats: list[float], ints: list[int], need_ds: bool, need_dt: bool
                        ) -> tuple[Tensor, Tensor]:
    """Gradients of the loss w.r.t. student and teacher (empty when not needed), scaled by the
    0-dim ``grad_loss``; one kernel on the Triton path."""
    return loss_gradients(grad_loss, student, teacher, factor, labels, stats, totals,
                          softmax_difference, weighted_deviation, config_of(floats, ints),
                          need_ds, need_dt)


@rank1_loss_backward.register_fake
def _rank1_loss_backward_fake(grad_loss, student, teacher, factor, labels, stats, totals,
                              softmax_difference, weighted_deviation, floats, ints, need_ds,
                              need_dt):
    return fake_gradients(student, teacher, need_ds, need_dt)


def row_stats(student, teacher, factor, labels, config):
    """``rank1_row_stats`` for a ``RowConfig``: the custom op under ``torch.compile``, else its
    body, without the op's dispatch (host time a GPU step waits on)."""
    if torch.compiler.is_compiling():
        return rank1_row_stats(student, teacher, factor, labels, config.floats, config.ints)
    return _row_stats_of(student, teacher, factor, labels, config)


def finish(stats, config):
    """``rank1_finish`` for a ``RowConfig``, as ``row_stats`` calls its op."""
    if torch.compiler.is_compiling():
        return rank1_finish(stats, config.floats, config.ints)
    return _finished(stats, config)


def loss_backward(grad_loss, student, teacher, factor, labels, stats, totals,
                  softmax_difference, weighted_deviation, config, need_ds, need_dt):
    """``rank1_loss_backward`` for a ``RowConfig``, as ``row_stats`` calls its op."""
    if torch.compiler.is_compiling():
        return rank1_loss_backward(grad_loss, student, teacher, factor, labels, stats, totals,
                                   softmax_difference, weighted_deviation, config.floats,
                                   config.ints, need_ds, need_dt)
    return loss_gradients(grad_loss, student, teacher, factor, labels, stats, totals,
                          softmax_difference, weighted_deviation, config, need_ds, need_dt)


def _setup_context(ctx, inputs, output):
    student, teacher, factor, labels, floats, ints, _ = inputs
    ctx.save_for_backward(student, teacher, factor, labels, *output[1:])
    ctx.floats, ctx.ints = floats, ints
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def gradients_needed(ctx, config):
    """``(need_ds, need_dt)`` of an autograd context whose first two inputs are the student and
    teacher logits: the teacher's probabilities are constants, it gets only the wMSE's gradient."""
    return ctx.needs_input_grad[0], ctx.needs_input_grad[1] and config.source != SOURCE_NONE


def _backward(ctx, grad_loss, *_grads_of_statistics):
    if grad_loss is None:
        return (None,) * 7
    student, teacher, factor, labels, stats, totals, softmax_difference, weighted_deviation = \
        ctx.saved_tensors
    need_ds, need_dt = gradients_needed(ctx, config_of(ctx.floats, ctx.ints))
    if not (need_ds or need_dt):
        return (None,) * 7
    ds, dt = rank1_loss_backward(grad_loss, student, teacher, factor, labels, stats, totals,
                                 softmax_difference, weighted_deviation, ctx.floats, ctx.ints,
                                 need_ds, need_dt)
    return ds if need_ds else None, dt if need_dt else None, None, None, None, None, None


rank1_loss.register_autograd(_backward, setup_context=_setup_context)


class RankOneLoss(torch.autograd.Function):
    """``rank1_loss``'s first output with its autograd in eager mode, without the custom ops'
    dispatch (host time that a GPU step would wait on). Triton: the backward launches its kernel
    on the saved statistics. Plain PyTorch: the forward keeps ``d loss / d s`` and
    ``d loss / d t`` (in the statistics' dtype) for the inputs that need them, the backward
    scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, student, teacher, factor, labels, config):
        need_ds, need_dt = gradients_needed(ctx, config)
        ctx.config = config
        if config.use_triton:
            loss, stats, totals, _, _ = loss_outputs(student, teacher, factor, labels, config,
                                                     False)
            ctx.save_for_backward(student, teacher, factor, labels, stats, totals)
            return loss
        stats, softmax_difference, weighted_deviation = _torch_stats(
            student, teacher, factor, labels, config, need_ds or need_dt)
        loss, totals = finish_loss_torch(stats, config)
        if need_ds or need_dt:
            ds, dt = loss_gradients_torch(loss.new_ones(()), student, teacher, factor, labels,
                                          stats, totals, config, need_ds, need_dt,
                                          softmax_difference, weighted_deviation, overwrite=True)
            ctx.save_for_backward(ds, dt)
        ctx.dtypes = need_ds and student.dtype, need_dt and teacher.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        if not ctx.config.use_triton:
            return (*((g * grad_loss).to(dtype) if dtype else None
                      for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)), None, None, None)
        student, teacher, factor, labels, stats, totals = ctx.saved_tensors
        need_ds, need_dt = gradients_needed(ctx, ctx.config)
        empty = stats.new_empty(0)
        ds, dt = loss_gradients(grad_loss, student, teacher, factor, labels, stats, totals, empty,
                                empty, ctx.config, need_ds, need_dt)
        return ds if need_ds else None, dt if need_dt else None, None, None, None
