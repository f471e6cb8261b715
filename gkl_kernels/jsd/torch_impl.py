"""Plain-PyTorch path of the generalized JSD (``kernels.py`` has the math): its row statistics and
the student's gradient, in ``compute_dtype``, row block by row block (``rank1.torch_impl``'s
blocks, so that temporaries stay in cache). Log-probabilities come from the row maximum and the
normaliser rest ``z - 1`` summed without the maximal term, as on the GKL path."""

import torch

from gkl_kernels.buffers import empty_gradients
from gkl_kernels.core.config import (JSD_FORWARD_KL, JSD_REVERSE_KL, NUM_STATS, STAT_A,
                                     STAT_ERROR, STAT_KEPT, STAT_KL_P, STAT_KL_Q, STAT_KL_Q_TOP,
                                     STAT_MS, STAT_MT, STAT_ZS, STAT_ZT, TOTAL_ROWS,
                                     compute_dtype)
from gkl_kernels.rank1.torch_impl import (INF, difference_at, finite_ref, kept_logits,
                                          lowered_rest, row_blocks, row_max, scratch_and_blocks)


def jsd_weights(config):
    """``(w_p, w_q)``: the divergence is ``w_p KL(P || M) + w_q KL(Q || M)``, ``M = beta P + (1 -
    beta) Q``: ``(1, 0)`` at beta = 0 (``M = Q``: forward KL), ``(0, 1)`` at beta = 1 (``M = P``:
    reverse KL), else ``(beta, 1 - beta)``."""
    form = config.jsd_form
    if form == JSD_FORWARD_KL:
        return 1.0, 0.0
    if form == JSD_REVERSE_KL:
        return 0.0, 1.0
    return config.beta, 1.0 - config.beta


def _log_softmax(x, inv_t):
    """``(m, rest, log softmax(x / T), top)``: the row maxima (R,), the normaliser rests ``z - 1``
    (R,; -1 for a row of ``-inf``), the log-probabilities (R, C), ``-inf`` where ``x`` is, and
    the first maximal column of each row (R, 1)."""
    m, top = row_max(x)
    z = (x - finite_ref(m)[:, None]) * inv_t
    rest = lowered_rest(z.exp(), top)
    return m, rest, z.sub_(rest.clamp_min(0.0).log1p()[:, None]), top


def _log_ratios(log_p, log_q, config):
    """``(log(P / M), log(Q / M))`` (R, C) from ``delta = log Q - log P``, as the kernels'
    ``_log_ratios`` (None for the side a KL end does not use)."""
    delta = log_q - log_p
    form = config.jsd_form
    if form == JSD_FORWARD_KL:
        return -delta, None
    if form == JSD_REVERSE_KL:
        return None, delta
    # the smaller of the two directly, -log(1 + a expm1(-|delta|)) (a = beta where Q >= P, else
    # 1 - beta), the other from it and delta: neither cancels
    q_larger = delta >= 0
    share = torch.where(q_larger, config.beta, 1.0 - config.beta)
    small = torch.log1p(share * torch.expm1(-delta.abs())).neg_()
    return torch.where(q_larger, small - delta, small), torch.where(q_larger, small, small + delta)


def _kl_terms(x, log_ratio):
    """``x_j log(x_j / m_j)`` (R, C), 0 for ``x_j = 0``; None for a side not used."""
    return None if log_ratio is None else torch.where(x != 0, x * log_ratio, 0.0)


