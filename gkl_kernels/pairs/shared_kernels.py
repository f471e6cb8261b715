"""Triton kernels and launchers for the pairwise wMSE with one ``(C, C)`` matrix ``M`` shared by
every row: ``w[b, j, k] = M[j, k]``, over the classes present in the row (neither logit ``-inf``;
``in_j``).

``d = t - s`` is held as an exact pair ``hi + lo`` (TwoSum; float32, float64 for float64 logits
with ``"ieee"``), 0 on absent classes. With ``S = M + M^T`` (symmetrised tile by tile as it is
loaded, no copy) and the pair differences
``delta_nk = (hi_n - hi_k) + (lo_n - lo_k)`` (exact where the two are within a factor of 2, which
is what keeps a cluster of classes at a common offset exact):

    g_n    = sum_k S[n, k] in_n in_k delta_nk,   d wmse_b / d d_n = 2 g_n
    wmse_b = (1/2) sum_{n,k} S[n, k] in_n in_k delta_nk^2,   weight sum (1/2) sum S in_n in_k

``dot_precision="ieee"`` (default) sums these products directly, tile by tile of
``BLOCK_B x BLOCK_K x BLOCK_C`` (rows, reduction classes, output classes) on the FMA units:
``6 B C^2`` FLOPs forward, ``4 B C^2`` backward, no cancellation. ``"tf32x3"`` / ``"tf32"`` use the
matrix units (``tl.dot``) through the expansion ``g = deg d - D S`` with ``deg = in S`` and ``wmse =
sum_n d_n g_n`` on ``d = hi``: ``4 B C^2`` FLOPs per pass on tensor cores, but the products are of
the size of ``d``, not of the differences, so the error is relative to ``max |d|`` (a cluster at
offset ``c`` from the rest loses ``c / spread``), on top of tf32's own rounding (``"tf32"``: 10
mantissa bits; ``"tf32x3"`` about float32).

Bytes from DRAM per pass: the logits ``s``, ``t`` once (``2 B C`` elements; the ``k`` tiles are
re-read from L2 once per output tile), ``M`` once when it fits in L2 (``C^2`` elements, read as
``M`` and as ``M^T`` by each row tile), forward ``8 B C / BLOCK_C`` bytes of float32 partial sums,
backward the gradients (``B C`` elements each). Nothing of size ``B x C x C`` exists.
"""

import torch
import triton
import triton.language as tl

from gkl_kernels.buffers import empty_gradients
from gkl_kernels.core.config import MIN_DOT_BLOCK, compute_dtype
from gkl_kernels.core.kernels import (NEG_INF, POS_INF, accumulator, load_row_stats, option,
                                      row_flags, softmax_difference, store_column_parts,
                                      store_gradients, tile_cross_entropy, two_sum)
from gkl_kernels.pairs.loss_terms import (loss_arguments, loss_flags, loss_scalars,
                                          pair_loss_coefficients, part_planes, part_scalars)

MAX_BLOCK_ROWS = 64
MAX_BLOCK_ROWS_FLOAT64 = 32  # float64 tiles of 64 rows spill
MAX_DOT_BLOCK_ROWS = 16
MAX_BLOCK_CLASSES = 32
DIRECT_TILE = 4096  # elements of one BLOCK_B x BLOCK_K x BLOCK_C product of the direct sums


def pick_shared_blocks(batch, num_classes, block_c=None, dot_precision="ieee",
                       dtype=torch.float32):
    """``(BLOCK_B, BLOCK_C)``: rows per tile (a power of two in ``[16, 64]``; at most 32 for
    float64 arithmetic, ``dtype``; 16 for the ``tl.dot`` precisions, whose two products per step
    need the registers) and output classes per tile (in ``[16, 32]``, or ``block_c``)."""
    most_rows = MAX_BLOCK_ROWS if dot_precision == "ieee" else MAX_DOT_BLOCK_ROWS
    if dtype == torch.float64:
        most_rows = min(most_rows, MAX_BLOCK_ROWS_FLOAT64)
    block_b = min(max(triton.next_power_of_2(batch), MIN_DOT_BLOCK), most_rows)
    if block_c is None:
        block_c = min(max(triton.next_power_of_2(num_classes), MIN_DOT_BLOCK), MAX_BLOCK_CLASSES)
    return block_b, block_c


