"""The literal formulas of docs/SPEC.md, with every pairwise tensor built explicitly.

Shapes: logits ``s``, ``t`` are ``(B, C)``; pair weights ``w`` are ``(B, C, C)``;
``Dt[b, j, k] = t[b, j] - t[b, k]`` and likewise ``Ds``.
"""

import torch
import torch.nn.functional as F


def rank1_factor_reference(teacher, *, labels=None, class_prior=None, weights=None,
                           gamma=1.0, weight_temperature=1.0):
    """The rank-one factor ``v`` (B, C): ``weights``, else ``P[y] ** gamma`` built as the authors'
    ``onehot(y) @ P``, else ``softmax(t / T2) ** gamma``. Always a constant (detached)."""
    if weights is not None:
        return weights.detach()
    if class_prior is not None:
        onehot = F.one_hot(labels, teacher.shape[1]).to(class_prior.dtype)
        return (onehot @ class_prior).detach() ** gamma
    return torch.softmax(teacher.detach() / weight_temperature, dim=1) ** gamma


def pair_weights_reference(weights, batch, *, shared=False):
    """Expand any weight shape to the full ``(B, C, C)`` pair-weight tensor: a ``(B, C)`` rank-one
    factor ``v`` gives ``v_j v_k``; a ``(C, C)`` matrix (``shared=True``) is repeated for every row;
    a ``(B, C, C)`` tensor is returned as given."""
    if weights.dim() == 3:
        return weights
    if shared:
        return weights.expand(batch, *weights.shape)
    return weights[:, :, None] * weights[:, None, :]


def pairwise_wmse_reference(student, teacher, pair_weights, *, stop_student=False):
    """``wmse[b] = sum_{j,k} w[b,j,k] * (Dt[b,j,k] - Ds[b,j,k])^2`` per row, shape (B,).

    ``pair_weights`` is the full ``(B, C, C)`` tensor (see ``pair_weights_reference``); it is
    detached. ``stop_student`` detaches ``Ds`` (DKL: no wMSE gradient to the student)."""
    dt = teacher[:, :, None] - teacher[:, None, :]
    ds = student[:, :, None] - student[:, None, :]
    if stop_student:
        ds = ds.detach()
    return (pair_weights.detach() * (dt - ds) ** 2).sum(dim=(1, 2))


def rank1_wmse_reference(student, teacher, factor, *, stop_student=False):
    """The O(C) identity of docs/SPEC.md in its uncentred form, ``2 (W sum_j v_j d_j^2 - (sum_j v_j
    d_j)^2)`` with ``d = t - s``, ``W = sum_j v_j``: the oracle where ``B x C x C`` cannot be built.
    Exact in float64 for logits of moderate size; per row, shape (B,)."""
    d = teacher - (student.detach() if stop_student else student)
    v = factor.detach()
    return 2 * (v.sum(1) * (v * d * d).sum(1) - (v * d).sum(1) ** 2)


def gkl_loss_reference(student, teacher, *, labels=None, class_prior=None, weights=None,
                       weights_kind="factor", gamma=1.0, temperature=1.0, weight_temperature=1.0,
                       mse_weight=1.0, ce_weight=1.0, normalize="weights", symmetric=True,
                       pairwise=True):
    """``L = mse_weight * sum_b wmse[b] / (4 N) + ce_weight * mean_b CE_b`` with
    ``CE_b = -sum_j softmax(t_b / T)_j log_softmax(s_b / T)_j`` (teacher probabilities constant),
    ``N = sum_{b,j,k} w[b,j,k]`` (``normalize="weights"``) or ``B`` (``"batch"``). A batch whose pair
    weights sum to 0 has a wMSE term of 0. ``symmetric=False`` is DKL: the wMSE stops the gradient
    into ``Ds``. ``weights_kind``: ``"factor"`` (``weights`` is ``(B, C)``), ``"shared"``
    (``(C, C)``) or ``"per_row"`` (``(B, C, C)``). ``pairwise=False`` evaluates a rank-one wMSE by
    ``rank1_wmse_reference`` (large C)."""
    batch = student.shape[0]
    if weights is not None and weights_kind != "factor":
        w = pair_weights_reference(weights.detach(), batch, shared=weights_kind == "shared")
        wmse = pairwise_wmse_reference(student, teacher, w, stop_student=not symmetric)
        total = w.sum()
    elif pairwise:
        v = rank1_factor_reference(teacher, labels=labels, class_prior=class_prior,
                                   weights=weights, gamma=gamma,
                                   weight_temperature=weight_temperature)
        w = pair_weights_reference(v, batch)
        wmse = pairwise_wmse_reference(student, teacher, w, stop_student=not symmetric)
        total = w.sum()
    else:
        v = rank1_factor_reference(teacher, labels=labels, class_prior=class_prior,
                                   weights=weights, gamma=gamma,
                                   weight_temperature=weight_temperature)
        wmse = rank1_wmse_reference(student, teacher, v, stop_student=not symmetric)
        total = (v.sum(1) ** 2).sum()
    if normalize == "weights":
        mse_term = torch.where(total == 0, 0.0, wmse.sum() / torch.where(total == 0, 1.0, total))
    elif normalize == "batch":
        mse_term = wmse.sum() / batch
    else:
        raise ValueError(f"normalize must be 'weights' or 'batch', got {normalize!r}")
    p_teacher = torch.softmax(teacher.detach() / temperature, dim=1)
    ce = -(p_teacher * torch.log_softmax(student / temperature, dim=1)).sum(dim=1)
    return mse_weight * mse_term / 4 + ce_weight * ce.mean()