def _block(s, t, config, out, coef=None, ds=None):
    """The statistics of a block of rows (``s``, ``t`` in the compute dtype, ``-inf`` on rows not
    read) written into ``out`` (R, NUM_STATS) except the flags; with ``coef`` (R,) the student's
    gradient ``coef_b dJSD_b / ds`` written into ``ds`` (R, C): ``q_j (g_j - sum_k q_k g_k)``,
    ``g = w_q log(Q / M)``, or ``q_j - p_j`` for forward KL, scaled by ``1 / T``, formed from the
    same log-probabilities. At the student's maximal classes ``g_j - sum_k q_k g_k`` is ``w_q
    ((1 - q_j) log(q_j / m_j) - (the other maximal classes' terms) - (the rest's))``, ``1 - q_j =
    rest_s / z_s``, which does not cancel where ``q_j`` is near 1."""
    inv_t = 1.0 / config.temperature
    w_p, w_q = jsd_weights(config)
    ms, rest_s, log_q, peak = _log_softmax(s, inv_t)
    mt, rest_t, log_p, _ = _log_softmax(t, inv_t)
    log_pm, log_qm = _log_ratios(log_p, log_q, config)
    q, p = log_q.exp_(), log_p.exp_()
    top = s == ms[:, None]
    zero = ms.new_zeros(())
    p_terms, q_terms = _kl_terms(p, log_pm), _kl_terms(q, log_qm)
    kl_p = zero.expand_as(ms) if p_terms is None else p_terms.sum(dim=1)
    kl_q_top, kl_q = (zero.expand_as(ms), zero.expand_as(ms)) if q_terms is None else (
        torch.where(top, q_terms, 0.0).sum(dim=1), torch.where(top, 0.0, q_terms).sum(dim=1))
    out[:, STAT_MS], out[:, STAT_ZS], out[:, STAT_MT], out[:, STAT_ZT] = ms, rest_s, mt, rest_t
    out[:, STAT_KL_P], out[:, STAT_KL_Q_TOP], out[:, STAT_KL_Q] = kl_p, kl_q_top, kl_q
    whole = kl_q_top + kl_q
    out[:, STAT_A] = kl_p if w_q == 0 else whole if w_p == 0 else w_p * kl_p + w_q * whole
    if coef is None:
        return
    rest_s, rest_t = rest_s.clamp_min(0.0), rest_t.clamp_min(0.0)  # empty rows: 0
    if config.jsd_form == JSD_FORWARD_KL:  # q - p, exact where both logits are maximal
        g = q.sub_(p)
        e_s = ((s.gather(1, peak) - finite_ref(ms)[:, None]) * inv_t).exp()
        e_t = ((t.gather(1, peak) - finite_ref(mt)[:, None]) * inv_t).exp()
        g.scatter_(1, peak, difference_at(e_s, e_t, rest_s, rest_t, rest_s + 1.0, rest_t + 1.0))
    else:
        at_top = ((rest_s / (rest_s + 1.0))[:, None] * log_qm - (kl_q_top[:, None] - q_terms)) \
            - kl_q[:, None]
        inner = torch.where(top, at_top, log_qm - whole[:, None])
        g = torch.where(q != 0, q.mul_(w_q).mul_(inner), 0.0)
    ds.copy_(g.mul_((coef * inv_t)[:, None]))


def _coefficients(grad, totals, kept, config):
    """``grad ce_weight / R`` per row (R,), 0 on the rows not kept: the loss's factors of the rows'
    divergence gradients (``grad``: 0-dim, or one per row with totals ``R = 1``)."""
    scale = grad.to(totals.dtype) * config.ce_weight / totals[TOTAL_ROWS].clamp_min(1.0)
    return torch.where(kept, scale, 0.0)


def jsd_row_stats_torch(student, teacher, labels, config, totals=None, need_ds=False):
    """The statistics ``(B, NUM_STATS)`` of the generalized JSD of the rows: maxima, normaliser
    rests, the divergence (``STAT_A``), its KL sums, kept and label-error flags; with ``totals``
    (the batch's, known before the rows) and ``need_ds``, also ``(ds, empty)``, the student's
    gradient for an incoming gradient of 1, each block's formed while it is in cache."""
    dtype = compute_dtype(student, teacher)
    stats = student.new_zeros(student.shape[0], NUM_STATS, dtype=dtype)
    ds, dt = empty_gradients(student, teacher, need_ds, False)
    scratch, blocks = scratch_and_blocks(student, dtype)
    for block in blocks:
        s, t, kept, bad = kept_logits(student[block], teacher[block],
                                      None if labels is None else labels[block], config, scratch)
        out = stats[block]
        out[:, STAT_KEPT] = 1.0 if kept is None else kept.to(dtype)
        out[:, STAT_ERROR] = 0.0 if bad is None else bad.to(dtype)
        coef = None
        if need_ds:
            live = (out[:, STAT_KEPT] > 0) & (out[:, STAT_ERROR] == 0)  # read, label in range
            coef = _coefficients(stats.new_ones(()), totals, live, config)
        _block(s, t, config, out, coef, ds[block] if need_ds else None)
    return (stats, ds, dt) if totals is not None else stats


def jsd_gradients_torch(grad, student, teacher, stats, totals, config, need_ds):
    """``(grad_student, empty)``: the student's gradient ``(B, C)`` in its dtype (empty when not
    needed; the teacher gets none) of the JSD loss scaled by ``grad`` (0-dim, or one per row with
    totals ``R = 1``), from the logits (each block's statistics formed again, as in the forward)
    and the kept flags of the rows' statistics; rows not kept are not read and get 0."""
    ds, dt = empty_gradients(student, teacher, need_ds, False)
    if not need_ds:
        return ds, dt
    kept = stats[:, STAT_KEPT] > 0
    coef = _coefficients(grad, totals, kept, config).expand(student.shape[0])
    for block in row_blocks(*student.shape):
        live = kept[block, None]
        s = student[block].to(stats.dtype).masked_fill(~live, -INF)
        t = teacher[block].to(stats.dtype).masked_fill(~live, -INF)
        _block(s, t, config, torch.empty_like(stats[block]), coef[block], ds[block])
    return ds, dt
