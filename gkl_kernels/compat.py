"""Drop-ins for the authors' loss functions (jiequancui/DKL), with their parameter names, order
and defaults, so that their call sites run unchanged:

- ``dkl_loss``: the second paper's GKL (``GKL_KD``, the long-tailed ImageNet script and the
  adversarial-training scripts, which call it without ``temperature``);
- ``ikl_loss``: the first paper's knowledge-distillation ``dkl_loss`` (``IKL_KD``, long-tailed
  ImageNet);
- ``adv_dkl_loss``: the first paper's adversarial-training ``dkl_loss``;
- ``consistency_loss`` and ``ConsistencyLoss``: the first paper's semi-supervised consistency loss
  (``name='ikl'`` is the DKL case).

In the authors' code ``beta`` weighs the wMSE and ``alpha`` the cross-entropy (the paper writes the
opposite); these functions follow the code. Differences from the authors' code: no ``B x C x C``
tensor is built, and the pair weights are constants. With ``GI=True`` the authors build them
under ``torch.no_grad()`` too, so neither gives ``CLASS_PRIOR`` a gradient; with ``GI=False`` the
authors differentiate through ``softmax(teacher / T2) ** gamma``, which changes the teacher's
gradient when the teacher requires one (the student's gradient and the value are the same):
``teacher_weight_gradient=True`` adds that part (``d/dv_j wmse_b = 2 (W (d_j - mu)^2 + M2)``,
``d = t - s``, ``W = sum v``, ``mu``, ``M2`` the ``v``-weighted mean and sum of squares of ``d``).
See docs/DROP_IN.md.
"""

from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from gkl_kernels import validation as check
from gkl_kernels.functional import gkl_loss

ConsistencyName = Literal["ce", "mse", "kl", "ikl"]
CONSISTENCY_NAMES = get_args(ConsistencyName)
KL_TEMPERATURE = 0.5  # the fixed temperature of the authors' name='kl' consistency loss
CE_IGNORE_INDEX = -100  # F.cross_entropy's: name='ce' rows with this class index add 0
MASK_DTYPES = (*check.LOGIT_DTYPES, torch.bool)
DISTILLATION_ARGUMENTS = ("logits_student", "logits_teacher")  # the logits as dkl_loss names them
CONSISTENCY_ARGUMENTS = ("logits", "targets")  # the logits as consistency_loss names them


def dkl_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float = 1.0,
             alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
             CLASS_PRIOR: Optional[Tensor] = None, GI: bool = True, T2: float = 1.0, *,
             teacher_weight_gradient: bool = False) -> Tensor:
    """GKL loss of the second paper's code: ``beta * wMSE / sum(w) / 4 + alpha * CE``, with pair
    weights ``v_j v_k`` (constants). Both logits receive the wMSE gradient (GKL).

    The defaults are those of the authors' adversarial-training ``dkl_loss`` (which has no ``GI``
    or ``T2``: it always uses ``CLASS_PRIOR``, as ``GI=True`` does) and of ``GKL_KD``'s
    (``GI=True``, ``T2=1.0``). Their long-tailed ImageNet script defaults to ``GI=False`` but
    always passes it.

    Args:
        logits_student, logits_teacher: ``(B, C)`` logits.
        temperature: the cross-entropy's temperature.
        alpha: the cross-entropy's factor. beta: the wMSE's factor.
        gamma: ``v = CLASS_PRIOR ** gamma`` (``GI``) or ``softmax(teacher / T2) ** gamma``.
        CLASS_PRIOR: the per-row ``(B, C)`` prior, ``onehot(labels) @ P``; needed when ``GI``.
        GI: use ``CLASS_PRIOR`` for ``v``, else the teacher's softmax.
        T2: the temperature of the teacher weights.
        teacher_weight_gradient: with ``GI=False``, also the teacher's gradient through
            ``softmax(teacher / T2) ** gamma``, as the authors' code gives it (off: the weights
            are constants).

    Returns:
        The loss, float32, 0-dim.
    """
    check.check_finite("gamma", gamma, minimum=0.0)  # before CLASS_PRIOR ** gamma
    prior = _checked_prior(logits_student, logits_teacher, alpha, beta, CLASS_PRIOR, GI, T2)
    weights = None if prior is None else prior.float() ** gamma
    weight_gradient = _wants_weight_gradient(teacher_weight_gradient, GI, logits_teacher)
    loss = gkl_loss(logits_student, logits_teacher, weights=weights,
                    weights_kind=None if prior is None else "factor", gamma=gamma,
                    temperature=temperature, weight_temperature=T2, mse_weight=beta,
                    ce_weight=alpha, normalize="weights", symmetric=True)
    if weight_gradient:
        loss = loss + _weight_gradient_rows(logits_student, logits_teacher, gamma, T2, beta,
                                            True).sum()
    return loss


