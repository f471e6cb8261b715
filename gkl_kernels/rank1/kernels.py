"""Triton kernels and launchers of the GKL loss with rank-one pair weights ``w[b,j,k] = v_j v_k``.

Per row (docs/SPEC.md's O(C) form), ``d = t - s``, ``W = sum_j v_j``, ``mu = sum_j v_j d_j / W``:

    wmse_b = 2 W sum_j v_j (d_j - mu)^2          d wmse_b / d d_j = 4 W v_j (d_j - mu)
    ce_b   = sum_j p_j (lse(s/T) - s_j/T),        p = softmax(t/T)

Three kernels, one launch each: ``row_stats_kernel`` (one program per row, one pass over its
tiles) writes the mergeable statistics of ``config.py``; ``finish_loss_kernel`` (one program)
reduces them over the rows to the loss and the batch totals; ``loss_backward_kernel`` (one
program per row, one more pass) writes the logits' gradients from the incoming gradient, the
totals and the row's statistics.

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

import struct

import torch
import triton
import triton.language as tl

from gkl_kernels.buffers import empty_gradients
from gkl_kernels.rank1.config import NUM_STATS, NUM_TOTALS, compute_dtype

MAX_BLOCK_C = 4096
MAX_BLOCK_C_FLOAT64 = 2048  # float64 tiles of 4096 spill (sm_90a)
FINISH_BLOCK_ROWS = 1024
LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))


def accumulator(dtype):
    """The kernels' ``ACC`` for statistics of torch ``dtype``: float64 or float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def float32_pair(x):
    """A float option as the float32 pair ``(hi, lo)`` with ``hi + lo = x`` to about 2^-48
    (``option`` in the kernels): Triton passes Python floats as float32, and the float64
    kernels need the option to float64 precision."""
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32: as float32 gives it
        return float("inf") if x > 0 else float("-inf"), 0.0
    return hi, x - hi


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


# ------------------------------------------------------------------------- exact float32 pieces


@triton.jit
def two_sum(a, b):
    """``(h, e)`` with ``h = fl(a + b)`` and ``h + e == a + b`` exactly."""
    h = a + b
    bb = h - a
    return h, (a - (h - bb)) + (b - bb)


@triton.jit
def option(hi, lo, ACC: tl.constexpr):
    """A float option in ``ACC`` from its ``float32_pair``."""
    value = hi
    if ACC == tl.float64:
        value = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    return value


@triton.jit
def _ref(m):
    """A running maximum as a finite reference point: ``m``, or 0 while it is ``-inf``."""
    return tl.where(m != NEG_INF, m, 0.0)


@triton.jit
def _rescale(m_part, m, inv_temperature):
    """``exp((m_part - m) / T)`` for ``m >= m_part``, 0 for an empty part (``m_part = -inf``)."""
    return tl.where(m_part != NEG_INF, tl.exp((m_part - m) * inv_temperature), 0.0)


@triton.jit
def merged_rest(rest_a, r_a, rest_b, r_b):
    """The normaliser rest ``z - 1`` of two parts rescaled by ``r_a``, ``r_b`` (one of them 1, or
    both 0 for two empty parts), with no ``1 + x`` formed: ``rest_a r_a + rest_b r_b + min(r_a,
    r_b) + (max(r_a, r_b) - 1)``."""
    return rest_a * r_a + rest_b * r_b + (tl.minimum(r_a, r_b) + (tl.maximum(r_a, r_b) - 1.0))


@triton.jit
def merge_cross_entropy(ms_a, zs_a, mt_a, zt_a, a_a, ms_b, zs_b, mt_b, zt_b, a_b, inv_t):
    """The cross-entropy statistics of two parts: maxima, normaliser rests ``z - 1``, and
    ``a = sum exp((t - m_t) / T) (ref(m_s) - s)``."""
    ms = tl.maximum(ms_a, ms_b)
    mt = tl.maximum(mt_a, mt_b)
    rt_a = _rescale(mt_a, mt, inv_t)
    rt_b = _rescale(mt_b, mt, inv_t)
    shift_a = tl.where(zt_a != -1.0, (zt_a + 1.0) * (_ref(ms) - _ref(ms_a)), 0.0)
    shift_b = tl.where(zt_b != -1.0, (zt_b + 1.0) * (_ref(ms) - _ref(ms_b)), 0.0)
    a = tl.where(rt_a != 0.0, rt_a * (a_a + shift_a), 0.0) + \
        tl.where(rt_b != 0.0, rt_b * (a_b + shift_b), 0.0)
    zs = merged_rest(zs_a, _rescale(ms_a, ms, inv_t), zs_b, _rescale(ms_b, ms, inv_t))
    return ms, zs, mt, merged_rest(zt_a, rt_a, zt_b, rt_b), a


