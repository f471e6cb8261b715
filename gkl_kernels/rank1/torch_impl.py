"""Plain-PyTorch rank-one path: the statistics, loss and gradients of ``kernels.py`` (see there for
the math), each row taken as one tile, vectorised over the batch, in float32 (float64 for float64
logits: ``compute_dtype``); and
``merge_row_stats``, the rule that combines the statistics of two column parts of the same rows
(vocabulary shards).

Used for CPU tensors and with ``backend="torch"``. When a backward pass will follow, the forward
keeps the two ``(B, C)`` gradient directions (``softmax(s/T) - softmax(t/T)`` and ``v' (d - mu)``),
so that the backward is two products: the memory of two ``B x C`` float32 tensors (as
``F.kl_div``'s saved log-probabilities) traded for recomputation.
"""

import math

import torch

from gkl_kernels.rank1.config import (NUM_STATS, NUM_TOTALS, SOURCE_NONE, SOURCE_PAIRS,
                                      SOURCE_PRIOR, SOURCE_TEACHER, STAT_A, STAT_DM, STAT_ERROR,
                                      STAT_KEPT, STAT_L, STAT_M2, STAT_MS, STAT_MT, STAT_PH,
                                      STAT_PL, STAT_W, STAT_ZS, STAT_ZT, STAT_ZW, TOTAL_DEN,
                                      TOTAL_K, TOTAL_ROWS, compute_dtype)

INF = float("inf")


def _two_sum(a, b):
    h = a + b
    bb = h - a
    return h, (a - (h - bb)) + (b - bb)


def _ref(m):
    return torch.where(m != -INF, m, 0.0)


def _scaled(x, factor):
    """``x * factor``, in place (``x`` is a temporary), skipped for a factor of 1."""
    return x if factor == 1.0 else x.mul_(factor)


def _rescale(m_part, m, inv_temperature):
    return torch.where(m_part != -INF, ((m_part - m) * inv_temperature).exp(), 0.0)


def given_factor(factor, labels, config, dtype):
    """The given weights ``(B, C)`` in ``dtype``: ``prior[labels] ** gamma`` (``0 ** 0 = 1``) or
    the explicit factor."""
    if config.source != SOURCE_PRIOR:
        return factor.to(dtype)
    rows = factor.index_select(0, labels).to(dtype)
    if config.gamma == 0.0:
        return torch.ones_like(rows)
    # exp(gamma log p), 0 for p = 0: about 4 times faster than a fractional pow on CPU
    return rows if config.gamma == 1.0 else rows.log_().mul_(config.gamma).exp_()


def _kept_logits(student, teacher, labels, config):
    """s, t in ``compute_dtype``, ``-inf`` on rows not read (ignored, or with a bad label); the
    kept mask and the bad-label mask (B,), None without labels."""
    dtype = compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    if not config.has_labels:
        return s, t, None, None
    kept = labels != config.ignore_index
    bad = kept & ((labels < 0) | (labels >= (config.num_labels or s.shape[1])))
    live = (kept & ~bad)[:, None]
    return torch.where(live, s, -INF), torch.where(live, t, -INF), kept, bad


def _usable_labels(labels, kept, bad):
    """Labels to gather prior rows with: 0 where a row is not read."""
    return labels if kept is None else torch.where(kept & ~bad, labels, 0)


def _scaled_factor(t, v, in_wmse, mt, scale, config):
    """``v'``: ``exp(gamma (t - m_t) / T2)``, 0 outside the wMSE (teacher), or ``v 2^-L`` (``v``
    given; the caller masks it)."""
    if config.source == SOURCE_TEACHER:
        v = _scaled(t - _ref(mt)[:, None], config.gamma / config.weight_temperature).exp_()
        return torch.where(in_wmse, v, 0.0)
    return v * torch.exp2(-_ref(scale))[:, None]


