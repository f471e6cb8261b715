"""Triton kernels and launchers of the GKL loss with rank-one pair weights ``w[b,j,k] = v_j v_k``.

Per row (docs/SPEC.md's O(C) form), ``d = t - s``, ``W = sum_j v_j``, ``mu = sum_j v_j d_j / W``:

    wmse_b = 2 W sum_j v_j (d_j - mu)^2          d wmse_b / d d_j = 4 W v_j (d_j - mu)
    ce_b   = sum_j p_j (lse(s/T) - s_j/T),        p = softmax(t/T)

Three kernels, one launch each: ``row_stats_kernel`` (one program per row, one pass over its
tiles) writes the mergeable statistics of ``core/config.py``; the core's ``finish_loss_kernel``
(one program) reduces them over the rows to the loss and the batch totals;
``loss_backward_kernel`` (one program per row, one more pass) writes the logits' gradients from
the incoming gradient, the totals and the row's statistics.

Exactness in float32: softmaxes relative to running maxima; ``d`` as the exact pair ``hi + lo``
(TwoSum), so per-row offsets cost nothing; per tile the mean as the heaviest class's exact ``d``
plus a corrected weighted offset from it (so a dominant class's deviation is its own small
number, not a difference of rounded means); tiles merged by Chan's rule anchored on the heavier
side; the factor scaled by ``2^-L`` (its largest entry's
exponent, or the teacher's running maximum) and the batch normaliser kept as ``DEN 2^(2K)``;
the softmax normalisers as their rests ``z - 1`` (no ``1 + x`` rounded: peaked rows), the loss
with ``log1p``, and ``q - p`` where both logits are maximal as ``(rest_t - rest_s) / (z_s z_t)``.
Classes with ``s_j = -inf`` or ``t_j = -inf`` are left out of the wMSE; ``t_j = -inf`` gives
``p_j = 0``; masked-off lanes are loaded as ``-inf`` and so are absent. Rows whose label is
``ignore_index`` are never read and get a zero gradient.

Bytes per step, in ``B x C`` transfers: forward reads ``s``, ``t`` (2); backward reads ``s``, ``t``
and writes ``grad s`` (3; +1 for ``grad t``); an explicit factor or gathered prior rows add one
read per pass. Per row, 16 floats are written forward and read backward.
"""

import torch
import triton
import triton.language as tl

from gkl_kernels.buffers import empty_gradients
from gkl_kernels.core.config import NUM_STATS, compute_dtype
from gkl_kernels.core.kernels import (LOG2E, NEG_INF, POS_INF, accumulator, finish_row,
                                      finite_ref, load_row_stats, merge_cross_entropy, option,
                                      rescale, row_flags, softmax_difference, store_gradients,
                                      store_row_stats, tile_cross_entropy, two_sum)

MAX_BLOCK_C = 4096
MAX_BLOCK_C_FLOAT64 = 2048  # float64 tiles of 4096 spill (sm_90a)


def pick_block_c(num_classes, block_c=0, dtype=torch.float32):
    """Columns per tile: the whole row up to ``MAX_BLOCK_C`` (``MAX_BLOCK_C_FLOAT64`` when the
    statistics' ``dtype`` is float64; a power of two), else tiles of it."""
    if block_c:
        return block_c
    widest = MAX_BLOCK_C_FLOAT64 if dtype == torch.float64 else MAX_BLOCK_C
    return min(triton.next_power_of_2(num_classes), widest)


