"""Drop-ins for the authors' loss functions, with their argument order and meaning.

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
    check.check_positive("T2", T2)
    check.check_finite("alpha", alpha)
    check.check_finite("beta", beta)
    check.check_finite("gamma", gamma, minimum=0.0)  # before CLASS_PRIOR ** gamma
    check.check_bool("GI", GI)
    if GI:
        if CLASS_PRIOR is None:
            raise ValueError("GI=True needs CLASS_PRIOR, the per-row (B, C) class prior")
        check.check_logits(logits_student, logits_teacher)
        check.check_factor("CLASS_PRIOR", CLASS_PRIOR, logits_student, check_values=True)
        weights = CLASS_PRIOR.detach().float() ** gamma
    else:
        weights = None
    return gkl_loss(logits_student, logits_teacher, weights=weights, gamma=gamma,
                    temperature=temperature, weight_temperature=T2, mse_weight=beta,
                    ce_weight=alpha, normalize="weights", symmetric=True)