def row_stats_torch(student, teacher, factor, labels, config, keep_directions):
    """``(stats (B, NUM_STATS), softmax_difference, weighted_deviation)``: the kernels' statistics
    and, when ``keep_directions``, ``q - p`` and ``v' (d - mu)`` (else empty)."""
    s, t, kept, bad = _kept_logits(student, teacher, labels, config)
    zeros = s.new_zeros(s.shape[0])
    columns = [zeros] * NUM_STATS
    columns[STAT_KEPT] = zeros + 1.0 if kept is None else kept.to(s.dtype)
    if bad is not None:
        columns[STAT_ERROR] = bad.to(s.dtype)
    mt = t.amax(dim=1)
    columns[STAT_MT] = mt
    columns[STAT_MS] = columns[STAT_L] = zeros - INF
    softmax_difference, weighted_deviation = s.new_empty(0), s.new_empty(0)
    inv_t = 1.0 / config.temperature
    ref_t = _ref(mt)[:, None]
    if config.with_ce:
        ms = s.amax(dim=1)
        ref_s = _ref(ms)[:, None]
        e_s, e_t = _scaled(s - ref_s, inv_t).exp_(), _scaled(t - ref_t, inv_t).exp_()
        zs, zt = e_s.sum(dim=1), e_t.sum(dim=1)
        spread = (ref_s - s).mul_(e_t)
        columns[STAT_A] = torch.where(e_t != 0, spread, 0.0).sum(dim=1)
        columns[STAT_MS], columns[STAT_ZS], columns[STAT_ZT] = ms, zs, zt
        if keep_directions:
            softmax_difference = e_s.div_(zs.clamp_min(1e-45)[:, None]).sub_(
                e_t.div_(zt.clamp_min(1e-45)[:, None]))
    if config.source < SOURCE_NONE:
        in_wmse = (s != -INF) & (t != -INF)
        v = None
        if config.source == SOURCE_TEACHER:
            columns[STAT_ZW] = _scaled(t - ref_t, 1.0 / config.weight_temperature).exp_().sum(1)
        else:
            # the weights' values are checked before (host or device-side assertions)
            v = torch.where(in_wmse, given_factor(factor, _usable_labels(labels, kept, bad),
                                                  config, s.dtype), 0.0)
            top = v.amax(dim=1)
            columns[STAT_L] = torch.where(top > 0, torch.floor(torch.log2(top)), -INF)
        v = _scaled_factor(t, v, in_wmse, mt, columns[STAT_L], config)
        hi, lo = _two_sum(t, -s)
        hi, lo = torch.where(in_wmse, hi, 0.0), torch.where(in_wmse, lo, 0.0)
        weight = v.sum(dim=1)
        safe = torch.where(weight != 0, weight, 1.0)
        heaviest = v.argmax(dim=1, keepdim=True)
        ph, pl = hi.gather(1, heaviest), lo.gather(1, heaviest)
        # outside the wMSE v' = 0: those (finite) deviations weigh nothing
        dev = (hi - ph).add_(lo - pl)
        rough = torch.linalg.vecdot(v, dev) / safe
        dev = dev.sub_(rough[:, None])
        residual = torch.linalg.vecdot(v, dev) / safe
        dev = dev.sub_(residual[:, None])
        weighted = v.mul_(dev)
        columns[STAT_W] = weight
        columns[STAT_PH], columns[STAT_PL] = ph[:, 0], pl[:, 0]
        columns[STAT_DM] = rough + residual
        columns[STAT_M2] = torch.linalg.vecdot(weighted, dev)
        if keep_directions:
            weighted_deviation = weighted
    return torch.stack(columns, dim=1), softmax_difference, weighted_deviation


def finish_rows_torch(stats, config):
    """``(E, wmse', ce)`` per row (B,), as ``kernels.finish_row``."""
    wmse = 2.0 * stats[:, STAT_W] * stats[:, STAT_M2]
    if config.source == SOURCE_TEACHER:
        z_w = stats[:, STAT_ZW]
        exponent = -config.gamma * torch.log2(torch.where(z_w != 0, z_w, 1.0))
    elif config.source == SOURCE_PAIRS:  # the wMSE itself, weights unscaled
        exponent, wmse = torch.zeros_like(stats[:, STAT_W]), stats[:, STAT_M2]
    else:
        exponent = stats[:, STAT_L]
    zt, a = stats[:, STAT_ZT], stats[:, STAT_A]
    ce = torch.where(a != INF, a / (config.temperature * torch.where(zt != 0, zt, 1.0))
                     + stats[:, STAT_ZS].log(), a)
    return exponent, wmse, torch.where(zt != 0, ce, 0.0)


def row_losses_torch(stats, config):
    """Per-row losses (B,) in the statistics' dtype, ``mse_weight wmse_b / 4 + ce_weight CE_b``
    (0 on rows not kept), from the rows' statistics of either backend."""
    exponent, wmse, ce = finish_rows_torch(stats, config)
    losses = torch.zeros_like(ce)
    if config.with_wmse:
        f = torch.exp2(exponent)
        losses = (config.mse_weight * 0.25) * torch.where(stats[:, STAT_W] != 0, f * (f * wmse),
                                                          0.0)
    if config.with_ce:
        losses = losses + config.ce_weight * ce
    return torch.where(stats[:, STAT_KEPT] > 0, losses, 0.0)


