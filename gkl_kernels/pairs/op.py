"""The general pair-weight wMSE as ``torch.library`` custom ops with autograd.

``gkl_kernels::pair_rows(s, t, weights, per_row, ...) -> (wmse (B,), weight_sum (B,), g)``: the
per-row ``sum_{j,k} w[b,j,k] ((t_j - t_k) - (s_j - s_k))^2`` and ``sum_{j,k} w[b,j,k]`` over the
classes present in the row (neither logit ``-inf``) for shared ``(C, C)`` weights
(``per_row=False``) or per-row ``(B, C, C)`` weights (``per_row=True``), and its backward
``gkl_kernels::pair_rows_backward``; ``g`` is the torch path's kept half-gradient ``(B, C)``
(empty on the Triton path, which recomputes it). The weights and their sums are constants;
``symmetric=False`` gives the student no gradient (DKL). ``block_c = 0`` lets the launchers choose
the tiles.

The whole loss with pair weights (``RowConfig.source = SOURCE_PAIRS``) runs through the rank-one
loss ops (``row_ops``), which call ``pair_loss_triton`` / ``pair_loss_backward_triton``
(``launchers``, which import triton; this module imports it only when a Triton op runs): the
pair kernel writes column parts of every row (wMSE, weight sums, the cross-entropy statistics,
flags), the core's finishing kernel merges them into the loss and the rows' statistics; the
backward is one pair kernel that also forms the cross-entropy's gradient.
"""

import torch
from torch import Tensor

from gkl_kernels.buffers import fake_gradients
from gkl_kernels.core.config import PART_WMSE, PART_WSUM, compute_dtype
from gkl_kernels.pairs.torch_impl import pair_rows_backward_torch, pair_rows_forward_torch


@torch.library.custom_op("gkl_kernels::pair_rows", mutates_args=())
def pair_rows(student: Tensor, teacher: Tensor, weights: Tensor, per_row: bool, symmetric: bool,
              use_triton: bool, block_c: int, dot_precision: str
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row wMSE and pair-weight sums (B,) each, and the torch path's ``g``, float32 (float64
    for float64 logits);
    ``symmetric`` only affects backward, ``dot_precision`` only shared weights under Triton."""
    if not use_triton:
        return pair_rows_forward_torch(student, teacher, weights, per_row)
    from gkl_kernels.pairs.launchers import pair_parts  # triton: imported at first use
    parts = pair_parts(student, teacher, weights, None, per_row, block_c, dot_precision)
    return (parts[PART_WMSE].sum(dim=0), parts[PART_WSUM].sum(dim=0),
            student.new_empty(0, dtype=parts.dtype))


@pair_rows.register_fake
def _pair_rows_fake(student, teacher, weights, per_row, symmetric, use_triton, block_c,
                    dot_precision):
    dtype = compute_dtype(student, teacher)
    row = student.new_empty(student.shape[0], dtype=dtype)
    g = student.new_empty(student.shape if not use_triton else (0,), dtype=dtype)
    return row, torch.empty_like(row), g


@torch.library.custom_op("gkl_kernels::pair_rows_backward", mutates_args=())
def pair_rows_backward(grad_wmse: Tensor, student: Tensor, teacher: Tensor, weights: Tensor,
                       g: Tensor, per_row: bool, need_ds: bool, need_dt: bool, use_triton: bool,
                       block_c: int, dot_precision: str) -> tuple[Tensor, Tensor]:
    """Gradients of ``pair_rows``'s wMSE w.r.t. student and teacher (empty when not needed)."""
    if not use_triton:
        return pair_rows_backward_torch(grad_wmse, student, teacher, g, need_ds, need_dt)
    from gkl_kernels.pairs.launchers import pair_backward  # triton: imported at first use
    return pair_backward(grad_wmse, student, teacher, weights, need_ds, need_dt, per_row, block_c,
                         dot_precision)


@pair_rows_backward.register_fake
def _pair_rows_backward_fake(grad_wmse, student, teacher, weights, g, per_row, need_ds, need_dt,
                             use_triton, block_c, dot_precision):
    return fake_gradients(student, teacher, need_ds, need_dt)


def _setup_context(ctx, inputs, output):
    student, teacher, weights, per_row, symmetric, use_triton, block_c, dot_precision = inputs
    ctx.save_for_backward(student, teacher, weights, output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.options = (per_row, symmetric, use_triton, block_c, dot_precision)


def _backward(ctx, grad_wmse, _grad_weight_sum, _grad_g):
    student, teacher, weights, g = ctx.saved_tensors
    per_row, symmetric, use_triton, block_c, dot_precision = ctx.options
    need_ds = ctx.needs_input_grad[0] and symmetric
    need_dt = ctx.needs_input_grad[1]
    if not (need_ds or need_dt):
        return (None,) * 8
    # the row gradient arrives expanded (stride 0) from a sum: the kernels read it densely
    ds, dt = pair_rows_backward(grad_wmse.contiguous(), student, teacher, weights, g, per_row,
                                need_ds, need_dt, use_triton, block_c, dot_precision)
    return (ds if need_ds else None, dt if need_dt else None) + (None,) * 6


pair_rows.register_autograd(_backward, setup_context=_setup_context)
