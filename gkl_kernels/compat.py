"""Drop-ins for the authors' loss functions, with their argument order and meaning: ``dkl_loss``
(the second paper's GKL), ``ikl_loss`` and ``adv_dkl_loss`` (the first paper's knowledge
distillation and adversarial training).

In the authors' code ``beta`` weighs the wMSE and ``alpha`` the cross-entropy (the paper writes the
opposite); these functions follow the code. Differences from the authors' code: the pair weights
are always constants here (no gradient flows through ``CLASS_PRIOR`` or the teacher's softmax used
as weights), and no ``B x C x C`` tensor is built.
"""

from gkl_kernels import validation as check
from gkl_kernels.functional import gkl_loss


def dkl_loss(logits_student, logits_teacher, temperature, alpha, beta, gamma, CLASS_PRIOR=None,
             GI=True, T2=1.0):
    """GKL loss of the second paper's code: ``beta * wMSE / sum(w) / 4 + alpha * CE``.

    Pair weights ``v_j v_k`` with ``v = CLASS_PRIOR ** gamma`` when ``GI`` (``CLASS_PRIOR`` is the
    per-row ``(B, C)`` prior, ``onehot(labels) @ P``), else ``v = softmax(teacher / T2) ** gamma``.
    ``temperature`` is the cross-entropy's. Both logits receive the wMSE gradient (GKL).
    """
    check.check_finite("gamma", gamma, minimum=0.0)  # before CLASS_PRIOR ** gamma
    prior = _checked_prior(logits_student, logits_teacher, alpha, beta, CLASS_PRIOR, GI, T2)
    weights = None if prior is None else prior.float() ** gamma
    return gkl_loss(logits_student, logits_teacher, weights=weights,
                    weights_kind=None if prior is None else "factor", gamma=gamma,
                    temperature=temperature, weight_temperature=T2, mse_weight=beta,
                    ce_weight=alpha, normalize="weights", symmetric=True)


def _check_loss_weights(alpha, beta):
    check.check_finite("alpha", alpha)
    check.check_finite("beta", beta)


def _checked_prior(logits_student, logits_teacher, alpha, beta, class_prior, gi, t2):
    """Check the arguments the code names differently from ``gkl_loss``; the detached per-row
    ``(B, C)`` prior when ``gi``, else None."""
    check.check_positive("T2", t2)
    _check_loss_weights(alpha, beta)
    check.check_bool("GI", gi)
    if not gi:
        return None
    if class_prior is None:
        raise ValueError("GI=True needs CLASS_PRIOR, the per-row (B, C) class prior")
    check.check_logits(logits_student, logits_teacher)
    check.check_weights(class_prior, logits_student, "factor", True, name="CLASS_PRIOR")
    return class_prior.detach()


def ikl_loss(logits_student, logits_teacher, temperature, alpha, beta, CLASS_PRIOR=None, GI=False,
             T2=100.0):
    """The first paper's knowledge-distillation loss: ``beta * wMSE / B / 4 + alpha * CE``.

    Pair weights ``v_j v_k`` with ``v = CLASS_PRIOR`` (the per-row ``(B, C)`` prior) when ``GI``,
    else ``v = softmax(teacher / T2)``; no power is applied. ``temperature`` is the
    cross-entropy's. Both logits receive the wMSE gradient.
    """
    weights = _checked_prior(logits_student, logits_teacher, alpha, beta, CLASS_PRIOR, GI, T2)
    return gkl_loss(logits_student, logits_teacher, weights=weights,
                    weights_kind=None if weights is None else "factor",
                    temperature=temperature, weight_temperature=T2, mse_weight=beta,
                    ce_weight=alpha, normalize="batch", symmetric=True)


def adv_dkl_loss(logits_nat, logits_adv, weight, alpha, beta):
    """The first paper's adversarial-training loss: ``beta * wMSE / B / 4 + alpha * CE`` with
    ``CE = -mean_b sum_j softmax(nat)_j log_softmax(adv)_j`` (``softmax(nat)`` a constant).

    ``weight``: the ``(B, C, C)`` pair weights, taken as given (a rank-one ``weight`` is not
    detected: pass its factor to ``gkl_loss(weights=v)`` for the O(C) kernel). The wMSE compares
    the natural (teacher side) and adversarial (student side) logit differences; both logits
    receive its gradient.
    """
    _check_loss_weights(alpha, beta)
    check.check_logits(logits_adv, logits_nat)
    check.check_weights(weight, logits_adv, "per_row", True, name="weight")
    return gkl_loss(logits_adv, logits_nat, weights=weight, weights_kind="per_row",
                    mse_weight=beta, ce_weight=alpha, normalize="batch", symmetric=True,
                    check_values=False)
