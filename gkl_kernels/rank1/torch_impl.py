"""Plain-PyTorch O(C) path for rank-one weights: the same row outputs and statistics as the Triton
kernels (see ``kernels.py`` for the math), vectorised over the batch, float32 throughout.

Used for CPU tensors (where it is fast), and on any device with ``backend="torch"``.
"""

import torch

from gkl_kernels.rank1.kernels import NUM_STATS, SOURCE_PRIOR, SOURCE_TEACHER


def _relative_logits(student, teacher):
    """``(s - s_0, t - t_0)`` in float32, the pivot being each row's first element."""
    s = student.float()
    t = teacher.float()
    return s - s[:, :1], t - t[:, :1]


def _factor(t_rel, factor, labels, source, gamma, weight_temperature):
    """``v`` (B, C) float32 and ``lse(t/T2)`` (B,) (zeros unless the teacher source is used)."""
    if source == SOURCE_TEACHER:
        scaled = t_rel / weight_temperature
        lse_w = torch.logsumexp(scaled, dim=1)
        return torch.exp(gamma * (scaled - lse_w[:, None])), lse_w
    lse_w = t_rel.new_zeros(t_rel.shape[0])
    if source == SOURCE_PRIOR:
        return factor[labels].float().pow(gamma), lse_w
    return factor.float(), lse_w


def rank1_rows_forward_torch(student, teacher, factor, labels, source, gamma, temperature,
                             weight_temperature, with_ce):
    """``(wmse (B,), ce (B,), stats (B, 5))`` in float32, as ``rank1_rows_forward``."""
    s_rel, t_rel = _relative_logits(student, teacher)
    v, lse_w = _factor(t_rel, factor, labels, source, gamma, weight_temperature)
    d = t_rel - s_rel
    w_sum = v.sum(dim=1)
    mean = (v * d).sum(dim=1) / torch.where(w_sum > 0, w_sum, 1.0)
    dev = d - mean[:, None]
    wmse = 2.0 * w_sum * (v * dev * dev).sum(dim=1)
    if with_ce:
        s_scaled = s_rel / temperature
        t_scaled = t_rel / temperature
        lse_s = torch.logsumexp(s_scaled, dim=1)
        lse_t = torch.logsumexp(t_scaled, dim=1)
        ce = lse_s - (torch.softmax(t_scaled, dim=1) * s_scaled).sum(dim=1)
    else:
        lse_s = lse_t = ce = torch.zeros_like(w_sum)
    stats = torch.stack([w_sum, mean, lse_s, lse_t, lse_w], dim=1)
    assert stats.shape[1] == NUM_STATS
    return wmse, ce, stats


def rank1_rows_backward_torch(grad_wmse, grad_ce, student, teacher, factor, labels, stats, source,
                              gamma, temperature, weight_temperature, with_ce, symmetric, need_ds,
                              need_dt):
    """``(grad_student, grad_teacher)`` as ``rank1_rows_backward``."""
    s_rel, t_rel = _relative_logits(student, teacher)
    w_sum, mean, lse_s, lse_t, lse_w = stats.unbind(dim=1)
    if source == SOURCE_TEACHER:
        v = torch.exp(gamma * (t_rel / weight_temperature - lse_w[:, None]))
    else:
        v, _ = _factor(t_rel, factor, labels, source, gamma, weight_temperature)
    g_d = (4.0 * grad_wmse.float() * w_sum)[:, None] * v * (t_rel - s_rel - mean[:, None])
    ds = dt = student.new_empty(0)
    if need_ds:
        ds = torch.zeros_like(s_rel)
        if with_ce:
            q = torch.exp(s_rel / temperature - lse_s[:, None])
            p = torch.exp(t_rel / temperature - lse_t[:, None])
            ds = (grad_ce.float() / temperature)[:, None] * (q - p)
        if symmetric:
            ds = ds - g_d
        ds = ds.to(student.dtype)
    if need_dt:
        dt = g_d.to(teacher.dtype)
    return ds, dt
