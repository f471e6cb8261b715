"""Plain-PyTorch path of the generalized JSD (``kernels.py`` has the math): its row statistics and
the student's gradient, in ``compute_dtype``, row block by row block (``rank1.torch_impl``'s
blocks, so that temporaries stay in cache). Log-probabilities come from the row maximum and the
normaliser rest ``z - 1`` summed without the maximal term, as on the GKL path."""

import torch

from gkl_kernels.buffers import empty_gradients
from gkl_kernels.core.config import (JSD_FORWARD_KL, JSD_NORMALISERS, JSD_REVERSE_KL, NUM_STATS,
                                     STAT_A, STAT_ERROR, STAT_KEPT, STAT_KL_P, STAT_KL_Q,
                                     STAT_KL_Q_TOP, STAT_MS, STAT_MT, STAT_ZS, STAT_ZT,
                                     TOTAL_ROWS, compute_dtype)
from gkl_kernels.rank1.torch_impl import (INF, finite_ref, kept_logits, row_sum,
                                          scratch_and_blocks)


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


def _log_softmax(x, inv_t, scratch, name, normalisers=None):
    """``(m, rest, log softmax(x / T), softmax(x / T), top)``: the row maxima (R,), the
    normaliser rests ``z - 1`` (R,; -1 for a row of ``-inf``), the log-probabilities (R, C;
    ``-inf`` where ``x`` is), the probabilities and the float mask of the maximal columns (R, C),
    the last three in ``scratch``; ``(m, rest)`` given as ``normalisers`` (those of the whole
    rows; the probabilities the exponentials of their logarithms), or formed here: the rest
    sums ``e - top``, 0 at the maximal columns (``e = 1`` there), so that ``1 + x`` is never
    rounded, and the probabilities are ``e / z``."""
    rows = x.shape[0]
    m = x.amax(dim=1) if normalisers is None else normalisers[0]
    top = torch.eq(x, m[:, None], out=scratch.floats(name + " top", rows))
    z = torch.sub(x, finite_ref(m)[:, None], out=scratch.floats(name, rows))
    if inv_t != 1.0:
        z.mul_(inv_t)
    probabilities = scratch.floats(name + " probabilities", rows)
    if normalisers is None:
        e = torch.exp(z, out=probabilities).sub_(top)
        rest = row_sum(e) + (top.sum(dim=1) - 1.0)
    else:
        rest = normalisers[1]
    rest_or_0 = rest.clamp_min(0.0)[:, None]  # an empty row's rest (-1) as 0: its e are 0
    log_probabilities = z.sub_(rest_or_0.log1p())
    if normalisers is None:
        return m, rest, log_probabilities, e.add_(top).div_(rest_or_0 + 1.0), top
    return m, rest, log_probabilities, torch.exp(log_probabilities, out=probabilities), top


def _log_ratios(log_p, log_q, config, scratch):
    """``(log(P / M), log(Q / M))`` (R, C) from ``delta = log Q - log P``, as the kernels'
    ``_log_ratios`` (None for the side a KL end does not use), in ``scratch``."""
    rows = log_p.shape[0]
    delta = torch.sub(log_q, log_p, out=scratch.floats("delta", rows))
    form = config.jsd_form
    if form == JSD_FORWARD_KL:
        return delta.neg_(), None
    if form == JSD_REVERSE_KL:
        return None, delta
    # the smaller of the two directly, -log(1 + a expm1(-|delta|)) (a = beta where Q >= P, else
    # 1 - beta), the other from it and delta: neither cancels
    beta = config.beta
    share = torch.ge(delta, 0.0, out=scratch.floats("share", rows)).mul_(2.0 * beta - 1.0).add_(
        1.0 - beta)
    small = _expm1_(torch.abs(delta, out=scratch.floats("log_pm", rows)).neg_()).mul_(
        share).log1p_().neg_()
    positive = torch.clamp_min(delta, 0.0, out=share)
    log_qm = delta.clamp_max_(0.0).add_(small)
    return small.sub_(positive), log_qm


def _expm1_(x):
    """``exp(x) - 1`` of ``x <= 0``, in place; under ``torch.compile`` as ``2 u / (1 - u)``, ``u =
    tanh(x / 2)`` (inductor's vectorised CPU ``expm1`` is ``exp(x) - 1``, which cancels near 0)."""
    if not torch.compiler.is_compiling():
        return x.expm1_()
    u = torch.tanh(x.mul_(0.5))
    return torch.div(u, 1.0 - u, out=x).mul_(2.0)


