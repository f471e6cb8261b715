"""Plain-PyTorch O(C) path for rank-one weights: the same row outputs and statistics as the Triton
kernels (see ``kernels.py`` for the math), vectorised over the batch, float32 throughout.

Used for CPU tensors (where it is fast: about 20 elementwise passes over ``B x C`` forward and as
many backward, temporaries reused in place), and on any device with ``backend="torch"``.
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


def _teacher_factor(t_rel, weight_temperature, lse_w, gamma):
    """``v = softmax(t / T2) ** gamma = exp(gamma (t / T2 - lse(t / T2)))``, (B, C) float32."""
    return _scaled(t_rel, weight_temperature).sub(lse_w[:, None]).mul_(gamma).exp_()


def _tensor_factor(factor, labels, source, gamma):
    """``v`` (B, C) float32 from a given tensor: ``prior[labels] ** gamma`` or the explicit factor."""
    if source != SOURCE_PRIOR:
        return factor.float()
    rows = factor.index_select(0, labels).float()
    if gamma == 0.0:  # 0 ** 0 = 1, as torch.pow
        return rows.fill_(1.0)
    # exp(gamma log p), 0 for p = 0: about 4 times faster than a fractional pow on CPU
    return rows if gamma == 1.0 else rows.log_().mul_(gamma).exp_()


def rank1_rows_forward_torch(student, teacher, factor, labels, source, gamma, temperature,
                             weight_temperature, with_ce):
    """``(wmse (B,), ce (B,), stats (B, 5))`` in float32, as ``rank1_rows_forward``."""
    s_rel, t_rel = relative_logits(student, teacher)
    zeros = s_rel.new_zeros(s_rel.shape[0])
    lse_s = lse_t = ce = lse_w = zeros
    if with_ce:
        # torch.logsumexp sums accurately (cascade); the fused CPU softmaxes do not at large C
        s_scaled = _scaled(s_rel, temperature)
        t_scaled = _scaled(t_rel, temperature)
        lse_s = torch.logsumexp(s_scaled, dim=1)
        lse_t = torch.logsumexp(t_scaled, dim=1)
        p = (t_scaled - lse_t[:, None]).exp_()
        ce = lse_s - torch.linalg.vecdot(p, s_scaled)
    if source == SOURCE_NONE:
        stats = torch.stack([zeros, zeros, lse_s, lse_t, lse_w], dim=1)
        return zeros, ce, stats
    if source == SOURCE_TEACHER:
        same_softmax = with_ce and weight_temperature == temperature
        lse_w = lse_t if same_softmax else torch.logsumexp(_scaled(t_rel, weight_temperature), 1)
        v = p if same_softmax and gamma == 1.0 \
            else _teacher_factor(t_rel, weight_temperature, lse_w, gamma)
    else:
        v = _tensor_factor(factor, labels, source, gamma)
    d = t_rel.sub_(s_rel)
    w_sum = v.sum(dim=1)
    weighted = torch.mul(v, d, out=s_rel)
    mean = weighted.sum(dim=1).div_(torch.where(w_sum > 0, w_sum, 1.0))
    dev = d.sub_(mean[:, None])
    m2 = torch.linalg.vecdot(torch.mul(v, dev, out=weighted), dev)
    stats = torch.stack([w_sum, mean, lse_s, lse_t, lse_w], dim=1)
    return 2.0 * w_sum * m2, ce, stats


def rank1_rows_backward_torch(grad_wmse, grad_ce, student, teacher, factor, labels, stats, source,
                              gamma, temperature, weight_temperature, with_ce, symmetric, need_ds,
                              need_dt):
    """``(grad_student, grad_teacher)`` as ``rank1_rows_backward``."""
    s_rel, t_rel = relative_logits(student, teacher)
    w_sum, mean, lse_s, lse_t, lse_w = stats.unbind(dim=1)
    if source == SOURCE_NONE:
        g_d = torch.zeros_like(s_rel)
    else:
        if source == SOURCE_TEACHER:
            v = _teacher_factor(t_rel, weight_temperature, lse_w, gamma)
        else:
            v = _tensor_factor(factor, labels, source, gamma)
        # g_d = 4 g_wmse W v (d - mu)
        coef_d = (4.0 * grad_wmse.float() * w_sum)[:, None]
        g_d = (t_rel - s_rel).sub_(mean[:, None]).mul_(v).mul_(coef_d)
    ds = dt = student.new_empty(0)
    if need_ds:
        if with_ce:
            q = _scaled(s_rel, temperature).sub_(lse_s[:, None]).exp_()
            p = _scaled(t_rel, temperature).sub_(lse_t[:, None]).exp_()
            ds = q.sub_(p).mul_((grad_ce.float() / temperature)[:, None])
            if symmetric:
                ds.sub_(g_d)
        else:
            ds = -g_d if symmetric else torch.zeros_like(g_d)
        ds = ds.to(student.dtype)
    if need_dt:
        dt = g_d.to(teacher.dtype)
    return ds, dt
