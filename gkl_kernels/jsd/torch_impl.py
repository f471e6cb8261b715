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
from gkl_kernels.rank1.torch_impl import (INF, difference_at, finite_ref, lowered_rest, row_blocks,
                                          row_max)


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


def _read_rows(student, teacher, labels, block, config, dtype):
    """``(s, t, kept, bad)`` of the rows ``block``: the logits in ``dtype``, ``-inf`` on rows not
    read (ignored, or with a label outside ``[0, C)``), and those rows' flags (R,)."""
    s, t = student[block].to(dtype), teacher[block].to(dtype)
    rows = s.shape[0]
    if labels is None:
        kept = torch.ones(rows, dtype=torch.bool, device=s.device)
        return s, t, kept, torch.zeros_like(kept)
    label = labels[block]
    kept = label != config.ignore_index
    bad = kept & ((label < 0) | (label >= (config.num_labels or s.shape[1])))
    live = (kept & ~bad)[:, None]
    return s.masked_fill(~live, -INF), t.masked_fill(~live, -INF), kept, bad


def _log_softmax(x, inv_t):
    """``(m, rest, log softmax(x / T))``: the row maxima (R,), the normaliser rests ``z - 1``
    (R,; -1 for a row of ``-inf``) and the log-probabilities (R, C), ``-inf`` where ``x`` is."""
    m, top = row_max(x)
    z = (x - finite_ref(m)[:, None]) * inv_t
    rest = lowered_rest(z.exp(), top)
    return m, rest, z - rest.clamp_min(0.0).log1p()[:, None]


def _log_probabilities(x, m, rest, inv_t):
    """``log softmax(x / T)`` (R, C) from the rows' maxima and normaliser rests."""
    return (x - finite_ref(m)[:, None]) * inv_t - rest.clamp_min(0.0).log1p()[:, None]


def _log_mix(x, a):
    """``log((1 - a) + a e^x)`` without cancellation near ``x = 0`` (``log1p`` of ``expm1`` of a
    non-positive argument on each side)."""
    low = torch.log1p(a * torch.expm1(x.clamp_max(0.0)))
    high = x + torch.log1p((1.0 - a) * torch.expm1(-x.clamp_min(0.0)))
    return torch.where(x <= 0, low, high)


def _log_ratios(log_p, log_q, config):
    """``(log(P / M), log(Q / M))`` (R, C) from ``delta = log Q - log P``, as the kernels'
    ``_log_ratios`` (None for the side a KL end does not use)."""
    delta = log_q - log_p
    form = config.jsd_form
    if form == JSD_FORWARD_KL:
        return -delta, None
    if form == JSD_REVERSE_KL:
        return None, delta
    return -_log_mix(delta, 1.0 - config.beta), -_log_mix(-delta, config.beta)


def _kl(log_x, log_ratio, lanes=None):
    """``sum_j x_j log(x_j / m_j)`` per row over ``lanes`` (None: all), 0 for ``x_j = 0`` (and
    for a side not used)."""
    if log_ratio is None:
        return torch.zeros_like(log_x[:, 0])
    present = log_x != -INF
    return torch.where(present if lanes is None else present & lanes, log_x.exp() * log_ratio,
                       0.0).sum(dim=1)


