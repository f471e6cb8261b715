"""The rank-one row terms as ``torch.library`` custom ops with autograd, so that eager mode,
``torch.compile(fullgraph=True)`` and ``opcheck`` see one opaque operator per pass.

``gkl_kernels::rank1_rows(s, t, ...) -> (wmse (B,), ce (B,), stats (B, 5), softmax_difference,
weighted_deviation)`` and its backward ``gkl_kernels::rank1_rows_backward``. ``use_triton`` picks
the Triton launchers (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or the
plain-PyTorch path; ``block_c = 0`` lets the launcher choose the tile width. The last two outputs
are the plain-PyTorch path's gradient directions, ``(B, C)`` float32 when ``keep_directions`` (the
backward then is two elementwise products instead of a recomputation), else empty; the Triton
kernels recompute everything in their backward pass and always return them empty.
"""

from typing import Optional

import torch
from torch import Tensor

from gkl_kernels.buffers import fake_gradients
from gkl_kernels.rank1.kernels import (NUM_STATS, SOURCE_NONE, rank1_rows_backward,
                                       rank1_rows_forward)
from gkl_kernels.rank1.torch_impl import rank1_rows_backward_torch, rank1_rows_forward_torch


@torch.library.custom_op("gkl_kernels::rank1_rows", mutates_args=())
def rank1_rows(student: Tensor, teacher: Tensor, factor: Optional[Tensor], labels: Optional[Tensor],
               source: int, gamma: float, temperature: float, weight_temperature: float,
               with_ce: bool, symmetric: bool, use_triton: bool, block_c: int,
               keep_directions: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row wMSE, soft-label cross-entropy and statistics, and the torch path's gradient
    directions; ``symmetric`` only affects backward."""
    if use_triton:
        directions = _no_directions(student)
        return *rank1_rows_forward(student, teacher, factor, labels, source, gamma, temperature,
                                   weight_temperature, with_ce, block_c or None), *directions
    return rank1_rows_forward_torch(student, teacher, factor, labels, source, gamma, temperature,
                                    weight_temperature, with_ce, keep_directions)


def _no_directions(student):
    empty = student.new_empty(0, dtype=torch.float32)
    return empty, torch.empty_like(empty)


@rank1_rows.register_fake
def _rank1_rows_fake(student, teacher, factor, labels, source, gamma, temperature,
                     weight_temperature, with_ce, symmetric, use_triton, block_c, keep_directions):
    batch = student.shape[0]
    row = student.new_empty(batch, dtype=torch.float32)
    stats = student.new_empty(batch, NUM_STATS, dtype=torch.float32)
    if use_triton or not keep_directions:
        return row, torch.empty_like(row), stats, *_no_directions(student)
    softmax_difference, weighted_deviation = (
        student.new_empty(student.shape if wanted else (0,), dtype=torch.float32)
        for wanted in (with_ce, source != SOURCE_NONE))
    return row, torch.empty_like(row), stats, softmax_difference, weighted_deviation


@torch.library.custom_op("gkl_kernels::rank1_rows_backward", mutates_args=())
def rank1_rows_backward_op(grad_wmse: Tensor, grad_ce: Tensor, student: Tensor, teacher: Tensor,
                           factor: Optional[Tensor], labels: Optional[Tensor], stats: Tensor,
                           softmax_difference: Tensor, weighted_deviation: Tensor,
                           source: int, gamma: float, temperature: float,
                           weight_temperature: float, with_ce: bool, symmetric: bool,
                           need_ds: bool, need_dt: bool, use_triton: bool, block_c: int
                           ) -> tuple[Tensor, Tensor]:
    """Gradients of ``rank1_rows`` w.r.t. student and teacher (empty when not needed): the
    Triton kernel recomputes from the logits, the torch path scales the kept directions."""
    if use_triton:
        return rank1_rows_backward(grad_wmse, grad_ce, student, teacher, factor, labels, stats,
                                   source, gamma, temperature, weight_temperature, with_ce,
                                   symmetric, need_ds, need_dt, block_c or None)
    return rank1_rows_backward_torch(grad_wmse, grad_ce, student, teacher, stats,
                                     softmax_difference, weighted_deviation, source, temperature,
                                     with_ce, symmetric, need_ds, need_dt)


@rank1_rows_backward_op.register_fake
def _rank1_rows_backward_fake(grad_wmse, grad_ce, student, teacher, factor, labels, stats,
                              softmax_difference, weighted_deviation, source, gamma, temperature,
                              weight_temperature, with_ce, symmetric, need_ds, need_dt,
                              use_triton, block_c):
    return fake_gradients(student, teacher, need_ds, need_dt)


def _setup_context(ctx, inputs, output):
    (student, teacher, factor, labels, source, gamma, temperature, weight_temperature, with_ce,
     symmetric, use_triton, block_c, keep_directions) = inputs
    ctx.save_for_backward(student, teacher, factor, labels, *output[2:])
    ctx.options = (source, gamma, temperature, weight_temperature, with_ce, symmetric)
    ctx.launch = (use_triton, block_c)


def _backward(ctx, grad_wmse, grad_ce, *_grads_of_stats_and_directions):
    student, teacher, factor, labels, stats, softmax_difference, weighted_deviation = \
        ctx.saved_tensors
    source, gamma, temperature, weight_temperature, with_ce, symmetric = ctx.options
    # without pair weights the teacher gets no gradient (its probabilities are constants)
    need_ds = ctx.needs_input_grad[0]
    need_dt = ctx.needs_input_grad[1] and source != SOURCE_NONE
    if not (need_ds or need_dt):
        return (None,) * 13
    # row gradients arrive expanded (stride 0) from a sum or mean: the kernels read them densely
    ds, dt = rank1_rows_backward_op(
        grad_wmse.contiguous(), grad_ce.contiguous(), student, teacher, factor, labels, stats,
        softmax_difference, weighted_deviation, source, gamma, temperature, weight_temperature,
        with_ce, symmetric, need_ds, need_dt, *ctx.launch)
    return (ds if need_ds else None, dt if need_dt else None) + (None,) * 11


rank1_rows.register_autograd(_backward, setup_context=_setup_context)