@triton.jit
def _tile_rest(x, m, e, AXIS: tl.constexpr):
    """``sum e - 1`` along ``AXIS``, ``e = exp((x - m) / T)`` being 1 at the lanes where ``x`` is
    maximal: those counted apart from the other terms, so that ``1 + x`` is never rounded; -1 for
    an empty part (``m = -inf``)."""
    top = x == tl.expand_dims(m, AXIS)
    count = tl.sum(top.to(tl.int32), axis=AXIS)
    rest = tl.sum(tl.where(top, 0.0, e), axis=AXIS) + (count - 1).to(e.dtype)
    return tl.where(m != NEG_INF, rest, -1.0)


@triton.jit
def tile_cross_entropy(s, t, inv_t, AXIS: tl.constexpr):
    """``(m_s, z_s - 1, m_t, z_t - 1, a)``: the cross-entropy statistics of a tile's columns,
    reduced along ``AXIS`` (``-inf`` marks absent entries)."""
    ms = tl.max(s, axis=AXIS)
    mt = tl.max(t, axis=AXIS)
    ref_s = _ref(tl.expand_dims(ms, AXIS))
    e_t = tl.exp((t - _ref(tl.expand_dims(mt, AXIS))) * inv_t)
    a = tl.sum(tl.where(e_t != 0.0, e_t * (ref_s - s), 0.0), axis=AXIS)
    zt = _tile_rest(t, mt, e_t, AXIS)
    return ms, _tile_rest(s, ms, tl.exp((s - ref_s) * inv_t), AXIS), mt, zt, a


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
        v = tl.exp2((t - _ref(mt)) * gamma_t2)
    else:
        v = raw * tl.exp2(-_ref(scale))
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
    the (C, C) prior (row of the label) or unused; the float options as ``float32_pair``s."""
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
                z_w_tile = tl.sum(tl.exp((t - _ref(mt_tile)) * inv_t2), axis=0)
                z_w = z_w * _rescale(mt, tl.maximum(mt, mt_tile), inv_t2) + \
                    z_w_tile * _rescale(mt_tile, tl.maximum(mt, mt_tile), inv_t2)
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
def log1p(x):
    """``log(1 + x)``, exact to a few units also for tiny ``x``: ``log(u) x / (u - 1)``,
    ``u = fl(1 + x)`` (Goldberg's rewriting; ``x`` itself where ``u = 1``)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def finish_row(zs, zt, a, z_w, scale, weight, m2, gamma, inv_t, SOURCE: tl.constexpr):
    """``(E, wmse', ce)`` of a row from its statistics (``zs``, ``zt``: the normaliser rests
    ``z - 1``): the true weights are ``v' 2^E``, the true ``wmse = 2^(2E) wmse'``; ``ce = a / (T
    z_t) + log1p(zs)`` is ``inf`` when the student puts ``-inf`` where the teacher has mass, and 0
    for a row without teacher mass."""
    exponent = scale
    wmse = 2.0 * weight * m2
    if SOURCE == 0:
        exponent = -gamma * tl.log2(tl.where(z_w != 0.0, z_w, 1.0))
    if SOURCE == 4:  # pair weights: the wMSE itself, weights unscaled
        exponent = weight * 0.0
        wmse = m2
    zt = zt + 1.0
    ce = tl.where(a != float("inf"), inv_t * a / tl.where(zt != 0.0, zt, 1.0) + log1p(zs), a)
    return exponent, wmse, tl.where(zt != 0.0, ce, 0.0)


@triton.jit
def store_row_stats(stats_ptr, rows, mask, ms, zs, mt, zt, a, z_w, scale, weight, ph, pl, m2,
                    kept, err, dm):
    """Write rows of the statistics (``config.STAT_*``; the two padding columns 0)."""
    base = stats_ptr + rows * 16
    tl.store(base + 0, ms, mask=mask)
    tl.store(base + 1, zs, mask=mask)
    tl.store(base + 2, mt, mask=mask)
    tl.store(base + 3, zt, mask=mask)
    tl.store(base + 4, a, mask=mask)
    tl.store(base + 5, z_w, mask=mask)
    tl.store(base + 6, scale, mask=mask)
    tl.store(base + 7, weight, mask=mask)
    tl.store(base + 8, ph, mask=mask)
    tl.store(base + 9, pl, mask=mask)
    tl.store(base + 10, m2, mask=mask)
    tl.store(base + 11, kept, mask=mask)
    tl.store(base + 12, err, mask=mask)
    tl.store(base + 13, dm, mask=mask)
    tl.store(base + 14, dm * 0.0, mask=mask)
    tl.store(base + 15, dm * 0.0, mask=mask)


@triton.jit
def load_row_stats(stats_ptr, rows, mask):
    base = stats_ptr + rows * 16
    return (tl.load(base + 0, mask=mask, other=NEG_INF), tl.load(base + 1, mask=mask, other=-1.0),
            tl.load(base + 2, mask=mask, other=NEG_INF), tl.load(base + 3, mask=mask, other=-1.0),
            tl.load(base + 4, mask=mask, other=0.0), tl.load(base + 5, mask=mask, other=0.0),
            tl.load(base + 6, mask=mask, other=NEG_INF), tl.load(base + 7, mask=mask, other=0.0),
            tl.load(base + 8, mask=mask, other=0.0), tl.load(base + 9, mask=mask, other=0.0),
            tl.load(base + 10, mask=mask, other=0.0), tl.load(base + 11, mask=mask, other=0.0),
            tl.load(base + 12, mask=mask, other=0.0), tl.load(base + 13, mask=mask, other=0.0))


@triton.jit
def store_pair_parts(parts_ptr, out, plane, mask, wmse, weight, invalid, ms, zs, mt, zt, a,
                     kept, bad_label, LOSS: tl.constexpr):
    """Write one column part of rows (``out``: part ``p``'s offset ``p B + b``; ``plane = P B``)
    in the layout ``_merged_parts`` reads (``config.PART_*``); without ``LOSS`` only the wMSE
    and weight-sum planes (``pair_rows``)."""
    tl.store(parts_ptr + out, wmse, mask=mask)
    tl.store(parts_ptr + plane + out, weight, mask=mask)
    if LOSS:
        tl.store(parts_ptr + 2 * plane + out, invalid, mask=mask)
        tl.store(parts_ptr + 3 * plane + out, ms, mask=mask)
        tl.store(parts_ptr + 4 * plane + out, zs, mask=mask)
        tl.store(parts_ptr + 5 * plane + out, mt, mask=mask)
        tl.store(parts_ptr + 6 * plane + out, zt, mask=mask)
        tl.store(parts_ptr + 7 * plane + out, a, mask=mask)
        tl.store(parts_ptr + 8 * plane + out, tl.where(kept, 1.0, 0.0), mask=mask)
        tl.store(parts_ptr + 9 * plane + out, tl.where(bad_label, 1.0, 0.0), mask=mask)


@triton.jit
def row_flags(labels_ptr, rows, mask, ignore_index, num_labels, HAS_LABELS: tl.constexpr):
    """``(kept, bad label)`` of rows: kept unless labelled ``ignore_index``; a kept label outside
    ``[0, num_labels)`` is an error."""
    kept = mask
    bad = mask & (rows < 0)
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=mask, other=ignore_index).to(tl.int64)
        kept = mask & (label != ignore_index)
        bad = kept & ((label < 0) | (label >= num_labels))
    return kept, bad