def finish_loss_torch(stats, config):
    """``(loss (), totals (NUM_TOTALS,))`` as ``kernels.finish_loss_kernel``."""
    exponent, wmse, ce = finish_rows_torch(stats, config)
    kept = stats[:, STAT_KEPT] > 0
    rows = kept.sum(dtype=stats.dtype)
    counted = kept & (stats[:, STAT_W] != 0)
    top = torch.zeros_like(rows)
    if not config.normalize_batch:
        top = torch.where(counted, exponent, -INF).amax()
        top = torch.where(top != -INF, top, 0.0)
    f = torch.exp2(torch.where(counted, exponent, top) - top)
    wmse_sum = torch.where(counted, f * f * wmse, 0.0).sum()
    fw = f * stats[:, STAT_W]
    den = torch.where(counted, fw if config.source == SOURCE_PAIRS else fw * fw, 0.0).sum()
    ce_sum = torch.where(kept, ce, 0.0).sum()
    loss = torch.zeros_like(rows)
    if config.with_wmse:
        norm = rows.clamp_min(1.0) if config.normalize_batch else torch.where(den != 0, den, INF)
        loss = (config.mse_weight * 0.25) * wmse_sum / norm
    if config.with_ce:
        loss = loss + config.ce_weight * ce_sum / rows.clamp_min(1.0)
    totals = torch.stack([top, den, rows, wmse_sum, ce_sum, stats[:, STAT_ERROR].amax(),
                          *top.new_zeros(NUM_TOTALS - 6)])
    return loss, totals


def row_coefficients_torch(grad_loss, stats, totals, config):
    """``(coef_d, coef_ce)`` (B,): the factors of ``v' (d - mu)`` and of ``q - p`` in the
    gradient, as ``kernels.loss_backward_kernel``."""
    kept = stats[:, STAT_KEPT] > 0
    rows = totals[TOTAL_ROWS].clamp_min(1.0)
    grad = grad_loss.to(stats.dtype)
    coef_ce = torch.where(kept, grad * (config.ce_weight / config.temperature) / rows, 0.0)
    if not config.with_wmse:
        return None, coef_ce
    exponent, _, _ = finish_rows_torch(stats, config)
    weight, top, den = stats[:, STAT_W], totals[TOTAL_K], totals[TOTAL_DEN]
    f = torch.exp2(torch.where(weight != 0, exponent, top) - top)
    norm = 1.0 / rows if config.normalize_batch else torch.where(den != 0, 1.0 / den, 0.0)
    if config.source == SOURCE_PAIRS:  # d loss / d d = (mse_weight / 4N) 2 g
        return torch.where(kept, grad * (0.5 * config.mse_weight) * norm, 0.0), coef_ce
    coef_d = torch.where(kept & (weight != 0), grad * config.mse_weight * norm * (f * weight) * f,
                         0.0)
    return coef_d, coef_ce


def loss_backward_torch(grad_loss, student, teacher, factor, labels, stats, totals, config,
                        need_ds, need_dt, softmax_difference, weighted_deviation):
    """``(grad_student, grad_teacher)`` in the logits' dtypes (empty when not needed), from the
    kept directions when there are some, else recomputed from the logits and the statistics."""
    ds, dt = loss_gradients_torch(grad_loss, student, teacher, factor, labels, stats, totals,
                                  config, need_ds, need_dt, softmax_difference, weighted_deviation)
    return ds.to(student.dtype), dt.to(teacher.dtype)


def loss_gradients_torch(grad_loss, student, teacher, factor, labels, stats, totals, config,
                         need_ds, need_dt, softmax_difference, weighted_deviation):
    """``loss_backward_torch``'s gradients in the statistics' dtype."""
    coef_d, coef_ce = row_coefficients_torch(grad_loss, stats, totals, config)
    if (config.with_ce and not softmax_difference.numel()) or (
            config.with_wmse and not weighted_deviation.numel()):
        softmax_difference, weighted_deviation = gradient_directions_torch(
            student, teacher, factor, labels, stats, config)
    g_d = weighted_deviation * coef_d[:, None] if config.with_wmse else None
    ds = dt = student.new_empty(0)
    if need_ds:
        ds = softmax_difference * coef_ce[:, None] if config.with_ce \
            else torch.zeros(student.shape, dtype=stats.dtype, device=student.device)
        if config.symmetric and g_d is not None:
            ds = ds - g_d
    if need_dt:
        dt = g_d if g_d is not None else torch.zeros_like(teacher, dtype=stats.dtype)
    return ds, dt