def _wants_weight_gradient(teacher_weight_gradient, gi, teacher):
    """Whether to add the teacher-weight gradient: asked for, teacher weights (not ``GI``), and
    a teacher that autograd will differentiate."""
    check.check_bool("teacher_weight_gradient", teacher_weight_gradient)
    return (teacher_weight_gradient and not gi and teacher.requires_grad
            and torch.is_grad_enabled())


def _weight_gradient_rows(student, teacher, gamma, t2, mse_weight, normalize_weights):
    """Zeros ``(B,)`` whose gradient is the wMSE term's through ``v = softmax(teacher / T2) **
    gamma``: per row, ``d/dv_j`` of ``mse_weight wmse_b / 4`` (``normalize_weights=False``: the
    caller averages the rows) or of the row's share of ``mse_weight sum_b wmse_b / (4 sum_b
    W_b^2)`` (``True``: the caller sums them). Float32 (float64 logits: float64)."""
    dtype = torch.promote_types(torch.float32, teacher.dtype)
    v = torch.softmax(teacher.to(dtype) / t2, dim=1) ** gamma
    with torch.no_grad():
        factor = v.detach()
        d = teacher.detach().to(dtype) - student.detach().to(dtype)
        weight = factor.sum(dim=1, keepdim=True)
        mean = (factor * d).sum(dim=1, keepdim=True) / weight
        square = (d - mean) ** 2
        m2 = (factor * square).sum(dim=1, keepdim=True)
        grad = (0.5 * mse_weight) * (weight * square + m2)  # d(mse_weight wmse_b / 4) / dv_j
        if normalize_weights:
            norm = (weight * weight).sum()
            wmse_sum = (2.0 * weight * m2).sum()
            grad = grad / norm - (0.5 * mse_weight) * wmse_sum * weight / norm ** 2
        grad = torch.where(factor != 0, grad, 0.0)
    rows = (v * grad).sum(dim=1)
    return rows - rows.detach()


def _check_loss_weights(alpha, beta):
    check.check_finite("alpha", alpha)
    check.check_finite("beta", beta)


def _checked_prior(logits_student, logits_teacher, alpha, beta, class_prior, gi, t2, *,
                   names=DISTILLATION_ARGUMENTS):
    """Check the arguments the code names differently from ``gkl_loss``; the detached per-row
    ``(B, C)`` prior when ``gi``, else None. The logits are ``(B, C)``, as the authors' code
    reads them; ``names``: theirs in the caller's signature."""
    check.check_logits(logits_student, logits_teacher, names=names)
    check.check_positive("T2", t2)
    _check_loss_weights(alpha, beta)
    check.check_bool("GI", gi)
    if not gi:
        return None
    if class_prior is None:
        raise ValueError("GI=True needs CLASS_PRIOR, the per-row (B, C) class prior")
    check.check_weights(class_prior, logits_student, "factor", True, name="CLASS_PRIOR")
    return class_prior.detach()


def ikl_loss(logits_student: Tensor, logits_teacher: Tensor, temperature: float, alpha: float,
             beta: float, CLASS_PRIOR: Optional[Tensor] = None, GI: bool = False,
             T2: float = 100.0, *, teacher_weight_gradient: bool = False) -> Tensor:
    """The first paper's knowledge-distillation loss (its ``dkl_loss`` in ``IKL_KD`` and the
    long-tailed ImageNet script): ``beta * wMSE / B / 4 + alpha * CE``, with pair weights
    ``v_j v_k`` (constants, no power applied). Both logits receive the wMSE gradient.

    Args:
        logits_student, logits_teacher: ``(B, C)`` logits.
        temperature: the cross-entropy's temperature.
        alpha: the cross-entropy's factor. beta: the wMSE's factor.
        CLASS_PRIOR: the per-row ``(B, C)`` prior, ``v = CLASS_PRIOR`` when ``GI``.
        GI: use ``CLASS_PRIOR`` for ``v``, else ``v = softmax(teacher / T2)``.
        T2: the temperature of the teacher weights.
        teacher_weight_gradient: as in ``dkl_loss``.

    Returns:
        The loss, float32, 0-dim.
    """
    weights = _checked_prior(logits_student, logits_teacher, alpha, beta, CLASS_PRIOR, GI, T2)
    weight_gradient = _wants_weight_gradient(teacher_weight_gradient, GI, logits_teacher)
    loss = gkl_loss(logits_student, logits_teacher, weights=weights,
                    weights_kind=None if weights is None else "factor",
                    temperature=temperature, weight_temperature=T2, mse_weight=beta,
                    ce_weight=alpha, normalize="batch", symmetric=True)
    if weight_gradient:
        loss = loss + _weight_gradient_rows(logits_student, logits_teacher, 1.0, T2, beta,
                                            False).mean()
    return loss


