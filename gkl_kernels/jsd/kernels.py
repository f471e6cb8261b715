"""Triton kernels of the generalized JSD (docs/MATH.md, "Generalized JSD"), per row, with
``P = softmax(t / T)`` the teacher's and ``Q = softmax(s / T)`` the student's distribution:

    JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),   M = beta P + (1 - beta) Q

and at the ends forward KL ``KL(P || Q)`` (beta = 0) and reverse KL ``KL(Q || P)`` (beta = 1), as
TRL's and Liger-Kernel's losses define them. The teacher is a constant. With ``g = w_q log(Q /
M)`` (``w_q = 1 - beta``; 1 for reverse KL) the student's gradient is ``(1/T) q_j (g_j - w_q
KL(Q || M))``; for forward KL ``(1/T) (q_j - p_j)``.

Two kernels and the core's finishing kernel: ``jsd_row_stats_kernel`` (one program per row) takes
the maxima and normaliser rests in a first pass over the row's tiles and the two KL sums in a
second (re-reading the row, from L2 when it fits; one pass when the row is one tile), writing the
row's statistics (``STAT_A``: its divergence); ``finish_loss_kernel`` reduces them to the loss;
``jsd_backward_kernel`` (one program per row, one pass) writes the student's gradient. The
log-ratios ``log(P / M)``, ``log(Q / M)`` come from ``log Q - log P`` (``log1p`` and ``expm1``), so
that a row where the two nearly agree keeps its tiny divergence. Classes with ``P_j = 0`` or
``Q_j = 0`` add nothing to their KL sum (no ``0 log 0``); masked lanes load
as ``-inf``; rows labelled ``ignore_index`` are not read and get a zero gradient.
"""

import torch
import triton
import triton.language as tl

from gkl_kernels.buffers import empty_gradients
from gkl_kernels.core.config import NUM_STATS, STAT_KL_P, STAT_KL_Q, compute_dtype
from gkl_kernels.core.kernels import (NEG_INF, accumulator, expm1, finite_ref, load_row_stats,
                                      log1p, merge_cross_entropy, option, row_flags,
                                      softmax_difference, store_gradients, store_row_stats,
                                      tile_cross_entropy)
from gkl_kernels.rank1.kernels import pick_block_c, pick_num_warps

KL_P = tl.constexpr(STAT_KL_P)
KL_Q = tl.constexpr(STAT_KL_Q)


@triton.jit
def _log_probabilities(x, m, rest, inv_t):
    """``log softmax(x / T)`` on a tile from the row's maximum and normaliser rest, ``-inf``
    where ``x`` is."""
    return tl.where(x != NEG_INF, (x - finite_ref(m)) * inv_t - log1p(tl.maximum(rest, 0.0)),
                    NEG_INF)


@triton.jit
def _log_ratios(log_p, log_q, beta, FORM: tl.constexpr):
    """``(log(P / M), log(Q / M))`` on a tile from ``delta = log Q - log P``: forward KL (FORM 0,
    ``M = Q``) ``(-delta, 0)``, reverse KL (1, ``M = P``) ``(0, delta)``, the mixture (2): the
    smaller of the two directly, ``-log1p(a expm1(-|delta|))`` (``a = beta`` where ``Q >= P``,
    else ``1 - beta``), the other from it and ``delta``, so that neither cancels (a peaked row's
    top class, where ``P`` and ``Q`` nearly agree)."""
    delta = log_q - log_p
    log_pm = -delta
    log_qm = delta
    if FORM == 0:
        log_qm = delta * 0.0
    if FORM == 1:
        log_pm = delta * 0.0
    if FORM == 2:
        q_larger = delta >= 0.0
        share = tl.where(q_larger, beta, 1.0 - beta)
        small = -log1p(share * expm1(-tl.abs(delta)))
        log_pm = tl.where(q_larger, small - delta, small)
        log_qm = tl.where(q_larger, small, small + delta)
    return log_pm, log_qm


@triton.jit
def _kl_part(log_x, log_ratio, lanes):
    """``sum_j x_j log(x_j / m_j)`` over the ``lanes`` of a tile, 0 for ``x_j = 0``."""
    return tl.sum(tl.where(lanes & (log_x != NEG_INF), tl.exp(log_x) * log_ratio, 0.0), axis=0)