@triton.jit
def _merged_parts(parts_ptr, num_parts, B, rows, mask, inv_t, BLOCK_R: tl.constexpr,
                  ACC: tl.constexpr):
    """Pair weights: ``(ms, zs, mt, zt, a, W, M2, kept, error)`` of rows from the pair kernels'
    ``num_parts`` column parts (``ACC`` ``(NUM_PART_PLANES, num_parts, B)``, ``config.PART_*``):
    the cross-entropy merged, wMSE and weight sums added, the kept and label-error flags of the
    first part, an invalid weight in any part an error."""
    zero = tl.zeros([BLOCK_R], dtype=ACC)
    ms = zero + NEG_INF
    zs = zero - 1.0
    mt = zero + NEG_INF
    zt = zero - 1.0
    a = zero
    m2 = zero
    weight = zero
    invalid = zero
    plane = num_parts * B
    for part in range(0, num_parts):
        at = parts_ptr + part * B + rows
        m2 += tl.load(at, mask=mask, other=0.0)
        weight += tl.load(at + plane, mask=mask, other=0.0)
        invalid = tl.maximum(invalid, tl.load(at + 2 * plane, mask=mask, other=0.0))
        ms, zs, mt, zt, a = merge_cross_entropy(
            ms, zs, mt, zt, a, tl.load(at + 3 * plane, mask=mask, other=NEG_INF),
            tl.load(at + 4 * plane, mask=mask, other=-1.0),
            tl.load(at + 5 * plane, mask=mask, other=NEG_INF),
            tl.load(at + 6 * plane, mask=mask, other=-1.0),
            tl.load(at + 7 * plane, mask=mask, other=0.0), inv_t)
    kept = tl.load(parts_ptr + 8 * plane + rows, mask=mask, other=0.0)
    err = tl.load(parts_ptr + 9 * plane + rows, mask=mask, other=0.0) + \
        tl.where(invalid != 0.0, 2.0, 0.0)
    return ms, zs, mt, zt, a, weight, m2, kept, err