def adv_dkl_loss(logits_nat: Tensor, logits_adv: Tensor, weight: Tensor, alpha: float,
                 beta: float) -> Tensor:
    """The first paper's adversarial-training loss: ``beta * wMSE / B / 4 + alpha * CE`` with
    ``CE = -mean_b sum_j softmax(nat)_j log_softmax(adv)_j`` (``softmax(nat)`` a constant). The
    wMSE compares the natural (teacher side) and adversarial (student side) logit differences;
    both logits receive its gradient.

    Args:
        logits_nat, logits_adv: ``(B, C)`` logits of the natural and adversarial inputs.
        weight: the ``(B, C, C)`` pair weights, taken as given (a rank-one ``weight`` is not
            detected: pass its factor to ``gkl_loss(weights=v)`` for the O(C) kernel).
        alpha: the cross-entropy's factor. beta: the wMSE's factor.

    Returns:
        The loss, float32, 0-dim.
    """
    _check_loss_weights(alpha, beta)
    check.check_logits(logits_nat, logits_adv, names=("logits_nat", "logits_adv"))
    check.check_weights(weight, logits_adv, "per_row", True, name="weight")
    return gkl_loss(logits_adv, logits_nat, weights=weight, weights_kind="per_row",
                    mse_weight=beta, ce_weight=alpha, normalize="batch", symmetric=True,
                    check_values=False)


def consistency_loss(logits: Tensor, targets: Tensor, name: ConsistencyName = "ce",
                     mask: Optional[Tensor] = None, temperature: float = 1.0,
                     alpha: Optional[float] = None, beta: Optional[float] = None,
                     CLASS_PRIOR: Optional[Tensor] = None, GI: bool = False,
                     T2: float = 100.0, *, teacher_weight_gradient: bool = False) -> Tensor:
    """The first paper's semi-supervised consistency loss: per-row losses, multiplied by ``mask``,
    then ``.mean()`` over all rows.

    ``name='ikl'`` (DKL): row ``b`` is ``beta * sum_jk w (Dt - Ds)^2 / 4 + alpha * CE_b`` with
    ``CE_b = -sum_j softmax(targets_b / temperature)_j log_softmax(logits_b)_j`` (only the targets
    are scaled; no normalisation of the wMSE), ``w = v_j v_k``, ``v = CLASS_PRIOR`` (per-row
    ``(B, C)``) when ``GI`` else ``softmax(targets / T2)``, constants. ``targets`` are the
    weak-augmentation logits; both sides receive the wMSE gradient. ``alpha`` and ``beta`` are
    required.

    The other names are not GKL and are computed with plain torch, as the authors do: ``'ce'``
    (``targets`` class indices ``(B,)`` or probabilities ``(B, C)``), ``'mse'`` (squared error of
    ``softmax(logits)`` to the probabilities ``targets``, mean over classes) and ``'kl'``
    (``KL(softmax(targets / 0.5) || softmax(logits / 0.5))`` times ``1 - mask``, which is
    required; ``mask`` is not applied again).

    Args:
        logits: ``(B, C)`` logits (the strong augmentation's).
        targets: ``(B, C)`` logits (``'ikl'``, ``'kl'``) or probabilities, or ``(B,)`` int64 /
            int32 class indices (``'ce'``; a row of ``-100`` adds 0, as in ``F.cross_entropy``).
        name: ``'ce'``, ``'mse'``, ``'kl'`` or ``'ikl'``.
        mask: the per-sample row weights, a ``(B,)`` float or bool tensor (nothing is
            broadcast: a ``(B, 1)`` mask is refused), or None.
        temperature: ``'ikl'``: the targets' temperature in the cross-entropy.
        alpha, beta: ``'ikl'``: the cross-entropy's and the wMSE's factors (required).
        CLASS_PRIOR, GI, T2: ``'ikl'``: the pair weights, as in ``ikl_loss``.
        teacher_weight_gradient: ``'ikl'``: as in ``dkl_loss``, for ``targets``.

    Returns:
        The mean loss, 0-dim.
    """
    check.check_choice("name", name, CONSISTENCY_NAMES)
    class_indices = name == "ce" and not (isinstance(targets, Tensor)
                                          and targets.is_floating_point())
    check.check_logits(logits, logits if class_indices else targets,
                       names=CONSISTENCY_ARGUMENTS)
    if class_indices:
        check.check_labels(targets, *logits.shape, logits.device, True, CE_IGNORE_INDEX,
                           name="targets")
    mask = _checked_mask(mask, name, logits)
    weight_gradient = _wants_weight_gradient(teacher_weight_gradient, GI, targets)
    if name == "ikl":
        loss = _ikl_rows(logits, targets, temperature, alpha, beta, CLASS_PRIOR, GI, T2)
        if weight_gradient:
            loss = loss + _weight_gradient_rows(logits, targets, 1.0, T2, beta, False)
    elif name == "mse":
        loss = ((torch.softmax(logits, dim=-1) - targets) ** 2).mean(dim=1)
    elif name == "kl":
        p = torch.softmax(targets / KL_TEMPERATURE, dim=-1)
        log_q = F.log_softmax(logits / KL_TEMPERATURE, dim=-1)
        loss = (torch.special.xlogy(p, p) - p * log_q).sum(dim=1) * (1.0 - mask)
    elif logits.shape == targets.shape:
        loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=1)
    else:
        loss = F.cross_entropy(logits, targets.long(), reduction="none")
    if mask is not None and name != "kl":
        loss = loss * mask
    return loss.mean()


