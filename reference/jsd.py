"""Pure-PyTorch reference of the generalized Jensen-Shannon divergence, written as TRL and
Liger-Kernel define it: the tests' oracle (evaluate it in float64)."""

import torch


def _kl(log_x, log_y):
    """``sum_j x_j (log x_j - log y_j)`` per row, a term 0 where ``x_j = 0`` (the logs replaced
    there before any arithmetic, so that no NaN reaches the gradient either)."""
    x = log_x.exp()
    present = x > 0
    zero = torch.zeros_like(x)
    log_x, log_y = torch.where(present, log_x, zero), torch.where(present, log_y, zero)
    return torch.where(present, x * (log_x - log_y), zero).sum(-1)


def jsd_rows_reference(student, teacher, *, beta=0.5, temperature=1.0):
    """Per row: ``KL(P || Q)`` for ``beta = 0``, ``KL(Q || P)`` for ``beta = 1``, else
    ``beta KL(P || M) + (1 - beta) KL(Q || M)``, ``M = beta P + (1 - beta) Q``, with
    ``P = softmax(teacher / T)``, ``Q = softmax(student / T)`` over the last dimension."""
    log_q = torch.log_softmax(student / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    if beta == 0:
        return _kl(log_p, log_q)
    if beta == 1:
        return _kl(log_q, log_p)
    m = beta * log_p.exp() + (1 - beta) * log_q.exp()
    log_m = torch.where(m > 0, m, torch.ones_like(m)).log()  # m = 0 only where p = q = 0
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def jsd_loss_reference(student, teacher, *, beta=0.5, temperature=1.0, labels=None,
                       ignore_index=-100):
    """The mean of ``jsd_rows_reference`` over the rows ``(..., C)`` whose label is not
    ``ignore_index`` (0 when none is kept; the other rows are not read)."""
    kept = torch.ones(student.shape[:-1], dtype=torch.bool) if labels is None else \
        labels != ignore_index
    rows = jsd_rows_reference(student[kept], teacher[kept], beta=beta, temperature=temperature)
    return rows.sum() / kept.sum().clamp_min(1)