def _nan_as_0_(x):
    """``x`` with NaN as 0 (infinities kept), in place; under ``torch.compile`` as ``where(x ==
    x, x, 0)`` (inductor tests ``isnan`` one lane at a time on CPU)."""
    if not torch.compiler.is_compiling():
        return x.nan_to_num_(0.0, INF, -INF)
    return x.copy_(torch.where(x == x, x, 0.0))


def _kl_terms(x, log_ratio, out):
    """``x_j log(x_j / m_j)`` (R, C) into ``out`` (it may be ``log_ratio``), 0 for ``x_j = 0``
    (``0 x (-inf)``); None for a side not used."""
    if log_ratio is None:
        return None
    return _nan_as_0_(torch.mul(x, log_ratio, out=out))


def _kl_sums(p, log_pm, q_terms, top_s, scratch):
    """``(KL(P || M), the maximal classes' part of KL(Q || M), the others' part)`` (R,) each, 0
    for a side not used; ``log_pm`` is overwritten. An infinite term (reverse KL where P = 0 <
    Q) is in one of the two parts: inf x 0 and inf - inf are taken as 0 there."""
    zero = top_s.new_zeros(()).expand(top_s.shape[0])
    p_terms = _kl_terms(p, log_pm, log_pm)
    kl_p = zero if p_terms is None else row_sum(p_terms)
    if q_terms is None:
        return kl_p, zero, zero
    at_top = _nan_as_0_(torch.mul(q_terms, top_s, out=scratch.floats("at_top", top_s.shape[0])))
    kl_q_top = row_sum(at_top)
    return kl_p, kl_q_top, row_sum(_nan_as_0_(torch.sub(q_terms, at_top, out=at_top)))


def divergence(kl_p, kl_q_top, kl_q, config):
    """The rows' divergence ``w_p KL(P || M) + w_q KL(Q || M)`` from their KL sums (the sums of a
    side whose weight is 0 are not read)."""
    w_p, w_q = jsd_weights(config)
    whole = kl_q_top + kl_q
    return kl_p if w_q == 0 else whole if w_p == 0 else w_p * kl_p + w_q * whole


def _block(s, t, config, out, scratch, coef=None, ds=None, given=None):
    """The statistics of a block of rows (``s``, ``t`` in the compute dtype, ``-inf`` on rows not
    read) written into ``out`` (R, NUM_STATS) except the flags (``config.jsd_round``: all of
    them, the normalisers only, or the KL sums from the normalisers of ``given``); with ``coef``
    (R,) the student's gradient ``coef_b dJSD_b / ds`` written into ``ds`` (R, C): ``q_j (g_j -
    sum_k q_k g_k)``, ``g = w_q log(Q / M)``, or ``q_j - p_j`` for forward KL, scaled by ``1 /
    T``, formed from the same log-probabilities, and from the normalisers and KL sums of
    ``given`` (R, NUM_STATS), the whole rows' statistics, where given (then ``out`` gets only the
    normalisers). At the student's maximal
    classes ``g_j - sum_k q_k g_k`` is ``w_q ((1 - q_j) log(q_j / m_j) - (the other maximal
    classes' terms) - (the rest's))``, ``1 - q_j = rest_s / z_s``, which does not cancel where
    ``q_j`` is near 1. Masks are float (0, 1) and temporaries live in ``scratch``: on CPU
    boolean and fresh ``(R, C)`` tensors cost more than the arithmetic."""
    rows = s.shape[0]
    inv_t = 1.0 / config.temperature
    w_p, w_q = jsd_weights(config)
    ms, rest_s, log_q, q, top_s = _log_softmax(s, inv_t, scratch, "log_q", None if given is None
                                               else (given[:, STAT_MS], given[:, STAT_ZS]))
    mt, rest_t, log_p, p, top_t = _log_softmax(t, inv_t, scratch, "log_p", None if given is None
                                               else (given[:, STAT_MT], given[:, STAT_ZT]))
    out[:, STAT_MS], out[:, STAT_ZS], out[:, STAT_MT], out[:, STAT_ZT] = ms, rest_s, mt, rest_t
    if config.jsd_round == JSD_NORMALISERS:
        return
    log_pm, log_qm = _log_ratios(log_p, log_q, config, scratch)
    q_terms = _kl_terms(q, log_qm, scratch.floats("q_terms", rows))
    if given is not None and coef is not None:  # the gradient from the whole rows' KL sums
        kl_q_top, kl_q = given[:, STAT_KL_Q_TOP], given[:, STAT_KL_Q]
    else:
        kl_p, kl_q_top, kl_q = _kl_sums(p, log_pm, q_terms, top_s, scratch)
        out[:, STAT_KL_P], out[:, STAT_KL_Q_TOP], out[:, STAT_KL_Q] = kl_p, kl_q_top, kl_q
        # a NaN logit: NaN (its terms are 0)
        out[:, STAT_A] = divergence(kl_p, kl_q_top, kl_q, config) + 0.0 * (rest_s + rest_t)
        if coef is None:
            return
    rest_s, rest_t = rest_s.clamp_min(0.0), rest_t.clamp_min(0.0)  # empty rows: 0
    if config.jsd_form == JSD_FORWARD_KL:  # q - p, where both logits are maximal (zt - zs) / zs zt
        g = torch.sub(q, p, out=scratch.floats("g", rows))
        both = top_s.mul_(top_t)
        g.addcmul_(g, both, value=-1.0).addcmul_(both, ((rest_t - rest_s) / (
            (rest_s + 1.0) * (rest_t + 1.0)))[:, None])
        scale = coef * inv_t
    else:  # q (log(Q / M) - whole), at the maximal classes as above (0 x inf where q = 0)
        g = torch.sub(log_qm, (kl_q_top + kl_q)[:, None], out=scratch.floats("g", rows))
        at_top = torch.sub(q_terms, kl_q_top[:, None], out=q_terms).addcmul_(
            log_qm, (rest_s / (rest_s + 1.0))[:, None]).sub_(kl_q[:, None])
        _nan_as_0_(g.addcmul_(g, top_s, value=-1.0).addcmul_(at_top, top_s).mul_(q))
        scale = coef * (w_q * inv_t)
    torch.mul(g, scale[:, None], out=ds) if ds.dtype == g.dtype else \
        ds.copy_(g.mul_(scale[:, None]))