@triton.jit
def jsd_row_stats_kernel(
    s_ptr, t_ptr, labels_ptr, given_ptr, stats_ptr, C, s_stride_b, s_stride_c, t_stride_b,
    t_stride_c, inv_t_hi, inv_t_lo, beta_hi, beta_lo, ignore_index, num_labels,
    FORM: tl.constexpr, ROUND: tl.constexpr, HAS_LABELS: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    """One program per row: ``stats[b, :]`` (``config.STAT_*``; ``a`` the row's divergence,
    ``STAT_KL_P``, ``STAT_KL_Q_TOP`` + ``STAT_KL_Q`` its KL sums) in ``ACC``; float options as
    ``float32_pair``s. ``ROUND`` (``config.JSD_*``): 0 both passes, 1 the normalisers only (a
    vocabulary shard's), 2 the KL sums from the normalisers of ``given`` (the whole rows')."""
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    beta = option(beta_hi, beta_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    kept, bad_label = row_flags(labels_ptr, row, row >= 0, ignore_index, num_labels, HAS_LABELS)
    live_cols = tl.where(kept & (bad_label == 0), C, 0)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    zero = tl.sum(tl.zeros([BLOCK_C], dtype=ACC), axis=0)
    ms = zero + NEG_INF
    zs = zero - 1.0
    mt = zero + NEG_INF
    zt = zero - 1.0
    a = zero
    if ROUND == 2:
        ms, zs, mt, zt, _, _, _, _, _, _, _, _, _, _ = load_row_stats(given_ptr, row, row >= 0)
    else:
        for c0 in range(0, live_cols, BLOCK_C):
            cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            load = cols < live_cols
            s = tl.load(s_row + cols * s_stride_c, mask=load, other=NEG_INF).to(ACC)
            t = tl.load(t_row + cols * t_stride_c, mask=load, other=NEG_INF).to(ACC)
            ms_tile, zs_tile, mt_tile, zt_tile, a_tile = tile_cross_entropy(s, t, inv_t, 0)
            ms, zs, mt, zt, a = merge_cross_entropy(ms, zs, mt, zt, a, ms_tile, zs_tile,
                                                    mt_tile, zt_tile, a_tile, inv_t)
    kl_p = zero
    kl_q_top = zero
    kl_q = zero  # over the other classes
    sum_cols = live_cols
    if ROUND == 1:
        sum_cols = 0
    for c0 in range(0, sum_cols, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        load = cols < sum_cols
        s = tl.load(s_row + cols * s_stride_c, mask=load, other=NEG_INF).to(ACC)
        t = tl.load(t_row + cols * t_stride_c, mask=load, other=NEG_INF).to(ACC)
        log_q = _log_probabilities(s, ms, zs, inv_t)
        log_p = _log_probabilities(t, mt, zt, inv_t)
        log_pm, log_qm = _log_ratios(log_p, log_q, beta, FORM)
        if FORM != 1:  # KL(P || M); reverse KL has none
            kl_p += _kl_part(log_p, log_pm, cols >= 0)  # every lane
        if FORM != 0:  # KL(Q || M); forward KL has none
            kl_q_top += _kl_part(log_q, log_qm, s == ms)
            kl_q += _kl_part(log_q, log_qm, s != ms)
    divergence = kl_p  # forward KL
    if FORM == 1:
        divergence = kl_q_top + kl_q
    if FORM == 2:
        divergence = beta * kl_p + (1.0 - beta) * (kl_q_top + kl_q)
    store_row_stats(stats_ptr, row, row >= 0, ms, zs, mt, zt, divergence, zero, zero + NEG_INF,
                    zero, zero, zero, kl_q_top, tl.where(kept, 1.0, 0.0),
                    tl.where(bad_label, 1.0, 0.0), zero)
    tl.store(stats_ptr + row * 16 + KL_P, kl_p)
    tl.store(stats_ptr + row * 16 + KL_Q, kl_q)


@triton.jit
def jsd_backward_kernel(
    s_ptr, t_ptr, stats_ptr, totals_ptr, grad_loss_ptr, ds_ptr, C, s_stride_b, s_stride_c,
    t_stride_b, t_stride_c, grad_stride, inv_t_hi, inv_t_lo, beta_hi, beta_lo, ce_weight_hi,
    ce_weight_lo, FORM: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """One program per row: the student's gradient, ``c q_j (g_j - w_q KL(Q || M))`` with ``g =
    w_q log(Q / M)``, or ``c (q_j - p_j)`` for forward KL, ``c = grad ce_weight / (T R)`` (the
    incoming gradient ``grad_loss[b * grad_stride]``); zeros for rows not kept, unread. At the
    student's maximal classes ``log(q_j / m_j) - KL(Q || M)`` is formed as ``(1 - q_j) log(q_j /
    m_j) - (the other maximal classes' terms) - (the rest's)``, ``1 - q_j = rest_s / z_s``, which
    does not cancel where ``q_j`` is near 1."""
    inv_t = option(inv_t_hi, inv_t_lo, ACC)
    beta = option(beta_hi, beta_lo, ACC)
    ce_weight = option(ce_weight_hi, ce_weight_lo, ACC)
    row = tl.program_id(0).to(tl.int64)
    (ms, zs, mt, zt, a, z_w, scale, weight, ph, pl, m2, kept,
     err, dm) = load_row_stats(stats_ptr, row, row >= 0)
    kl_q_top = m2  # STAT_KL_Q_TOP
    kl_q = tl.load(stats_ptr + row * 16 + KL_Q)
    live = kept > 0.0
    grad = tl.load(grad_loss_ptr + row * grad_stride).to(ACC)
    coef = tl.where(live, grad * ce_weight * inv_t / tl.maximum(tl.load(totals_ptr + 2), 1.0),
                    0.0)
    w_q = 1.0 - beta
    if FORM == 1:  # reverse KL: Q's whole weight (beta = 1)
        w_q = beta
    live_cols = tl.where(live, C, 0)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    for c0 in range(0, C, BLOCK_C):
        cols = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        load = cols < live_cols
        s = tl.load(s_row + cols * s_stride_c, mask=load, other=NEG_INF).to(ACC)
        t = tl.load(t_row + cols * t_stride_c, mask=load, other=NEG_INF).to(ACC)
        if FORM == 0:
            g = softmax_difference(s, t, ms, zs, mt, zt, inv_t)
        else:
            log_q = _log_probabilities(s, ms, zs, inv_t)
            _, log_qm = _log_ratios(_log_probabilities(t, mt, zt, inv_t), log_q, beta, FORM)
            q = tl.exp(log_q)
            at_top = ((zs / (zs + 1.0)) * log_qm - (kl_q_top - q * log_qm)) - kl_q
            inner = tl.where(s == ms, at_top, log_qm - (kl_q_top + kl_q))
            g = tl.where(log_q != NEG_INF, (w_q * q) * inner, 0.0)
        store_gradients(ds_ptr, ds_ptr, row * C + cols, cols < C, g, coef * g, False, True,
                        False)


# ------------------------------------------------------------------------------------ launchers


def jsd_row_stats(student, teacher, labels, config, given=None):
    """Launch ``jsd_row_stats_kernel``: ``(B, NUM_STATS)`` in ``compute_dtype`` (the round
    ``config.jsd_round``; ``given``: the whole rows' normalisers, ``(B, NUM_STATS)``)."""
    batch, num_classes = student.shape
    stats = torch.empty(batch, NUM_STATS, dtype=compute_dtype(student, teacher),
                        device=student.device)
    block = pick_block_c(num_classes, config.block_c, stats.dtype)
    options = config.kernel_options
    jsd_row_stats_kernel[(batch,)](
        student, teacher, student if labels is None else labels,
        stats if given is None else given, stats, num_classes, student.stride(0),
        student.stride(1), teacher.stride(0), teacher.stride(1), *options.inv_t, *options.beta,
        config.ignore_index, config.num_labels or num_classes, FORM=config.jsd_form,
        ROUND=config.jsd_round, HAS_LABELS=labels is not None, BLOCK_C=block,
        ACC=accumulator(stats.dtype), num_warps=pick_num_warps(block))
    return stats


def jsd_backward(grad_loss, student, teacher, stats, totals, config, need_ds):
    """Launch ``jsd_backward_kernel``: ``(grad_student, empty)``, the student's gradient ``(B,
    C)`` in its dtype (empty when not needed; the teacher gets none)."""
    batch, num_classes = student.shape
    ds, dt = empty_gradients(student, teacher, need_ds, False)
    if not need_ds:
        return ds, dt
    block = pick_block_c(num_classes, config.block_c, stats.dtype)
    options = config.kernel_options
    jsd_backward_kernel[(batch,)](
        student, teacher, stats, totals, grad_loss, ds, num_classes, student.stride(0),
        student.stride(1), teacher.stride(0), teacher.stride(1),
        grad_loss.stride(0) if grad_loss.dim() else 0, *options.inv_t, *options.beta,
        *options.ce_weight, FORM=config.jsd_form, BLOCK_C=block, ACC=accumulator(stats.dtype),
        num_warps=pick_num_warps(block))
    return ds, dt