def jsd_row_stats_torch(student, teacher, labels, config):
    """The statistics ``(B, NUM_STATS)`` of the generalized JSD of the rows: maxima, normaliser
    rests, the divergence (``STAT_A``), its two KL sums, kept and label-error flags."""
    dtype = compute_dtype(student, teacher)
    stats = student.new_zeros(student.shape[0], NUM_STATS, dtype=dtype)
    inv_t = 1.0 / config.temperature
    w_p, w_q = jsd_weights(config)
    for block in row_blocks(*student.shape):
        s, t, kept, bad = _read_rows(student, teacher, labels, block, config, dtype)
        ms, rest_s, log_q = _log_softmax(s, inv_t)
        mt, rest_t, log_p = _log_softmax(t, inv_t)
        log_pm, log_qm = _log_ratios(log_p, log_q, config)
        top = s == ms[:, None]
        kl_p, kl_q_top, kl_q = _kl(log_p, log_pm), _kl(log_q, log_qm, top), _kl(log_q, log_qm,
                                                                               ~top)
        out = stats[block]
        out[:, STAT_MS], out[:, STAT_ZS], out[:, STAT_MT], out[:, STAT_ZT] = ms, rest_s, mt, rest_t
        out[:, STAT_KL_P], out[:, STAT_KL_Q_TOP], out[:, STAT_KL_Q] = kl_p, kl_q_top, kl_q
        kl_q = kl_q_top + kl_q
        out[:, STAT_A] = kl_p if w_q == 0 else kl_q if w_p == 0 else w_p * kl_p + w_q * kl_q
        out[:, STAT_KEPT] = kept.to(dtype)
        out[:, STAT_ERROR] = bad.to(dtype)
    return stats


def jsd_gradients_torch(grad, student, teacher, stats, totals, config, need_ds):
    """``(grad_student, empty)``: the student's gradient ``(B, C)`` in its dtype (empty when not
    needed; the teacher gets none) of the JSD loss scaled by ``grad`` (0-dim, or one per row with
    totals ``R = 1``): ``dL/ds_j = c q_j (g_j - sum_k q_k g_k)``, ``g = w_q log(Q / M)``
    (``sum_k q_k g_k = w_q KL(Q || M)``), or ``c (q_j - p_j)`` for forward KL, with ``c = grad
    ce_weight / (T R)`` on kept rows and 0 on the others (not read)."""
    ds, dt = empty_gradients(student, teacher, need_ds, False)
    if not need_ds:
        return ds, dt
    dtype = stats.dtype
    inv_t = 1.0 / config.temperature
    kept = stats[:, STAT_KEPT] > 0
    coef = torch.where(kept, grad.to(dtype) * (config.ce_weight * inv_t) /
                       totals[TOTAL_ROWS].clamp_min(1.0), 0.0)
    _, w_q = jsd_weights(config)
    for block in row_blocks(*student.shape):
        live = kept[block, None]
        s = student[block].to(dtype).masked_fill(~live, -INF)
        t = teacher[block].to(dtype).masked_fill(~live, -INF)
        rows = stats[block]
        rest_s, rest_t = rows[:, STAT_ZS].clamp_min(0.0), rows[:, STAT_ZT].clamp_min(0.0)
        log_q = _log_probabilities(s, rows[:, STAT_MS], rest_s, inv_t)
        log_p = _log_probabilities(t, rows[:, STAT_MT], rest_t, inv_t)
        q = log_q.exp()
        if config.jsd_form == JSD_FORWARD_KL:  # q - p, exact where both logits are maximal
            g = q - log_p.exp()
            top = row_max(s)[1]
            e_s = ((s.gather(1, top) - finite_ref(rows[:, STAT_MS])[:, None]) * inv_t).exp()
            e_t = ((t.gather(1, top) - finite_ref(rows[:, STAT_MT])[:, None]) * inv_t).exp()
            g.scatter_(1, top, difference_at(e_s, e_t, rest_s, rest_t, rest_s + 1.0,
                                             rest_t + 1.0))
        else:
            log_qm = _log_ratios(log_p, log_q, config)[1]
            kl_q_top, kl_q = rows[:, STAT_KL_Q_TOP, None], rows[:, STAT_KL_Q, None]
            at_top = ((rest_s / (rest_s + 1.0))[:, None] * log_qm - (kl_q_top - q * log_qm)) - kl_q
            inner = torch.where(s == rows[:, STAT_MS, None], at_top, log_qm - (kl_q_top + kl_q))
            g = torch.where(q != 0, (w_q * q) * inner, 0.0)
        ds[block] = g * coef[block, None]
    return ds, dt