def reduction_block(block_b, block_c, dot_precision, dtype=torch.float32):
    """Reduction classes ``k`` per step: ``block_c`` for ``tl.dot``; for the direct sums as many
    as keep the ``BLOCK_B x BLOCK_K x BLOCK_C`` products at ``DIRECT_TILE`` elements (half that
    in float64; at least 2)."""
    if dot_precision != "ieee":
        return block_c
    elements = DIRECT_TILE // 2 if dtype == torch.float64 else DIRECT_TILE
    return max(2, min(block_c, elements // (block_b * block_c)))


def shared_launch_options(block_b, block_c, dtype=torch.float32):
    """``num_warps`` and ``num_stages`` for a tile: from 1024 elements per tile (in float64 also
    from 32 rows) 8 warps and no software pipelining, the choices under which every tile compiles
    without register spills for sm_80 and sm_90a (``python -m tools.compile_report``)."""
    wide = block_b * block_c >= 1024 or (dtype == torch.float64 and block_b >= 32)
    return dict(num_warps=8 if wide else 4, num_stages=1 if wide else 3)


@triton.jit
def present_difference_pairs(s_ptr, t_ptr, rows, row_mask, cols, C, s_stride_b, s_stride_c,
                             t_stride_b, t_stride_c, ACC: tl.constexpr):
    """``(s, t, in, hi, lo)`` on ``rows x cols`` (int64 indices): the logits in ``ACC``
    (``-inf`` outside the matrix and on rows not read), the present classes (neither logit
    ``-inf``) and ``t - s = hi + lo`` there, 0 elsewhere."""
    mask = row_mask[:, None] & (cols[None, :] < C)
    s = tl.load(s_ptr + rows[:, None] * s_stride_b + cols[None, :] * s_stride_c, mask=mask,
                other=NEG_INF).to(ACC)
    t = tl.load(t_ptr + rows[:, None] * t_stride_b + cols[None, :] * t_stride_c, mask=mask,
                other=NEG_INF).to(ACC)
    present = (s != NEG_INF) & (t != NEG_INF)
    hi, lo = two_sum(t, -s)
    return s, t, present, tl.where(present, hi, 0.0), tl.where(present, lo, 0.0)


@triton.jit
def _output_tile(s_ptr, t_ptr, labels_ptr, B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c,
                 ignore_index, HAS_LABELS: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """This program's tile: rows ``BLOCK_B * pid0 ..`` and those that are read (inside the batch,
    label not ``ignore_index``), output classes ``n = BLOCK_C * pid1 ..``, and
    ``present_difference_pairs`` on them."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    if HAS_LABELS:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
        row_mask = row_mask & (labels != ignore_index)
    n_cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    s, t, in_n, hi_n, lo_n = present_difference_pairs(s_ptr, t_ptr, rows, row_mask, n_cols, C,
                                                      s_stride_b, s_stride_c, t_stride_b,
                                                      t_stride_c, ACC)
    return rows, row_mask, n_cols, s, t, in_n, hi_n, lo_n


@triton.jit
def _shared_pair_sums(
    s_ptr, t_ptr, m_ptr, rows, row_mask, n_cols, in_n, hi_n, lo_n, C, s_stride_b, s_stride_c,
    t_stride_b, t_stride_c, m_stride_j, m_stride_k, FORWARD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """The sums over the reduction classes ``k`` for the output tile ``n_cols`` of ``rows``:
    ``(g, wmse, weight, invalid)`` in ``ACC``: ``g_n`` ``(BLOCK_B, BLOCK_C)`` (backward; forward
    it is not formed), the tile's parts of ``wmse_b`` and of the weight sum ``(BLOCK_B,)``
    (forward) and a flag, 1 where a weight read was negative, inf or NaN; 0 on rows not read."""
    n_in = n_cols < C
    if DOT_PRECISION == "ieee":
        # kept in the products' (BLOCK_B, BLOCK_K, BLOCK_C) layout: no conversion per step
        g = tl.zeros((BLOCK_B, 1, BLOCK_C), dtype=ACC)
        square = tl.zeros((BLOCK_B, 1, BLOCK_C), dtype=ACC)  # sum_k S delta^2
        weight = tl.zeros((BLOCK_B, 1, BLOCK_C), dtype=ACC)  # sum_k S in_k (degree)
    else:
        g = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
        weight = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
    invalid = tl.max(tl.zeros((BLOCK_C,), dtype=ACC), axis=0)
    for k0 in range(0, C, BLOCK_K):
        k_cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        _, _, in_k, hi_k, lo_k = present_difference_pairs(s_ptr, t_ptr, rows, row_mask, k_cols,
                                                          C, s_stride_b, s_stride_c, t_stride_b,
                                                          t_stride_c, ACC)
        m_mask = (k_cols[:, None] < C) & n_in[None, :]
        m_kn = tl.load(m_ptr + k_cols[:, None] * m_stride_j + n_cols[None, :] * m_stride_k,
                       mask=m_mask, other=0.0).to(ACC)
        # the programs of one row tile read every entry once as M[k, n]: check them there
        invalid = tl.maximum(invalid, tl.max(tl.max(
            tl.where((m_kn >= 0.0) & (m_kn < POS_INF), 0.0, 1.0), axis=1), axis=0))
        pair = m_kn + tl.load(m_ptr + n_cols[None, :] * m_stride_j + k_cols[:, None] * m_stride_k,
                              mask=m_mask, other=0.0).to(ACC)  # S[k, n]
        if DOT_PRECISION == "ieee":
            both = in_k[:, :, None] & in_n[:, None, :]
            w = tl.where(both, pair[None, :, :], 0.0)  # (BLOCK_B, BLOCK_K, BLOCK_C)
            delta = (hi_n[:, None, :] - hi_k[:, :, None]) + (lo_n[:, None, :] - lo_k[:, :, None])
            w_delta = w * delta
            if FORWARD:
                square += tl.sum(w_delta * delta, axis=1, keep_dims=True)
                weight += tl.sum(w, axis=1, keep_dims=True)
            else:
                g += tl.sum(w_delta, axis=1, keep_dims=True)
        else:
            # the present mask as a float32 operand (an i1 cast is no dot operand on triton 3.2)
            weight = tl.dot(tl.where(in_k, 1.0, 0.0), pair, weight,
                            input_precision=DOT_PRECISION)
            g = tl.dot(hi_k, pair, g, input_precision=DOT_PRECISION)
    if DOT_PRECISION == "ieee":
        g = tl.sum(g, axis=1)
        square = tl.sum(tl.sum(square, axis=2), axis=1)
        weight = tl.sum(tl.sum(weight, axis=2), axis=1)
    else:
        g = tl.where(in_n, hi_n * weight - g, 0.0)
        weight = tl.sum(tl.where(in_n, weight, 0.0), axis=1)
        square = tl.sum(2.0 * hi_n * g, axis=1)  # wmse = sum_n d_n g_n
    return g, 0.5 * square, 0.5 * weight, invalid


@triton.jit
def wmse_shared_fwd_kernel(
    s_ptr, t_ptr, m_ptr, labels_ptr, parts_ptr,
    B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, m_stride_j, m_stride_k, ignore_index,
    num_labels, inv_t_hi, inv_t_lo, LOSS: tl.constexpr, HAS_LABELS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Grid ``(cdiv(B, BLOCK_B), P = cdiv(C, BLOCK_C))``: part ``pid1`` of each of its rows
    (``config.PART_*``, ``ACC`` ``(NUM_PART_PLANES, P, B)``): this tile's parts of ``wmse_b`` and
    of the row's weight sum and, ``LOSS``, a flag for an invalid weight read (negative, inf,
    NaN), the cross-entropy statistics of the tile's columns, the row's kept and label-error
    flags. Float options as ``float32_pair``s."""
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    rows, row_mask, n_cols, s, t, in_n, hi_n, lo_n = _output_tile(
        s_ptr, t_ptr, labels_ptr, B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c,
        ignore_index, HAS_LABELS, BLOCK_B, BLOCK_C, ACC)
    _, square, weight, invalid = _shared_pair_sums(
        s_ptr, t_ptr, m_ptr, rows, row_mask, n_cols, in_n, hi_n, lo_n, C, s_stride_b,
        s_stride_c, t_stride_b, t_stride_c, m_stride_j, m_stride_k, True, BLOCK_B, BLOCK_C,
        BLOCK_K, DOT_PRECISION, ACC)
    ms, zs, mt, zt, a = tile_cross_entropy(s, t, inv_t, 1)  # after the loop: not live there
    in_batch = rows < B
    kept, bad = row_flags(labels_ptr, rows, in_batch, ignore_index, num_labels, HAS_LABELS)
    store_column_parts(parts_ptr, tl.program_id(1).to(tl.int64) * B + rows,
                     tl.num_programs(1).to(tl.int64) * B, in_batch, square, weight,
                     tl.zeros((BLOCK_B,), dtype=ACC) + invalid, ms, zs, mt, zt, a, kept,
                     bad, LOSS)


@triton.jit
def wmse_shared_bwd_kernel(
    s_ptr, t_ptr, m_ptr, labels_ptr, stats_ptr, totals_ptr, grad_ptr, ds_ptr, dt_ptr,
    B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, m_stride_j, m_stride_k, grad_stride,
    ignore_index, inv_t_hi, inv_t_lo, mse_weight_hi, mse_weight_lo, ce_weight_hi,
    ce_weight_lo,
    LOSS: tl.constexpr, HAS_LABELS: tl.constexpr, WITH_CE: tl.constexpr,
    NORMALIZE_BATCH: tl.constexpr, SYMMETRIC: tl.constexpr, NEED_DS: tl.constexpr,
    NEED_DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Same grid, on the tile (contiguous ``(B, C)`` outputs in the inputs' dtypes, 0 on absent
    classes and on rows not read): ``dt = c_b g``, ``ds = -[SYMMETRIC] c_b g + [LOSS] g_ce (q -
    p)``, with ``grad_b = grad[b * grad_stride]`` (0-dim or one per row). ``LOSS``: ``grad`` is the
    loss's gradient, ``c_b`` and ``g_ce`` come from the rows' statistics and the totals
    (``pair_loss_coefficients``); else ``grad`` is the gradient of the rows' wMSE and ``c_b = 2
    grad_b``. Float options as ``float32_pair``s."""
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    mse_weight = option(mse_weight_hi, mse_weight_lo, ACC)
    ce_weight = option(ce_weight_hi, ce_weight_lo, ACC)
    rows, row_mask, n_cols, s, t, in_n, hi_n, lo_n = _output_tile(
        s_ptr, t_ptr, labels_ptr, B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c,
        ignore_index, HAS_LABELS, BLOCK_B, BLOCK_C, ACC)
    in_batch = rows < B
    g, _, _, _ = _shared_pair_sums(
        s_ptr, t_ptr, m_ptr, rows, row_mask, n_cols, in_n, hi_n, lo_n, C, s_stride_b,
        s_stride_c, t_stride_b, t_stride_c, m_stride_j, m_stride_k, False, BLOCK_B, BLOCK_C,
        BLOCK_K, DOT_PRECISION, ACC)
    # the rows' statistics after the loop: nothing of them is live in it
    grad = tl.load(grad_ptr + rows * grad_stride, mask=in_batch, other=0.0).to(ACC)
    if LOSS:
        (ms, zs, mt, zt, a, z_w, scale, weight, ph, pl, m2, kept,
         err, dm) = load_row_stats(stats_ptr, rows, in_batch)
        coef, coef_ce = pair_loss_coefficients(kept, totals_ptr, grad, mse_weight, ce_weight,
                                               inv_t, NORMALIZE_BATCH)
    else:
        coef = 2.0 * grad
    g_d = coef[:, None] * g
    mask = in_batch[:, None] & (n_cols[None, :] < C)
    offsets = rows[:, None] * C + n_cols[None, :]
    ce_grad = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC)
    if LOSS and WITH_CE and NEED_DS:
        s, t, _, _, _ = present_difference_pairs(s_ptr, t_ptr, rows, row_mask, n_cols, C,
                                                 s_stride_b, s_stride_c, t_stride_b, t_stride_c,
                                                 ACC)
        ce_grad = coef_ce[:, None] * softmax_difference(s, t, ms[:, None], zs[:, None],
                                                        mt[:, None], zt[:, None], inv_t)
    store_gradients(ds_ptr, dt_ptr, offsets, mask, g_d, ce_grad, SYMMETRIC, NEED_DS, NEED_DT)


def _launch_args(student, teacher, weights):
    batch, num_classes = student.shape
    return (batch, num_classes, student.stride(0), student.stride(1), teacher.stride(0),
            teacher.stride(1), weights.stride(0), weights.stride(1))


def shared_rows_forward(student, teacher, weights, dot_precision="ieee", block_c=None,
                        labels=None, config=None):
    """``parts`` ``(planes, P, B)`` in ``compute_dtype`` (``config.PART_*``) for shared
    ``(C, C)`` pair weights; rows labelled ``config.ignore_index`` are not read (``config``: the
    loss's options, for the cross-entropy's temperature and the labels; None: the wMSE and weight
    sums alone, ``part_planes``)."""
    batch, num_classes = student.shape
    dtype = compute_dtype(student, teacher)
    block_b, block = pick_shared_blocks(batch, num_classes, block_c, dot_precision, dtype)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(num_classes, block))
    parts = torch.empty(part_planes(config), grid[1], batch, dtype=dtype, device=student.device)
    wmse_shared_fwd_kernel[grid](
        student, teacher, weights, student if labels is None else labels, parts,
        *_launch_args(student, teacher, weights), *part_scalars(config, num_classes),
        LOSS=config is not None, HAS_LABELS=labels is not None,
        BLOCK_B=block_b, BLOCK_C=block,
        BLOCK_K=reduction_block(block_b, block, dot_precision, dtype),
        DOT_PRECISION=dot_precision, ACC=accumulator(dtype),
        **shared_launch_options(block_b, block, dtype))
    return parts


def shared_rows_backward(grad, student, teacher, weights, need_ds, need_dt, dot_precision="ieee",
                         block_c=None, loss=None):
    """``(grad_student, grad_teacher)`` of the shared wMSE, each ``(B, C)`` in its input's dtype
    or an empty tensor when not needed. ``loss``: ``PairLossTerms`` of the loss's gradient
    (``grad`` 0-dim), else ``grad`` is the (B,) gradient of the rows' wMSE."""
    batch, num_classes = student.shape
    ds, dt = empty_gradients(student, teacher, need_ds, need_dt)
    dtype = compute_dtype(student, teacher)
    block_b, block = pick_shared_blocks(batch, num_classes, block_c, dot_precision, dtype)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(num_classes, block))
    wmse_shared_bwd_kernel[grid](
        student, teacher, weights, *loss_arguments(loss, student, grad),
        ds if need_ds else student, dt if need_dt else teacher,
        *_launch_args(student, teacher, weights), grad.stride(0) if grad.dim() else 0,
        *loss_scalars(loss), NEED_DS=need_ds, NEED_DT=need_dt, BLOCK_B=block_b, BLOCK_C=block,
        BLOCK_K=reduction_block(block_b, block, dot_precision, dtype),
        DOT_PRECISION=dot_precision, ACC=accumulator(dtype), **loss_flags(loss),
        **shared_launch_options(block_b, block, dtype))
    return ds, dt