@triton.jit
def _finished_rows(stats_ptr, parts_ptr, num_parts, r0, B, gamma, inv_t, SOURCE: tl.constexpr,
                   FROM_PARTS: tl.constexpr, STORE: tl.constexpr, BLOCK_R: tl.constexpr,
                   ACC: tl.constexpr):
    """Rows ``r0 ..`` of the statistics finished (``finish_row``), their weights, kept flags,
    error flags, and which of them count in the normaliser (kept, with weight). ``FROM_PARTS``
    (pair weights): the statistics come from the pair kernels' parts (``_merged_parts``), and
    with ``STORE`` they are written to ``stats_ptr``."""
    rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask = rows < B
    if FROM_PARTS:
        ms, zs, mt, zt, a, weight, m2, kept, err = _merged_parts(parts_ptr, num_parts, B, rows,
                                                                 mask, inv_t, BLOCK_R, ACC)
        z_w = weight * 0.0
        scale = z_w + NEG_INF
        if STORE:
            store_row_stats(stats_ptr, rows, mask, ms, zs, mt, zt, a, z_w, scale, weight, z_w,
                            z_w, m2, kept, err, z_w)
    else:
        (ms, zs, mt, zt, a, z_w, scale, weight, ph, pl, m2, kept,
         err, dm) = load_row_stats(stats_ptr, rows, mask)
    exponent, wmse, ce = finish_row(zs, zt, a, z_w, scale, weight, m2, gamma, inv_t, SOURCE)
    return exponent, wmse, ce, weight, kept, err, (kept > 0.0) & (weight != 0.0)