def gradient_directions_torch(student, teacher, factor, labels, stats, config):
    """``(q - p, v' (d - mu))`` (B, C) from the logits and merged statistics (each
    empty when the loss has no such term); ignored rows give zeros."""
    s, t, kept, bad = _kept_logits(student, teacher, labels, config)
    softmax_difference, weighted_deviation = s.new_empty(0), s.new_empty(0)
    mt = stats[:, STAT_MT]
    if config.with_ce:
        ms, inv_t = stats[:, STAT_MS], 1.0 / config.temperature
        log_zs = torch.where(stats[:, STAT_ZS] != 0, stats[:, STAT_ZS], 1.0).log()
        log_zt = torch.where(stats[:, STAT_ZT] != 0, stats[:, STAT_ZT], 1.0).log()
        q = torch.where(s != -INF, ((s - _ref(ms)[:, None]) * inv_t - log_zs[:, None]).exp(), 0.0)
        p = torch.where(t != -INF, ((t - _ref(mt)[:, None]) * inv_t - log_zt[:, None]).exp(), 0.0)
        softmax_difference = q.sub_(p)
    if config.with_wmse:
        in_wmse = (s != -INF) & (t != -INF)
        v = None if config.source == SOURCE_TEACHER else given_factor(
            factor, _usable_labels(labels, kept, bad), config, s.dtype)
        v = _scaled_factor(t, v, in_wmse, mt, stats[:, STAT_L], config)
        hi, lo = _two_sum(t, -s)
        dev = ((hi - stats[:, STAT_PH, None]) + (lo - stats[:, STAT_PL, None])) - \
            stats[:, STAT_DM, None]
        weighted_deviation = torch.where(in_wmse, v * dev, 0.0)
    return softmax_difference, weighted_deviation


def merge_row_stats(a, b, config):
    """The statistics of the same rows over the union of two column parts (``a``, ``b``:
    ``(B, NUM_STATS)``): the rule the kernels apply between tiles, associative up to rounding."""
    out = a.clone()
    inv_t = 1.0 / config.temperature
    ms = torch.maximum(a[:, STAT_MS], b[:, STAT_MS])
    mt = torch.maximum(a[:, STAT_MT], b[:, STAT_MT])
    rt_a, rt_b = _rescale(a[:, STAT_MT], mt, inv_t), _rescale(b[:, STAT_MT], mt, inv_t)
    shifted = [torch.where(x[:, STAT_ZT] != 0, x[:, STAT_ZT] * (_ref(ms) - _ref(x[:, STAT_MS])),
                           0.0) for x in (a, b)]
    out[:, STAT_A] = torch.where(rt_a != 0, rt_a * (a[:, STAT_A] + shifted[0]), 0.0) + \
        torch.where(rt_b != 0, rt_b * (b[:, STAT_A] + shifted[1]), 0.0)
    out[:, STAT_ZS] = a[:, STAT_ZS] * _rescale(a[:, STAT_MS], ms, inv_t) + \
        b[:, STAT_ZS] * _rescale(b[:, STAT_MS], ms, inv_t)
    out[:, STAT_ZT] = a[:, STAT_ZT] * rt_a + b[:, STAT_ZT] * rt_b
    inv_t2 = 1.0 / config.weight_temperature
    out[:, STAT_ZW] = a[:, STAT_ZW] * _rescale(a[:, STAT_MT], mt, inv_t2) + \
        b[:, STAT_ZW] * _rescale(b[:, STAT_MT], mt, inv_t2)
    out[:, STAT_MS], out[:, STAT_MT] = ms, mt
    if config.source == SOURCE_TEACHER:
        gamma_t2 = config.gamma * inv_t2 * math.log2(math.e)
        f_a, f_b = (torch.where(x[:, STAT_MT] != -INF, torch.exp2((x[:, STAT_MT] - mt) * gamma_t2),
                                0.0) for x in (a, b))
    else:
        scale = torch.maximum(a[:, STAT_L], b[:, STAT_L])
        f_a, f_b = (torch.where(x[:, STAT_L] != -INF, torch.exp2(x[:, STAT_L] - scale), 0.0)
                    for x in (a, b))
        out[:, STAT_L] = scale
    w_a, w_b = a[:, STAT_W] * f_a, b[:, STAT_W] * f_b
    weight = w_a + w_b
    a_heavy = w_a >= w_b
    heavy, light = torch.where(a_heavy[:, None], a, b), torch.where(a_heavy[:, None], b, a)
    w_heavy, w_light = torch.where(a_heavy, w_a, w_b), torch.where(a_heavy, w_b, w_a)
    delta = ((light[:, STAT_PH] - heavy[:, STAT_PH]) + (light[:, STAT_PL] - heavy[:, STAT_PL])) + \
        (light[:, STAT_DM] - heavy[:, STAT_DM])
    frac = w_light / torch.where(weight == 0, 1.0, weight)
    out[:, STAT_PH], out[:, STAT_PL] = heavy[:, STAT_PH], heavy[:, STAT_PL]
    out[:, STAT_DM] = heavy[:, STAT_DM] + torch.where(w_light == 0, 0.0, delta * frac)
    out[:, STAT_W] = weight
    out[:, STAT_M2] = a[:, STAT_M2] * f_a + b[:, STAT_M2] * f_b + \
        torch.where(w_light == 0, 0.0, delta * delta * w_heavy * frac)
    out[:, STAT_ERROR] = torch.maximum(a[:, STAT_ERROR], b[:, STAT_ERROR])
    return out