def _coefficients(grad, totals, kept, config):
    """``grad ce_weight / R`` per row (R,), 0 on the rows not kept: the loss's factors of the rows'
    divergence gradients (``grad``: 0-dim, or one per row with totals ``R = 1``)."""
    scale = grad.to(totals.dtype) * config.ce_weight / totals[TOTAL_ROWS].clamp_min(1.0)
    return torch.where(kept, scale, 0.0)


def jsd_row_stats_torch(student, teacher, labels, config, totals=None, need_ds=False, out=None,
                        given=None):
    """The statistics ``(B, NUM_STATS)`` of the generalized JSD of the rows: maxima, normaliser
    rests, the divergence (``STAT_A``), its KL sums, kept and label-error flags (the round
    ``config.jsd_round``; its KL sums from the normalisers of ``given`` ``(B, NUM_STATS)``); with
    ``totals`` (the batch's, known before the rows) and ``need_ds``, also ``(ds, empty)``, the
    student's gradient for an incoming gradient of 1, each block's formed while it is in cache,
    written into ``out`` where given (``(B, C)``, maybe ``student`` itself: a block is written
    once it is read)."""
    dtype = compute_dtype(student, teacher)
    stats = student.new_zeros(student.shape[0], NUM_STATS, dtype=dtype)
    ds, dt = empty_gradients(student, teacher, need_ds and out is None, False)
    ds = ds if out is None or not need_ds else out
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
        _block(s, t, config, out, scratch, coef, ds[block] if need_ds else None,
               None if given is None else given[block])
    return (stats, ds, dt) if totals is not None else stats


def jsd_gradients_torch(grad, student, teacher, stats, totals, config, need_ds):
    """``(grad_student, empty)``: the student's gradient ``(B, C)`` in its dtype (empty when not
    needed; the teacher gets none) of the JSD loss scaled by ``grad`` (0-dim, or one per row with
    totals ``R = 1``), from the logits and the rows' statistics (their normalisers, KL sums and
    kept flags; those of the whole rows when the logits are a vocabulary shard); rows not kept
    are not read and get 0."""
    ds, dt = empty_gradients(student, teacher, need_ds, False)
    if not need_ds:
        return ds, dt
    kept = stats[:, STAT_KEPT] > 0
    coef = _coefficients(grad, totals, kept, config).expand(student.shape[0])
    scratch, blocks = scratch_and_blocks(student, stats.dtype)
    masked = stats.new_full((), -INF)
    for block in blocks:
        live, rows = kept[block, None], block.stop - block.start
        s, t = (torch.where(live, scratch.floats(name, rows).copy_(x[block]), masked,
                            out=scratch.floats(name, rows))
                for name, x in (("s", student), ("t", teacher)))
        _block(s, t, config, torch.empty_like(stats[block]), scratch, coef[block], ds[block],
               stats[block])
    return ds, dt
