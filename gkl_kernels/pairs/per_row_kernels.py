"""Triton kernels and launchers for the pairwise wMSE with a full per-row weight tensor
``w`` of shape ``(B, C, C)``.

Over the classes present in the row (neither logit ``-inf``; absent ones drop out of every pair),
with ``d = t - s`` held as an exact pair ``hi + lo`` (TwoSum; float32, float64 for float64
logits) and the pair differences ``d_j - d_k = (hi_j - hi_k) + (lo_j - lo_k)`` (exact where the
two are within a factor of 2: a cluster of classes at a common offset stays exact),

    wmse_b = sum_{j,k} w[b,j,k] (d_j - d_k)^2
    d wmse_b / d d_n = 2 g_n,   g_n = sum_k w[b,n,k] (d_n - d_k) - sum_j w[b,j,n] (d_j - d_n)

Each weight tile ``w[b, j-tile, k-tile]`` meets the differences ``d_j - d_k`` of the two logit
tiles held on chip; nothing of size ``B x C x C`` besides the input exists. The forward kernel
reduces ``w (d_j - d_k)^2`` and ``w``; the backward kernel adds each tile's row sums to ``g_j``
and its column sums to ``g_k`` in a ``(B, C)`` accumulator that only the row's own program
touches (``tl.debug_barrier`` orders its read-modify-writes), then writes the gradients.

Bytes per pass: the weights exactly once (``B C^2`` elements in their dtype: float32, float16 or
bfloat16), the logits ``s``, ``t`` once per ``j`` tile (``2 B C^2 / BJ`` elements, from L2),
forward ``8 B C / BJ`` bytes of float32 partial sums, backward ``8 B C^2 / BJ`` bytes of accumulator
traffic (L2) and the gradients. FLOPs: about 4 per weight forward, 5 backward.
"""

import torch
import triton
import triton.language as tl

from gkl_kernels.buffers import empty_gradients
from gkl_kernels.core.config import compute_dtype
from gkl_kernels.core.kernels import (NEG_INF, POS_INF, accumulator, load_row_stats, option,
                                      row_flags, softmax_difference, store_column_parts,
                                      store_gradients, tile_cross_entropy, two_sum)
from gkl_kernels.pairs.loss_terms import (loss_arguments, loss_flags, loss_scalars,
                                          pair_loss_coefficients, part_planes, part_scalars)

BLOCK_J = 32  # rows j of a weight tile
MAX_BLOCK_K = 64  # columns k of a weight tile (contiguous in memory)
MAX_BLOCK_K_FLOAT64 = 32  # float64: the 32 x 64 backward tile spills


def pick_per_row_blocks(num_classes, block_c=None, dtype=torch.float32):
    """``(BLOCK_J, BLOCK_K)`` of a weight tile: ``block_c`` for both when forced (tests), else
    ``min(32, C)`` by ``min(64, C)`` (``min(32, C)`` for float64 arithmetic, ``dtype``) rounded
    up to powers of two."""
    if block_c is not None:
        return block_c, block_c
    size = triton.next_power_of_2(num_classes)
    widest = MAX_BLOCK_K_FLOAT64 if dtype == torch.float64 else MAX_BLOCK_K
    return min(size, BLOCK_J), min(size, widest)


def per_row_num_warps(block_j, block_k):
    """Warps per program: 8 for the widest tile (32 x 64; 4 warps spill there on sm_90a), else 4."""
    return 8 if block_j * block_k >= 2048 else 4


