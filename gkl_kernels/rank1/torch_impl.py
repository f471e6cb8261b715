"""Plain-PyTorch O(C) path for rank-one weights: the same row outputs and statistics as the Triton
kernels (see ``kernels.py`` for the math), vectorised over the batch, float32 throughout.

Used for CPU tensors and on any device with ``backend="torch"``. The forward pass makes about 20
elementwise passes over ``B x C`` (temporaries reused in place) and, when gradients will be needed,
keeps the two ``(B, C)`` directions of the gradient, so that the backward pass is two or three
elementwise products: the memory of two ``B x C`` float32 tensors (as ``F.kl_div``'s saved
log-probabilities) traded for recomputing about 15 passes.
"""

import torch

from gkl_kernels.rank1.kernels import SOURCE_NONE, SOURCE_PRIOR, SOURCE_TEACHER


def relative_logits(student, teacher):
    """``(s - s_0, t - t_0)`` in float32, the pivot being each row's first element."""
    s = student.float()
    t = teacher.float()
    return s - s[:, :1], t - t[:, :1]


def _scaled(x, temperature):
    return x if temperature == 1.0 else x * (1.0 / temperature)


def _softmax_and_lse(x):
    """``(softmax(x), logsumexp(x))`` along rows, one exponential per element. ``torch.sum``
    adds by cascade on CPU (accurate at large C; the fused CPU softmaxes are not)."""
    row_max = x.amax(dim=1, keepdim=True)
    exps = (x - row_max).exp_()
    total = exps.sum(dim=1)
    return exps.div_(total[:, None]), row_max[:, 0] + total.log()


def _teacher_factor(t_rel, weight_temperature, lse_w, gamma):
    """``v = softmax(t / T2) ** gamma = exp(gamma (t / T2 - lse(t / T2)))``, (B, C) float32."""
    return _scaled(t_rel, weight_temperature).sub(lse_w[:, None]).mul_(gamma).exp_()


def tensor_factor(factor, labels, source, gamma):
    """``v`` (B, C) float32 from a given tensor: ``prior[labels] ** gamma`` or the explicit factor."""
    if source != SOURCE_PRIOR:
        return factor.float()
    rows = factor.index_select(0, labels).float()
    if gamma == 0.0:  # 0 ** 0 = 1, as torch.pow
        return rows.fill_(1.0)
    # exp(gamma log p), 0 for p = 0: about 4 times faster than a fractional pow on CPU
    return rows if gamma == 1.0 else rows.log_().mul_(gamma).exp_()


def rank1_rows_forward_torch(student, teacher, factor, labels, source, gamma, temperature,
                             weight_temperature, with_ce, keep_directions):
    """``(wmse (B,), ce (B,), stats (B, 5), softmax_difference, weighted_deviation)`` in float32,
    as ``rank1_rows_forward`` and, when ``keep_directions``, the two ``(B, C)`` directions of the
    gradient: ``softmax(s/T) - softmax(t/T)`` (with the cross-entropy) and ``v (d - mu)`` (with
    pair weights); otherwise (and where not needed) empty tensors."""
    s_rel, t_rel = relative_logits(student, teacher)
    zeros = s_rel.new_zeros(s_rel.shape[0])
    lse_s = lse_t = ce = lse_w = zeros
    softmax_difference, weighted_deviation = s_rel.new_empty(0), s_rel.new_empty(0)
    if with_ce:
        s_scaled = _scaled(s_rel, temperature)
        t_scaled = _scaled(t_rel, temperature)
        p, lse_t = _softmax_and_lse(t_scaled)
        if keep_directions:
            q, lse_s = _softmax_and_lse(s_scaled)
            softmax_difference = q.sub_(p)
        else:
            lse_s = torch.logsumexp(s_scaled, dim=1)
        ce = lse_s - torch.linalg.vecdot(p, s_scaled)
    if source == SOURCE_NONE:
        stats = torch.stack([zeros, zeros, lse_s, lse_t, lse_w], dim=1)
        return zeros, ce, stats, softmax_difference, weighted_deviation
    if source == SOURCE_TEACHER:
        same_softmax = with_ce and weight_temperature == temperature
        lse_w = lse_t if same_softmax else torch.logsumexp(_scaled(t_rel, weight_temperature), 1)
        v = p if same_softmax and gamma == 1.0 \
            else _teacher_factor(t_rel, weight_temperature, lse_w, gamma)
    else:
        v = tensor_factor(factor, labels, source, gamma)
    d = t_rel.sub_(s_rel)
    w_sum = v.sum(dim=1)
    mean = torch.linalg.vecdot(v, d).div_(torch.where(w_sum > 0, w_sum, 1.0))
    dev = d.sub_(mean[:, None])
    # v (d - mu): the wMSE's gradient direction, kept for backward or written over s_rel
    weighted_deviation = torch.mul(v, dev, out=torch.empty_like(dev) if keep_directions else s_rel)
    m2 = torch.linalg.vecdot(weighted_deviation, dev)
    if not keep_directions:
        weighted_deviation = s_rel.new_empty(0)
    stats = torch.stack([w_sum, mean, lse_s, lse_t, lse_w], dim=1)
    return 2.0 * w_sum * m2, ce, stats, softmax_difference, weighted_deviation


def rank1_rows_backward_torch(grad_wmse, grad_ce, student, teacher, stats, softmax_difference,
                              weighted_deviation, source, temperature, with_ce, symmetric, need_ds,
                              need_dt):
    """``(grad_student, grad_teacher)`` as ``rank1_rows_backward``, from the directions the
    forward pass kept: ``g_d = 4 g_wmse W v (d - mu)`` and ``ds_ce = g_ce (q - p) / T``."""
    if (with_ce and not softmax_difference.numel()) or (
            source != SOURCE_NONE and not weighted_deviation.numel()):
        raise RuntimeError("rank1_rows was run with keep_directions=False: no backward")
    g_d = None
    if source != SOURCE_NONE:
        coef_d = (4.0 * grad_wmse.float() * stats[:, 0])[:, None]
        g_d = weighted_deviation * coef_d
    ds = dt = student.new_empty(0)
    if need_ds:
        if with_ce:
            ds = softmax_difference * (grad_ce.float() / temperature)[:, None]
            if symmetric and g_d is not None:
                ds.sub_(g_d)
        else:
            ds = -g_d if symmetric else torch.zeros_like(g_d)
        ds = ds.to(student.dtype)
    if need_dt:
        dt = g_d.to(teacher.dtype)
    return ds, dt