def _checked_mask(mask, name, logits):
    """``consistency_loss``'s ``mask``: None (not for ``'kl'``) or a per-sample ``(B,)`` float or
    bool tensor on the logits' device; a bool mask as float32."""
    if mask is None:
        if name == "kl":
            raise ValueError("name='kl' needs mask: its rows are weighted by 1 - mask")
        return None
    check.check_tensor("mask", mask, logits.shape[:1], MASK_DTYPES, logits.device)
    return mask.float() if mask.dtype == torch.bool else mask


def _ikl_rows(logits, targets, temperature, alpha, beta, class_prior, gi, t2):
    """The ``(B,)`` per-row losses of ``consistency_loss(name='ikl')``."""
    if alpha is None or beta is None:
        raise ValueError(f"name='ikl' needs alpha and beta, got alpha={alpha!r}, beta={beta!r}")
    check.check_positive("temperature", temperature)
    weights = _checked_prior(logits, targets, alpha, beta, class_prior, gi, t2,
                             names=CONSISTENCY_ARGUMENTS)
    kind = None if weights is None else "factor"
    if temperature == 1.0:  # neither side of the cross-entropy is scaled: one call
        return gkl_loss(logits, targets, weights=weights, weights_kind=kind,
                        weight_temperature=t2, mse_weight=beta, ce_weight=alpha,
                        reduction="none")
    # the cross-entropy scales the targets only: its own call, at temperature 1 on targets / T
    wmse = gkl_loss(logits, targets, weights=weights, weights_kind=kind, weight_temperature=t2,
                    mse_weight=beta, ce_weight=0.0, reduction="none")
    ce = gkl_loss(logits, targets / temperature, mse_weight=0.0, ce_weight=alpha,
                  reduction="none")
    return wmse + ce


class ConsistencyLoss(torch.nn.Module):
    """The authors' ``ConsistencyLoss`` module (what their algorithms call as
    ``self.consistency_loss``): ``consistency_loss`` with the module's own default ``T2=1.0``."""

    def forward(self, logits: Tensor, targets: Tensor, name: ConsistencyName = "ce",
                mask: Optional[Tensor] = None, temperature: float = 1.0,
                alpha: Optional[float] = None, beta: Optional[float] = None,
                CLASS_PRIOR: Optional[Tensor] = None, GI: bool = False,
                T2: float = 1.0, *, teacher_weight_gradient: bool = False) -> Tensor:
        """``consistency_loss(logits, targets, name, mask, temperature, alpha, beta, CLASS_PRIOR,
        GI, T2, teacher_weight_gradient=teacher_weight_gradient)``.

        Args:
            logits, targets, name, mask, temperature, alpha, beta, CLASS_PRIOR, GI: as in
                ``consistency_loss``.
            T2: the temperature of the teacher weights (``'ikl'``, ``GI=False``); 1.0 here.
            teacher_weight_gradient: as in ``consistency_loss``.

        Returns:
            The mean loss, 0-dim.
        """
        return consistency_loss(logits, targets, name, mask, temperature, alpha, beta,
                                CLASS_PRIOR, GI, T2,
                                teacher_weight_gradient=teacher_weight_gradient)