@triton.jit(debug=True)
def finish_loss_kernel(
    stats_ptr, parts_ptr, loss_ptr, totals_ptr, B, num_parts, gamma_hi, gamma_lo, inv_t_hi,
    inv_t_lo, mse_weight_hi, mse_weight_lo, ce_weight_hi, ce_weight_lo,
    SOURCE: tl.constexpr, WITH_CE: tl.constexpr, WITH_WMSE: tl.constexpr,
    NORMALIZE_BATCH: tl.constexpr, FROM_PARTS: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program: ``loss = mse_weight wmse_sum / (4 N) + ce_weight ce_sum / R`` over the kept
    rows and the totals (``config.TOTAL_*``); ``N = DEN 2^(2K)`` (``normalize="weights"``) or
    ``R``. A wMSE term with ``N = 0`` and a CE term with ``R = 0`` are 0. Two passes over the
    (B, 16) statistics in a fixed order (deterministic); invalid inputs fail a device assertion
    (compiled kernels; under the interpreter the launcher's host checks stand for it)."""
    gamma = option(gamma_hi, gamma_lo, ACC)
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    mse_weight = option(mse_weight_hi, mse_weight_lo, ACC)
    ce_weight = option(ce_weight_hi, ce_weight_lo, ACC)
    zero = tl.sum(tl.zeros([BLOCK_R], dtype=ACC), axis=0)
    top = zero + NEG_INF
    rows_kept = zero
    error = zero
    for r0 in range(0, B, BLOCK_R):
        exponent, wmse, ce, weight, kept, err, counted = _finished_rows(
            stats_ptr, parts_ptr, num_parts, r0, B, gamma, inv_t, SOURCE, FROM_PARTS, FROM_PARTS,
            BLOCK_R, ACC)
        top = tl.maximum(top, tl.max(tl.where(counted, exponent, NEG_INF), axis=0))
        rows_kept += tl.sum(kept, axis=0)
        error = tl.maximum(error, tl.max(err, axis=0))
    tl.device_assert((error != 1.0) & (error != 3.0),
                     "gkl_loss: labels must lie in [0, C) or equal ignore_index")
    tl.device_assert(error < 2.0, "gkl_loss: weights and class_prior rows must be finite, >= 0")
    if NORMALIZE_BATCH:
        top = zero
    top = tl.where(top != NEG_INF, top, 0.0)
    wmse_sum = zero
    den = zero
    ce_sum = zero
    for r0 in range(0, B, BLOCK_R):
        exponent, wmse, ce, weight, kept, err, counted = _finished_rows(
            stats_ptr, parts_ptr, num_parts, r0, B, gamma, inv_t, SOURCE, FROM_PARTS, False,
            BLOCK_R, ACC)
        f = tl.exp2(tl.where(counted, exponent, top) - top)
        wmse_sum += tl.sum(tl.where(counted, f * f * wmse, 0.0), axis=0)
        if SOURCE == 4:
            den += tl.sum(tl.where(counted, weight, 0.0), axis=0)
        else:
            den += tl.sum(tl.where(counted, (f * weight) * (f * weight), 0.0), axis=0)
        ce_sum += tl.sum(tl.where(kept > 0.0, ce, 0.0), axis=0)
    loss = zero
    if WITH_WMSE:
        if NORMALIZE_BATCH:
            loss = mse_weight * 0.25 * wmse_sum / tl.maximum(rows_kept, 1.0)
        else:
            loss = tl.where(den != 0.0,
                            mse_weight * 0.25 * wmse_sum / tl.where(den != 0.0, den, 1.0), 0.0)
    if WITH_CE:
        loss += ce_weight * ce_sum / tl.maximum(rows_kept, 1.0)
    tl.store(loss_ptr, loss)
    tl.store(totals_ptr + 0, top)
    tl.store(totals_ptr + 1, den)
    tl.store(totals_ptr + 2, rows_kept)
    tl.store(totals_ptr + 3, wmse_sum)
    tl.store(totals_ptr + 4, ce_sum)
    tl.store(totals_ptr + 5, error)
    tl.store(totals_ptr + 6, zero)
    tl.store(totals_ptr + 7, zero)


@triton.jit
def pair_loss_coefficients(kept, totals_ptr, grad, mse_weight, ce_weight, inv_t,
                           NORMALIZE_BATCH: tl.constexpr):
    """``(coef_g, coef_ce)`` of rows under pair weights (``kept``: their flags): ``dL/dd =
    coef_g g`` (``2 mse_weight / 4N``) and the cross-entropy's ``dL/ds = coef_ce (q - p)``,
    scaled by the incoming ``grad``; 0 for rows not kept."""
    rows_kept = tl.maximum(tl.load(totals_ptr + 2), 1.0)
    if NORMALIZE_BATCH:
        norm = 1.0 / rows_kept
    else:
        den = tl.load(totals_ptr + 1)
        norm = tl.where(den != 0.0, 1.0 / tl.where(den != 0.0, den, 1.0), 0.0)
    live = kept > 0.0
    return (tl.where(live, grad * 0.5 * mse_weight * norm, 0.0),
            tl.where(live, grad * ce_weight * inv_t / rows_kept, 0.0))


@triton.jit
def softmax_difference(s, t, ms, zs, mt, zt, inv_t):
    """``q - p = softmax(s / T) - softmax(t / T)`` on a tile from the rows' maxima and normaliser
    rests ``z - 1``; where both logits are maximal (``e_s = e_t = 1``) as ``(zt - zs) / (z_s
    z_t)``, which does not cancel."""
    log_zs = log1p(tl.where(zs != -1.0, zs, 0.0))  # an empty row: 0
    log_zt = log1p(tl.where(zt != -1.0, zt, 0.0))
    s_in = s != NEG_INF
    t_in = t != NEG_INF
    q = tl.where(s_in, tl.exp((s - _ref(ms)) * inv_t - log_zs), 0.0)
    p = tl.where(t_in, tl.exp((t - _ref(mt)) * inv_t - log_zt), 0.0)
    peak = (zt - zs) / tl.maximum((zs + 1.0) * (zt + 1.0), 1.0)  # z_s, z_t >= 1 where used
    return tl.where(s_in & t_in & (s == ms) & (t == mt), peak, q - p)


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
        if NEED_DS:
            if SYMMETRIC:
                ds = -g_d
            else:
                ds = tl.zeros([BLOCK_C], dtype=ACC)
            if WITH_CE:
                ds += coef_ce * softmax_difference(s, t, ms, zs, mt, zt, inv_t)
            tl.store(ds_ptr + row * C + cols, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if NEED_DT:
            tl.store(dt_ptr + row * C + cols, g_d.to(dt_ptr.dtype.element_ty), mask=mask)


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
    row_stats_kernel[(batch,)](
        student, teacher, v_ptr, labels_ptr, stats,
        num_classes, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        v_sb, v_sc, *float32_pair(config.gamma), *float32_pair(1.0 / config.temperature),
        *float32_pair(1.0 / config.weight_temperature), config.ignore_index,
        config.num_labels or num_classes, SOURCE=config.source, WITH_CE=config.with_ce,
        HAS_LABELS=config.has_labels, BLOCK_C=block, ACC=accumulator(stats.dtype),
        num_warps=pick_num_warps(block))
    return stats


def finish_loss(stats, config, pair_parts=None):
    """Launch ``finish_loss_kernel``: ``(loss (), totals (NUM_TOTALS,))`` in the statistics'
    dtype from the statistics, or (``pair_parts``: the pair kernels' ``(NUM_PART_PLANES, parts,
    B)`` parts, of that dtype) from those, writing the rows' statistics to ``stats``."""
    loss = torch.empty((), dtype=stats.dtype, device=stats.device)
    totals = torch.empty(NUM_TOTALS, dtype=stats.dtype, device=stats.device)
    parts = stats if pair_parts is None else pair_parts
    finish_loss_kernel[(1,)](
        stats, parts, loss, totals, stats.shape[0],
        0 if pair_parts is None else pair_parts.shape[1], *float32_pair(config.gamma),
        *float32_pair(1.0 / config.temperature), *float32_pair(config.mse_weight),
        *float32_pair(config.ce_weight),
        SOURCE=config.source, WITH_CE=config.with_ce, WITH_WMSE=config.with_wmse,
        NORMALIZE_BATCH=config.normalize_batch, FROM_PARTS=pair_parts is not None,
        BLOCK_R=FINISH_BLOCK_ROWS, ACC=accumulator(stats.dtype), num_warps=4)
    return loss, totals


def loss_backward(grad_loss, student, teacher, factor, labels, stats, totals, config, need_ds,
                  need_dt):
    """Launch ``loss_backward_kernel``: ``(grad_student, grad_teacher)``, each ``(B, C)`` in its
    input's dtype, or empty when not needed."""
    batch, num_classes = student.shape
    ds, dt = empty_gradients(student, teacher, need_ds, need_dt)
    v_ptr, v_sb, v_sc, labels_ptr = _factor_args(config, factor, labels, student)
    block = pick_block_c(num_classes, config.block_c, stats.dtype)
    loss_backward_kernel[(batch,)](
        student, teacher, v_ptr, labels_ptr, stats, totals, grad_loss,
        ds if need_ds else student, dt if need_dt else teacher,
        num_classes, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        v_sb, v_sc, grad_loss.stride(0) if grad_loss.dim() else 0, *float32_pair(config.gamma),
        *float32_pair(1.0 / config.temperature), *float32_pair(1.0 / config.weight_temperature),
        *float32_pair(config.mse_weight), *float32_pair(config.ce_weight),
        SOURCE=config.source, WITH_CE=config.with_ce, WITH_WMSE=config.with_wmse,
        NORMALIZE_BATCH=config.normalize_batch, SYMMETRIC=config.symmetric, NEED_DS=need_ds,
        NEED_DT=need_dt, BLOCK_C=block, ACC=accumulator(stats.dtype),
        num_warps=pick_num_warps(block))
    return ds, dt
