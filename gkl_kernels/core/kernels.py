"""The ``@triton.jit`` pieces both weight families share, the finishing kernel and its launcher.

Exactness in float32 (docs/MATH.md): softmaxes relative to running maxima, their normalisers held
as the rests ``z - 1`` (summed without one maximal term, so ``1 + x`` is never rounded; ``log1p``
in the loss), parts merged by ``merge_cross_entropy``; ``q - p`` where both logits are maximal as
``(rest_t - rest_s) / (z_s z_t)``. ``-inf`` marks an absent class or a masked-off lane.

The statistics' layout (``config.STAT_*``, ``config.PART_*``, ``config.TOTAL_*``) is written and
read here alone: ``store_row_stats`` / ``load_row_stats``, ``store_column_parts`` /
``_merged_column_parts``. ``finish_loss_kernel`` (one program) reduces either to the loss and the
batch totals; ``store_gradients`` is the epilogue of every backward kernel.
"""

import torch
import triton
import triton.language as tl

from gkl_kernels.core.config import NUM_TOTALS

FINISH_BLOCK_ROWS = 1024
LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))


def accumulator(dtype):
    """The kernels' ``ACC`` for statistics of torch ``dtype``: float64 or float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def two_sum(a, b):
    """``(h, e)`` with ``h = fl(a + b)`` and ``h + e == a + b`` exactly."""
    h = a + b
    bb = h - a
    return h, (a - (h - bb)) + (b - bb)


@triton.jit
def option(hi, lo, ACC: tl.constexpr):
    """A float option in ``ACC`` from its ``config.float32_pair``."""
    value = hi
    if ACC == tl.float64:
        value = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    return value


@triton.jit
def finite_ref(m):
    """A running maximum as a finite reference point: ``m``, or 0 while it is ``-inf``."""
    return tl.where(m != NEG_INF, m, 0.0)


@triton.jit
def rescale(m_part, m, inv_temperature):
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
    rt_a = rescale(mt_a, mt, inv_t)
    rt_b = rescale(mt_b, mt, inv_t)
    shift_a = tl.where(zt_a != -1.0, (zt_a + 1.0) * (finite_ref(ms) - finite_ref(ms_a)), 0.0)
    shift_b = tl.where(zt_b != -1.0, (zt_b + 1.0) * (finite_ref(ms) - finite_ref(ms_b)), 0.0)
    a = tl.where(rt_a != 0.0, rt_a * (a_a + shift_a), 0.0) + \
        tl.where(rt_b != 0.0, rt_b * (a_b + shift_b), 0.0)
    zs = merged_rest(zs_a, rescale(ms_a, ms, inv_t), zs_b, rescale(ms_b, ms, inv_t))
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
    ref_s = finite_ref(tl.expand_dims(ms, AXIS))
    e_t = tl.exp((t - finite_ref(tl.expand_dims(mt, AXIS))) * inv_t)
    a = tl.sum(tl.where(e_t != 0.0, e_t * (ref_s - s), 0.0), axis=AXIS)
    zt = _tile_rest(t, mt, e_t, AXIS)
    return ms, _tile_rest(s, ms, tl.exp((s - ref_s) * inv_t), AXIS), mt, zt, a


@triton.jit
def log1p(x):
    """``log(1 + x)``, exact to a few units also for tiny ``x``: ``log(u) x / (u - 1)``,
    ``u = fl(1 + x)`` (Goldberg's rewriting; ``x`` itself where ``u = 1``)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def expm1(x):
    """``exp(x) - 1`` for ``x <= 0``, exact to a few units also for tiny ``x``: ``(u - 1) x /
    log(u)``, ``u = fl(exp(x))`` (Kahan's rewriting; ``x`` where ``u = 1``, -1 where ``u = 0``)."""
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0,
                                          (u - 1.0) * (x / tl.log(tl.where(u == 1.0, 0.5, u)))))