@triton.jit
def _row_difference_pairs(s_row, t_row, c0, C, s_stride_c, t_stride_c, BLOCK: tl.constexpr,
                          ACC: tl.constexpr):
    """Columns ``c0 .. c0 + BLOCK`` (int64), the logits there in ``ACC`` (``-inf`` outside the
    row), the present ones (neither logit ``-inf``) and ``t - s = hi + lo`` there, 0
    elsewhere."""
    cols = (c0 + tl.arange(0, BLOCK)).to(tl.int64)
    mask = cols < C
    s = tl.load(s_row + cols * s_stride_c, mask=mask, other=NEG_INF).to(ACC)
    t = tl.load(t_row + cols * t_stride_c, mask=mask, other=NEG_INF).to(ACC)
    present = (s != NEG_INF) & (t != NEG_INF)
    hi, lo = two_sum(t, -s)
    return cols, s, t, present, tl.where(present, hi, 0.0), tl.where(present, lo, 0.0)


@triton.jit
def _weight_tile(s_row, t_row, w_row, j_cols, in_j, hi_j, lo_j, k0, C, s_stride_c, t_stride_c,
                 w_stride_j, w_stride_k, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Columns ``k0 .. k0 + BLOCK_K`` (int64) and the present ones, the weight tile ``w[j, k]`` in
    ``ACC`` (0 outside the present pairs) and the differences ``d_j - d_k`` on it."""
    k_cols, _, _, in_k, hi_k, lo_k = _row_difference_pairs(s_row, t_row, k0, C, s_stride_c,
                                                           t_stride_c, BLOCK_K, ACC)
    both = in_j[:, None] & in_k[None, :]
    w = tl.load(w_row + j_cols[:, None] * w_stride_j + k_cols[None, :] * w_stride_k,
                mask=both, other=0.0).to(ACC)
    delta = (hi_j[:, None] - hi_k[None, :]) + (lo_j[:, None] - lo_k[None, :])
    return k_cols, in_k, w, delta


@triton.jit
def _read_columns(labels_ptr, row, C, ignore_index, HAS_LABELS: tl.constexpr):
    """The columns of a row that are read: ``C``, or 0 when its label is ``ignore_index``."""
    if HAS_LABELS:
        return tl.where(tl.load(labels_ptr + row) != ignore_index, C, 0)
    return C


@triton.jit
def wmse_per_row_fwd_kernel(
    s_ptr, t_ptr, w_ptr, labels_ptr, parts_ptr,
    B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, w_stride_b, w_stride_j, w_stride_k,
    ignore_index, num_labels, inv_t_hi, inv_t_lo, LOSS: tl.constexpr, HAS_LABELS: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """Grid ``(B, P = cdiv(C, BLOCK_J))``: program ``(b, i)`` writes part ``i`` of row ``b``
    (``config.PART_*``, ``ACC`` ``(planes, P, B)``): ``sum w (d_j - d_k)^2`` and ``sum w`` over
    the weight rows ``j`` of tile ``i`` (their sums over ``P`` are ``wmse_b`` and ``sum_{j,k}
    w[b,j,k]``) and, ``LOSS``, a flag for an invalid weight read (those of the present pairs:
    negative, inf, NaN), the cross-entropy statistics of the columns ``j``, the row's kept and
    label-error flags; 0 for a row labelled ``ignore_index``, which is not read. Float options as
    ``float32_pair``s."""
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    w_row = w_ptr + row * w_stride_b
    read = _read_columns(labels_ptr, row, C, ignore_index, HAS_LABELS)
    j_cols, s, t, in_j, hi_j, lo_j = _row_difference_pairs(s_row, t_row, tile * BLOCK_J, read,
                                                           s_stride_c, t_stride_c, BLOCK_J, ACC)
    wmse_acc = tl.zeros((BLOCK_J, BLOCK_K), dtype=ACC)
    wsum_acc = tl.zeros((BLOCK_J, BLOCK_K), dtype=ACC)
    invalid = tl.zeros((BLOCK_J, BLOCK_K), dtype=ACC)
    for k0 in range(0, read, BLOCK_K):
        _, _, w, diff = _weight_tile(s_row, t_row, w_row, j_cols, in_j, hi_j, lo_j, k0, read,
                                     s_stride_c, t_stride_c, w_stride_j, w_stride_k, BLOCK_K,
                                     ACC)
        wmse_acc += w * diff * diff
        wsum_acc += w
        invalid = tl.maximum(invalid, tl.where((w >= 0.0) & (w < POS_INF), 0.0, 1.0))
    ms, zs, mt, zt, a = tile_cross_entropy(s, t, inv_t, 0)  # after the loop: not live there
    kept, bad = row_flags(labels_ptr, row, row >= 0, ignore_index, num_labels, HAS_LABELS)
    store_column_parts(parts_ptr, tile.to(tl.int64) * B + row, tl.num_programs(1).to(tl.int64) * B,
                     row >= 0, tl.sum(tl.sum(wmse_acc, axis=1), axis=0),
                     tl.sum(tl.sum(wsum_acc, axis=1), axis=0),
                     tl.max(tl.max(invalid, axis=1), axis=0), ms, zs, mt, zt, a, kept, bad, LOSS)


@triton.jit
def wmse_per_row_bwd_kernel(
    s_ptr, t_ptr, w_ptr, labels_ptr, stats_ptr, totals_ptr, grad_ptr, acc_ptr, ds_ptr, dt_ptr,
    C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, w_stride_b, w_stride_j, w_stride_k,
    grad_stride, ignore_index, inv_t_hi, inv_t_lo, mse_weight_hi, mse_weight_lo, ce_weight_hi,
    ce_weight_lo,
    LOSS: tl.constexpr, HAS_LABELS: tl.constexpr, WITH_CE: tl.constexpr,
    NORMALIZE_BATCH: tl.constexpr, SYMMETRIC: tl.constexpr, NEED_DS: tl.constexpr,
    NEED_DT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """Grid ``(B,)``, row ``b`` (contiguous ``(B, C)`` outputs in the inputs' dtypes; 0 for a row
    labelled ``ignore_index``, which is not read): ``dt = c_b g``, ``ds = -[SYMMETRIC] c_b g +
    [LOSS] g_ce (q - p)``, with ``c_b``, ``g_ce`` as in ``wmse_shared_bwd_kernel``. ``acc_ptr`` is
    an ``ACC`` ``(B, C)`` buffer that collects ``g`` (each program zeroes its row first). Float
    options as ``float32_pair``s."""
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    mse_weight = option(mse_weight_hi, mse_weight_lo, ACC)
    ce_weight = option(ce_weight_hi, ce_weight_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    w_row = w_ptr + row * w_stride_b
    acc_row = acc_ptr + row * C
    read = _read_columns(labels_ptr, row, C, ignore_index, HAS_LABELS)
    for c0 in range(0, C, BLOCK_K):  # this row's accumulator starts at 0
        cols = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
        tl.store(acc_row + cols, tl.zeros([BLOCK_K], dtype=ACC), mask=cols < C)
    tl.debug_barrier()
    for j0 in range(0, read, BLOCK_J):
        j_cols, _, _, in_j, hi_j, lo_j = _row_difference_pairs(s_row, t_row, j0, read,
                                                               s_stride_c, t_stride_c, BLOCK_J,
                                                               ACC)
        row_part = tl.zeros((BLOCK_J, BLOCK_K), dtype=ACC)
        for k0 in range(0, read, BLOCK_K):
            k_cols, in_k, w, diff = _weight_tile(
                s_row, t_row, w_row, j_cols, in_j, hi_j, lo_j, k0, read, s_stride_c, t_stride_c,
                w_stride_j, w_stride_k, BLOCK_K, ACC)
            w_diff = w * diff
            row_part += w_diff
            # g_k -= sum_j w[j, k] (d_j - d_k): this k tile's accumulator, this program only;
            # absent classes (w = 0 on their pairs) keep their 0
            k_acc = tl.load(acc_row + k_cols, mask=in_k, other=0.0)
            tl.store(acc_row + k_cols, k_acc - tl.sum(w_diff, axis=0), mask=in_k)
        tl.debug_barrier()
        j_acc = tl.load(acc_row + j_cols, mask=in_j, other=0.0)
        tl.store(acc_row + j_cols, j_acc + tl.sum(row_part, axis=1), mask=in_j)
        tl.debug_barrier()
    grad = tl.load(grad_ptr + row * grad_stride).to(ACC)
    if LOSS:
        (ms, zs, mt, zt, a, z_w, scale, weight, ph, pl, m2, kept,
         err, dm) = load_row_stats(stats_ptr, row, row >= 0)
        coef, coef_ce = pair_loss_coefficients(kept, totals_ptr, grad, mse_weight, ce_weight,
                                               inv_t, NORMALIZE_BATCH)
    else:
        coef = 2.0 * grad
    for c0 in range(0, C, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = cols < C
        g_d = coef * tl.load(acc_row + cols, mask=mask, other=0.0)
        ce_grad = tl.zeros([BLOCK_K], dtype=ACC)
        if LOSS and WITH_CE and NEED_DS:
            s = tl.load(s_row + cols * s_stride_c, mask=cols < read, other=NEG_INF).to(ACC)
            t = tl.load(t_row + cols * t_stride_c, mask=cols < read, other=NEG_INF).to(ACC)
            ce_grad = coef_ce * softmax_difference(s, t, ms, zs, mt, zt, inv_t)
        store_gradients(ds_ptr, dt_ptr, row * C + cols, mask, g_d, ce_grad, SYMMETRIC, NEED_DS,
                        NEED_DT)


def _launch_args(student, teacher, weights):
    return (student.shape[1], student.stride(0), student.stride(1), teacher.stride(0),
            teacher.stride(1), weights.stride(0), weights.stride(1), weights.stride(2))


def per_row_rows_forward(student, teacher, weights, block_c=None, labels=None, config=None):
    """``parts`` ``(planes, P, B)`` in ``compute_dtype`` (``config.PART_*``) for per-row
    ``(B, C, C)`` pair weights; ``labels``, ``config`` as in ``shared_rows_forward``."""
    batch, num_classes = student.shape
    dtype = compute_dtype(student, teacher)
    block_j, block_k = pick_per_row_blocks(num_classes, block_c, dtype)
    grid = (batch, triton.cdiv(num_classes, block_j))
    parts = torch.empty(part_planes(config), grid[1], batch, dtype=dtype, device=student.device)
    wmse_per_row_fwd_kernel[grid](
        student, teacher, weights, student if labels is None else labels, parts, batch,
        *_launch_args(student, teacher, weights), *part_scalars(config, num_classes),
        LOSS=config is not None, HAS_LABELS=labels is not None,
        BLOCK_J=block_j, BLOCK_K=block_k, ACC=accumulator(parts.dtype),
        num_warps=per_row_num_warps(block_j, block_k))
    return parts


def per_row_rows_backward(grad, student, teacher, weights, need_ds, need_dt, block_c=None,
                          loss=None):
    """``(grad_student, grad_teacher)`` of the per-row wMSE, each ``(B, C)`` in its input's dtype
    or an empty tensor when not needed; ``loss`` as in ``shared_rows_backward``."""
    batch, num_classes = student.shape
    ds, dt = empty_gradients(student, teacher, need_ds, need_dt)
    acc = torch.empty(batch, num_classes, dtype=compute_dtype(student, teacher),
                      device=student.device)
    block_j, block_k = pick_per_row_blocks(num_classes, block_c, acc.dtype)
    wmse_per_row_bwd_kernel[(batch,)](
        student, teacher, weights, *loss_arguments(loss, student, grad), acc,
        ds if need_ds else student, dt if need_dt else teacher,
        *_launch_args(student, teacher, weights), grad.stride(0) if grad.dim() else 0,
        *loss_scalars(loss), NEED_DS=need_ds, NEED_DT=need_dt, BLOCK_J=block_j,
        BLOCK_K=block_k, ACC=accumulator(acc.dtype), **loss_flags(loss),
        num_warps=per_row_num_warps(block_j, block_k))
    return ds, dt