def pick_num_warps(block_c):
    """Warps per program: 8 elements per thread, at most 8 warps (tiles up to 2048 columns; 16
    elements per thread at 4096)."""
    return max(1, min(8, block_c // 256))


@triton.jit
def merge_moments(f_a, w_a, ph_a, pl_a, dm_a, m2_a, f_b, w_b, ph_b, pl_b, dm_b, m2_b):
    """Weight, mean and M2 of two parts, part ``x``'s weights rescaled by ``f_x``; a mean is a
    pivot pair plus an offset, ``(ph + pl) + dm``. Chan's rule, anchored on the heavier part: its
    pivot is kept and the offset moves by the lighter part's share."""
    w_a = w_a * f_a
    w_b = w_b * f_b
    weight = w_a + w_b
    a_heavy = w_a >= w_b
    ph = tl.where(a_heavy, ph_a, ph_b)
    pl = tl.where(a_heavy, pl_a, pl_b)
    dm = tl.where(a_heavy, dm_a, dm_b)
    w_heavy = tl.where(a_heavy, w_a, w_b)
    w_light = tl.where(a_heavy, w_b, w_a)
    delta = ((tl.where(a_heavy, ph_b, ph_a) - ph) + (tl.where(a_heavy, pl_b, pl_a) - pl)) + \
        (tl.where(a_heavy, dm_b, dm_a) - dm)
    frac = w_light / tl.where(weight == 0.0, 1.0, weight)
    spread = tl.where(w_light == 0.0, 0.0, delta * delta * w_heavy * frac)
    dm = dm + tl.where(w_light == 0.0, 0.0, delta * frac)
    return weight, ph, pl, dm, m2_a * f_a + m2_b * f_b + spread


@triton.jit
def moment_factors(mt_a, l_a, mt_b, l_b, gamma_t2, SOURCE: tl.constexpr):
    """``(scale, f_a, f_b)``: the merged factor scale and each part's rescaling to it; teacher
    weights are relative to the teacher maximum (``f = exp(gamma (m_t,x - m_t) / T2)``), given
    weights to ``2^L``."""
    if SOURCE == 0:
        mt = tl.maximum(mt_a, mt_b)
        f_a = tl.where(mt_a != NEG_INF, tl.exp2((mt_a - mt) * gamma_t2), 0.0)
        f_b = tl.where(mt_b != NEG_INF, tl.exp2((mt_b - mt) * gamma_t2), 0.0)
        return l_a, f_a, f_b
    scale = tl.maximum(l_a, l_b)
    f_a = tl.where(l_a != NEG_INF, tl.exp2(l_a - scale), 0.0)
    f_b = tl.where(l_b != NEG_INF, tl.exp2(l_b - scale), 0.0)
    return scale, f_a, f_b


@triton.jit
def _difference(s, t, in_wmse):
    """``d = t - s`` as the exact pair ``(hi, lo)``, 0 outside the wMSE's classes."""
    hi, lo = two_sum(t, -s)
    return tl.where(in_wmse, hi, 0.0), tl.where(in_wmse, lo, 0.0)


@triton.jit
def _tile_moments(v, hi, lo, in_wmse, BLOCK_C: tl.constexpr):
    """``(W, ph, pl, dm, M2)`` of one tile: the mean as the heaviest class's ``d`` (exact pair)
    plus the weighted mean offset from it, corrected once; M2 about that mean."""
    weight = tl.sum(v, axis=0)
    safe = tl.where(weight == 0.0, 1.0, weight)
    heaviest = tl.arange(0, BLOCK_C) == tl.argmax(v, axis=0)
    ph = tl.sum(tl.where(heaviest, hi, 0.0), axis=0)
    pl = tl.sum(tl.where(heaviest, lo, 0.0), axis=0)
    dev = tl.where(in_wmse, (hi - ph) + (lo - pl), 0.0)
    rough = tl.sum(v * dev, axis=0) / safe
    dev = tl.where(in_wmse, dev - rough, 0.0)
    residual = tl.sum(v * dev, axis=0) / safe
    dev = dev - residual
    return weight, ph, pl, rough + residual, tl.sum(v * dev * dev, axis=0)


@triton.jit
def _given_factor(v_row, cols, mask, gamma, SOURCE: tl.constexpr, ACC: tl.constexpr):
    """The given weights on one tile in ``ACC``, ``p ** gamma`` for a prior row (``0 ** 0 = 1``)
    or ``v``, and whether each entry is finite and >= 0."""
    raw = tl.load(v_row + cols, mask=mask, other=0.0).to(ACC)
    valid = ((raw >= 0.0) & (raw < POS_INF)) | (mask == 0)
    if SOURCE == 1:
        raw = tl.where(raw > 0.0, tl.exp2(gamma * tl.log2(raw)),
                       tl.where(gamma == 0.0, 1.0, 0.0))
    return raw, valid


@triton.jit
def _scaled_factor(t, raw, in_wmse, mt, scale, gamma_t2, SOURCE: tl.constexpr):
    """``v'`` on one tile, 0 outside the wMSE's classes: ``exp(gamma (t - m_t) / T2)`` for the
    teacher, ``v 2^-L`` for given weights."""
    if SOURCE == 0:
        v = tl.exp2((t - finite_ref(mt)) * gamma_t2)
    else:
        v = raw * tl.exp2(-finite_ref(scale))
    return tl.where(in_wmse, v, 0.0)


@triton.jit
def _row_start(labels_ptr, row, num_labels, ignore_index, HAS_LABELS: tl.constexpr):
    """``(kept, label error, label)`` of one row: kept unless its label is ``ignore_index``, an
    error when a kept label is outside ``[0, num_labels)`` (the label is then 0)."""
    kept, bad = row_flags(labels_ptr, row, row >= 0, ignore_index, num_labels, HAS_LABELS)
    label = row * 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
    return kept, bad, tl.where(bad | (kept == 0), 0, label)


@triton.jit
def _load_tile(s_row, t_row, c0, C, live_cols, s_stride_c, t_stride_c, BLOCK_C: tl.constexpr,
               ACC: tl.constexpr):
    """Columns ``c0 ..`` (int64) of s and t in ``ACC``, ``-inf`` outside ``[0, live_cols)`` (C,
    or 0 for a row that is not read), the row's lane mask, the loaded lanes, and the wMSE's
    classes (both logits > -inf)."""
    cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
    load = cols < live_cols
    s = tl.load(s_row + cols * s_stride_c, mask=load, other=NEG_INF).to(ACC)
    t = tl.load(t_row + cols * t_stride_c, mask=load, other=NEG_INF).to(ACC)
    return cols, cols < C, load, s, t, (s != NEG_INF) & (t != NEG_INF)


@triton.jit
def row_stats_kernel(
    s_ptr, t_ptr, v_ptr, labels_ptr, stats_ptr,
    C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, v_stride_b, v_stride_c,
    gamma_hi, gamma_lo, inv_t_hi, inv_t_lo, inv_t2_hi, inv_t2_lo, ignore_index, num_labels,
    SOURCE: tl.constexpr, WITH_CE: tl.constexpr, HAS_LABELS: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """One program per row: ``stats[b, :]`` (``config.STAT_*``) over the row's columns, computed
    in ``ACC`` (float32; float64 for float64 logits). ``v_ptr`` is the explicit (B, C) factor,
    the (C, C) prior (row of the label) or unused; the float options as ``config.float32_pair``s."""
    gamma = option(gamma_hi, gamma_lo, ACC)
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    inv_t2 = option(inv_t2_hi, inv_t2_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    kept, bad_label, label = _row_start(labels_ptr, row, num_labels, ignore_index, HAS_LABELS)
    live = kept & (bad_label == 0)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    if SOURCE == 1:
        v_row = v_ptr + label * v_stride_b
    else:
        v_row = v_ptr + row * v_stride_b
    gamma_t2 = gamma * inv_t2 * LOG2E
    zero = tl.sum(tl.zeros([BLOCK_C], dtype=ACC), axis=0)
    ms = zero + NEG_INF
    zs = zero - 1.0  # normaliser rests z - 1: -1 while empty
    mt = zero + NEG_INF
    zt = zero - 1.0
    a = zero
    z_w = zero
    scale = zero + NEG_INF
    weight = zero
    ph = zero
    pl = zero
    dm = zero
    m2 = zero
    bad_weight = row < 0
    live_cols = tl.where(live, C, 0)
    for c0 in range(0, live_cols, BLOCK_C):
        cols, mask, load, s, t, in_wmse = _load_tile(s_row, t_row, c0, C, live_cols, s_stride_c,
                                                     t_stride_c, BLOCK_C, ACC)
        mt_tile = tl.max(t, axis=0)
        if SOURCE < 3:  # rank-one weights (pairs: the wMSE is the pair kernels')
            if SOURCE == 0:
                raw = t
                scale_tile = scale
                z_w_tile = tl.sum(tl.exp((t - finite_ref(mt_tile)) * inv_t2), axis=0)
                z_w = z_w * rescale(mt, tl.maximum(mt, mt_tile), inv_t2) + \
                    z_w_tile * rescale(mt_tile, tl.maximum(mt, mt_tile), inv_t2)
            else:
                raw, valid = _given_factor(v_row, cols * v_stride_c, mask, gamma, SOURCE, ACC)
                bad_weight = bad_weight | (tl.min(valid.to(tl.int32), axis=0) == 0)
                top = tl.max(tl.where(in_wmse & (raw < POS_INF), raw, 0.0), axis=0)
                scale_tile = tl.where(top > 0.0, tl.floor(tl.log2(top)), NEG_INF)
            v = _scaled_factor(t, raw, in_wmse, mt_tile, scale_tile, gamma_t2, SOURCE)
            hi, lo = _difference(s, t, in_wmse)
            w_tile, ph_tile, pl_tile, dm_tile, m2_tile = _tile_moments(v, hi, lo, in_wmse,
                                                                       BLOCK_C)
            scale, f_old, f_tile = moment_factors(mt, scale, mt_tile, scale_tile, gamma_t2,
                                                  SOURCE)
            weight, ph, pl, dm, m2 = merge_moments(f_old, weight, ph, pl, dm, m2, f_tile, w_tile,
                                                   ph_tile, pl_tile, dm_tile, m2_tile)
        if WITH_CE:
            ms_tile, zs_tile, mt_tile, zt_tile, a_tile = tile_cross_entropy(s, t, inv_t, 0)
            ms, zs, mt, zt, a = merge_cross_entropy(ms, zs, mt, zt, a, ms_tile, zs_tile, mt_tile,
                                                    zt_tile, a_tile, inv_t)
        else:
            mt = tl.maximum(mt, mt_tile)
    error = tl.where(bad_label, 1.0, 0.0) + tl.where(bad_weight, 2.0, 0.0)
    store_row_stats(stats_ptr, row, row >= 0, ms, zs, mt, zt, a, z_w, scale, weight, ph, pl, m2,
                    tl.where(kept, 1.0, 0.0), error, dm)


@triton.jit
def loss_backward_kernel(
    s_ptr, t_ptr, v_ptr, labels_ptr, stats_ptr, totals_ptr, grad_loss_ptr, ds_ptr, dt_ptr,
    C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, v_stride_b, v_stride_c, grad_stride,
    gamma_hi, gamma_lo, inv_t_hi, inv_t_lo, inv_t2_hi, inv_t2_lo, mse_weight_hi, mse_weight_lo,
    ce_weight_hi, ce_weight_lo,
    SOURCE: tl.constexpr, WITH_CE: tl.constexpr, WITH_WMSE: tl.constexpr,
    NORMALIZE_BATCH: tl.constexpr, SYMMETRIC: tl.constexpr, NEED_DS: tl.constexpr,
    NEED_DT: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """One program per row (in ``ACC``): ``dt = g_d``, ``ds = g_ce (q - p) - [SYMMETRIC] g_d`` with
    ``g_d = (dL/dwmse_b) 4 W v (d - mu)``, ``q = softmax(s/T)``, ``p = softmax(t/T)``, scaled by
    the incoming gradient (``grad_loss[b * grad_stride]``: 0-dim, or one per row). Ignored rows:
    zeros, logits unread."""
    gamma = option(gamma_hi, gamma_lo, ACC)
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    inv_t2 = option(inv_t2_hi, inv_t2_lo, ACC)
    mse_weight = option(mse_weight_hi, mse_weight_lo, ACC)
    ce_weight = option(ce_weight_hi, ce_weight_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    (ms, zs, mt, zt, a, z_w, scale, weight, ph, pl, m2, kept,
     err, dm) = load_row_stats(stats_ptr, row, row >= 0)
    live = kept > 0.0
    exponent, wmse, ce = finish_row(zs, zt, a, z_w, scale, weight, m2, gamma, inv_t, SOURCE)
    grad = tl.load(grad_loss_ptr + row * grad_stride).to(ACC)
    rows_kept = tl.maximum(tl.load(totals_ptr + 2), 1.0)
    coef_ce = tl.where(live, grad * ce_weight * inv_t / rows_kept, 0.0)
    coef_d = coef_ce * 0.0
    if WITH_WMSE:
        top = tl.load(totals_ptr + 0)
        den = tl.load(totals_ptr + 1)
        f = tl.exp2(tl.where(weight != 0.0, exponent, top) - top)
        if NORMALIZE_BATCH:
            norm = 1.0 / rows_kept
        else:
            norm = tl.where(den != 0.0, 1.0 / tl.where(den != 0.0, den, 1.0), 0.0)
        coef_d = tl.where(live & (weight != 0.0), grad * mse_weight * norm * (f * weight) * f,
                          0.0)
    if SOURCE == 1:
        label = tl.load(labels_ptr + row).to(tl.int64)
        v_row = v_ptr + tl.where(live & (label >= 0), label, 0) * v_stride_b
    else:
        v_row = v_ptr + row * v_stride_b
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    gamma_t2 = gamma * inv_t2 * LOG2E
    live_cols = tl.where(live, C, 0)
    for c0 in range(0, C, BLOCK_C):
        cols, mask, load, s, t, in_wmse = _load_tile(s_row, t_row, c0, C, live_cols, s_stride_c,
                                                     t_stride_c, BLOCK_C, ACC)
        g_d = tl.zeros([BLOCK_C], dtype=ACC)
        if WITH_WMSE:
            raw = t
            if SOURCE != 0:
                raw, valid = _given_factor(v_row, cols * v_stride_c, load, gamma, SOURCE, ACC)
            v = _scaled_factor(t, raw, in_wmse, mt, scale, gamma_t2, SOURCE)
            hi, lo = _difference(s, t, in_wmse)
            g_d = tl.where(in_wmse, coef_d * v * (((hi - ph) + (lo - pl)) - dm), 0.0)
        ce_grad = tl.zeros([BLOCK_C], dtype=ACC)
        if WITH_CE and NEED_DS:
            ce_grad = coef_ce * softmax_difference(s, t, ms, zs, mt, zt, inv_t)
        store_gradients(ds_ptr, dt_ptr, row * C + cols, mask, g_d, ce_grad, SYMMETRIC, NEED_DS,
                        NEED_DT)


# ------------------------------------------------------------------------------------ launchers


def _factor_args(config, factor, labels, like):
    """Pointer, strides of the factor operand and the labels pointer (``like`` when absent)."""
    labels_ptr = labels if labels is not None else like
    if factor is None:
        return like, 0, 0, labels_ptr
    return factor, factor.stride(0), factor.stride(1), labels_ptr


def row_stats(student, teacher, factor, labels, config):
    """Launch ``row_stats_kernel``: ``(B, NUM_STATS)`` in ``compute_dtype``."""
    batch, num_classes = student.shape
    stats = torch.empty(batch, NUM_STATS, dtype=compute_dtype(student, teacher),
                        device=student.device)
    v_ptr, v_sb, v_sc, labels_ptr = _factor_args(config, factor, labels, student)
    block = pick_block_c(num_classes, config.block_c, stats.dtype)
    options = config.kernel_options
    row_stats_kernel[(batch,)](
        student, teacher, v_ptr, labels_ptr, stats,
        num_classes, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        v_sb, v_sc, *options.gamma, *options.inv_t, *options.inv_t2, config.ignore_index,
        config.num_labels or num_classes, SOURCE=config.source, WITH_CE=config.with_ce,
        HAS_LABELS=config.has_labels, BLOCK_C=block, ACC=accumulator(stats.dtype),
        num_warps=pick_num_warps(block))
    return stats


def loss_backward(grad_loss, student, teacher, factor, labels, stats, totals, config, need_ds,
                  need_dt):
    """Launch ``loss_backward_kernel``: ``(grad_student, grad_teacher)``, each ``(B, C)`` in its
    input's dtype, or empty when not needed."""
    batch, num_classes = student.shape
    ds, dt = empty_gradients(student, teacher, need_ds, need_dt)
    v_ptr, v_sb, v_sc, labels_ptr = _factor_args(config, factor, labels, student)
    block = pick_block_c(num_classes, config.block_c, stats.dtype)
    options = config.kernel_options
    loss_backward_kernel[(batch,)](
        student, teacher, v_ptr, labels_ptr, stats, totals, grad_loss,
        ds if need_ds else student, dt if need_dt else teacher,
        num_classes, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        v_sb, v_sc, grad_loss.stride(0) if grad_loss.dim() else 0, *options.gamma,
        *options.inv_t, *options.inv_t2, *options.mse_weight, *options.ce_weight,
        SOURCE=config.source, WITH_CE=config.with_ce, WITH_WMSE=config.with_wmse,
        NORMALIZE_BATCH=config.normalize_batch, SYMMETRIC=config.symmetric, NEED_DS=need_ds,
        NEED_DT=need_dt, BLOCK_C=block, ACC=accumulator(stats.dtype),
        num_warps=pick_num_warps(block))
    return ds, dt