@triton.jit
def finish_row(zs, zt, a, z_w, scale, weight, m2, gamma, inv_t, SOURCE: tl.constexpr):
    """``(E, wmse', ce)`` of a row from its statistics (``zs``, ``zt``: the normaliser rests
    ``z - 1``): the true weights are ``v' 2^E``, the true ``wmse = 2^(2E) wmse'``; ``ce = a / (T
    z_t) + log1p(zs)`` is ``inf`` when the student puts ``-inf`` where the teacher has mass, and 0
    for a row without teacher mass; for the generalized JSD (``SOURCE_JSD``) ``ce = a``."""
    exponent = scale
    wmse = 2.0 * weight * m2
    if SOURCE == 0:
        exponent = -gamma * tl.log2(tl.where(z_w != 0.0, z_w, 1.0))
    if SOURCE == 4:  # pair weights: the wMSE itself, weights unscaled
        exponent = weight * 0.0
        wmse = m2
    zt = zt + 1.0
    ce = tl.where(a != float("inf"), inv_t * a / tl.where(zt != 0.0, zt, 1.0) + log1p(zs), a)
    if SOURCE == 5:  # the generalized JSD: the row's divergence itself
        ce = a
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
def store_column_parts(parts_ptr, out, plane, mask, wmse, weight, invalid, ms, zs, mt, zt, a,
                     kept, bad_label, LOSS: tl.constexpr):
    """Write one column part of rows (``out``: part ``p``'s offset ``p B + b``; ``plane = P B``)
    in the layout ``_merged_column_parts`` reads (``config.PART_*``); without ``LOSS`` only the wMSE
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
def _merged_column_parts(parts_ptr, num_parts, B, rows, mask, inv_t, BLOCK_R: tl.constexpr,
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
    (pair weights): the statistics come from the pair kernels' parts (``_merged_column_parts``), and
    with ``STORE`` they are written to ``stats_ptr``."""
    rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask = rows < B
    if FROM_PARTS:
        ms, zs, mt, zt, a, weight, m2, kept, err = _merged_column_parts(
            parts_ptr, num_parts, B, rows, mask, inv_t, BLOCK_R, ACC)
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
def softmax_difference(s, t, ms, zs, mt, zt, inv_t):
    """``q - p = softmax(s / T) - softmax(t / T)`` on a tile from the rows' maxima and normaliser
    rests ``z - 1``; where both logits are maximal (``e_s = e_t = 1``) as ``(zt - zs) / (z_s
    z_t)``, which does not cancel."""
    log_zs = log1p(tl.where(zs != -1.0, zs, 0.0))  # an empty row: 0
    log_zt = log1p(tl.where(zt != -1.0, zt, 0.0))
    s_in = s != NEG_INF
    t_in = t != NEG_INF
    q = tl.where(s_in, tl.exp((s - finite_ref(ms)) * inv_t - log_zs), 0.0)
    p = tl.where(t_in, tl.exp((t - finite_ref(mt)) * inv_t - log_zt), 0.0)
    peak = (zt - zs) / tl.maximum((zs + 1.0) * (zt + 1.0), 1.0)  # z_s, z_t >= 1 where used
    return tl.where(s_in & t_in & (s == ms) & (t == mt), peak, q - p)


@triton.jit
def store_gradients(ds_ptr, dt_ptr, offsets, mask, g_d, ce_grad, SYMMETRIC: tl.constexpr,
                    NEED_DS: tl.constexpr, NEED_DT: tl.constexpr):
    """The epilogue of every backward kernel: ``dt = g_d`` (the wMSE's gradient in ``d = t - s``)
    and ``ds = ce_grad - [SYMMETRIC] g_d`` (``ce_grad``: the cross-entropy's, or 0), each stored
    at ``offsets`` in its tensor's dtype, where wanted."""
    if NEED_DS:
        ds = ce_grad
        if SYMMETRIC:
            ds = ce_grad - g_d
        tl.store(ds_ptr + offsets, ds.to(ds_ptr.dtype.element_ty), mask=mask)
    if NEED_DT:
        tl.store(dt_ptr + offsets, g_d.to(dt_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ launcher


def finish_loss(stats, config, pair_parts=None):
    """Launch ``finish_loss_kernel``: ``(loss (), totals (NUM_TOTALS,))`` in the statistics'
    dtype from the statistics, or (``pair_parts``: the pair kernels' ``(NUM_PART_PLANES, parts,
    B)`` parts, of that dtype) from those, writing the rows' statistics to ``stats``."""
    loss = torch.empty((), dtype=stats.dtype, device=stats.device)
    totals = torch.empty(NUM_TOTALS, dtype=stats.dtype, device=stats.device)
    parts = stats if pair_parts is None else pair_parts
    options = config.kernel_options
    finish_loss_kernel[(1,)](
        stats, parts, loss, totals, stats.shape[0],
        0 if pair_parts is None else pair_parts.shape[1], *options.gamma, *options.inv_t,
        *options.mse_weight, *options.ce_weight,
        SOURCE=config.source, WITH_CE=config.with_ce, WITH_WMSE=config.with_wmse,
        NORMALIZE_BATCH=config.normalize_batch, FROM_PARTS=pair_parts is not None,
        BLOCK_R=FINISH_BLOCK_ROWS, ACC=accumulator(stats.dtype), num_warps=4)
    return loss, totals
