"""Helpers of ``test_adversarial.py``: the masked-semantics float64 oracle, the plain float32
baseline, the accuracy rule that compares the package with both, and the hostile inputs.

Both formulas evaluate one expression (``_loss_of_kept_rows``), in float64 for the oracle and in
float32 for the baseline:

    masked_j = (s_j == -inf) | (t_j == -inf)          (dropped from the wMSE: v_j := 0, d_j := 0)
    d = t - s,  W = sum v,  mu = sum v d / W,  wmse = 2 W sum v (d - mu)^2
    N = sum_b W_b^2 ("weights") or B ("batch"),  L_wmse = sum_b wmse_b / (4 N)  (0 when N = 0)
    CE = -sum_j [p_j > 0] p_j log_softmax(s / T)_j,  p = softmax(t / T)
    L = mse_weight * L_wmse + ce_weight * mean_b CE_b

over the rows whose label is not ``ignore_index``; gradients by autograd. The baseline takes the
teacher factor naively, ``softmax(t / T2) ** gamma``; the oracle as ``exp(gamma log_softmax(t /
T2))`` (no underflow of the softmax before the power). For finite inputs this is the reference's
formula (``reference.gkl_loss_reference``), which ``test_adversarial`` checks; the oracle is our
own because the reference's pairwise form cancels in float64 at ``finfo(float32).min`` masks with
nonzero weights (``t_j - t_k`` rounds ``t_k`` away) and its O(C) form at offsets of 1e6.

The baseline is the best of three honest float32 evaluations of that expression, quantity by
quantity (loss, each gradient): on the logits as given, on row-max-shifted logits (what a careful
user's own code does; the shift is a constant per row, so the gradients are the same functions),
and with the wMSE in its pairwise form ``sum_jk v_j v_k (d_j - d_k)^2`` (C <= ``PAIR_FORM_LIMIT``).
A baseline that is itself imprecise (the naive form at per-row offsets) would make the rule loose
exactly where a regression hides.

The baseline applies the masking too (a ``where`` before any arithmetic): evaluated literally,
every ``-inf`` case is NaN (``-inf - -inf`` in ``d``, ``0 * -inf`` in the cross-entropy), which
would make the rule vacuous. Where the loss is +inf (``s_j = -inf`` alone) the package's loss
must be +inf too; its gradients are held to the rule. ``relative_error`` (conftest) divides by
``max(max |expected|, 1e-30)``: a gradient below 1e-30 everywhere is measured on that scale.
"""

import math

import torch

from gkl_kernels import gkl_loss
from tests.conftest import loss_and_grads, relative_error

NEG_INF = float("-inf")
NAMES = ("loss", "grad_student", "grad_teacher")
FLOAT32_FACTOR = 4.0  # the package may be 4 times worse than the plain float32 evaluation...
FLOAT32_FLOOR = 1e-5  # ...or this, whichever is larger
HALF_UNIT = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # half inputs: plain error + a unit
PAIR_FORM_LIMIT = 512  # the baseline's pairwise wMSE builds (rows, C, C) tensors up to this C


def _rank_one_factor(teacher, dtype, exact, labels, class_prior, weights, gamma,
                     weight_temperature):
    """``v`` (rows, C) in ``dtype``, a constant: explicit ``weights``, ``class_prior[labels] **
    gamma`` or the teacher's ``softmax(t / T2) ** gamma`` (in log space when ``exact``)."""
    if weights is not None:
        return weights.detach().to(dtype)
    if class_prior is not None:
        return class_prior.detach().to(dtype)[labels] ** gamma
    scaled = teacher.detach() / weight_temperature
    if not exact:
        return torch.softmax(scaled, dim=1) ** gamma
    log_p = torch.log_softmax(scaled, dim=1)
    absent = log_p == NEG_INF
    return torch.where(absent, 0.0, torch.exp(gamma * torch.where(absent, 0.0, log_p)))


def _loss_of_kept_rows(s, t, v, *, temperature, mse_weight, ce_weight, normalize, symmetric,
                       pairwise=False):
    """The loss of the module docstring on rows ``s``, ``t`` (one dtype) and the factor ``v``; the
    wMSE centred, or ``pairwise`` as ``sum_jk v_j v_k (d_j - d_k)^2``."""
    masked = (s == NEG_INF) | (t == NEG_INF)
    v = torch.where(masked, 0.0, v)
    s_side = s if symmetric else s.detach()
    d = torch.where(masked, 0.0, t) - torch.where(masked, 0.0, s_side)
    w_sum = v.sum(dim=1)
    if pairwise:
        pair_d = d[:, :, None] - d[:, None, :]
        wmse = (v[:, :, None] * v[:, None, :] * pair_d ** 2).sum(dim=(1, 2))
    else:
        mean = (v * d).sum(dim=1) / torch.where(w_sum > 0, w_sum, 1.0)
        wmse = 2 * w_sum * (v * (d - mean[:, None]) ** 2).sum(dim=1)
    if normalize == "weights":
        normaliser = (w_sum ** 2).sum()
    elif normalize == "batch":
        normaliser = s.new_tensor(float(s.shape[0]))
    else:
        raise ValueError(normalize)
    empty = normaliser == 0
    mse_term = torch.where(empty, 0.0, wmse.sum() / torch.where(empty, 1.0, normaliser))
    p = torch.softmax(t.detach() / temperature, dim=1)
    log_q = torch.log_softmax(s / temperature, dim=1)
    ce = -torch.where(p > 0, p * log_q, 0.0).sum(dim=1)
    return mse_weight * mse_term / 4 + ce_weight * ce.sum() / max(s.shape[0], 1)


def _evaluate(student, teacher, dtype, exact, *, labels=None, class_prior=None, weights=None,
              weights_kind="factor", gamma=1.0, temperature=1.0, weight_temperature=1.0,
              mse_weight=1.0, ce_weight=1.0, normalize="weights", symmetric=True,
              ignore_index=-100, pairwise=False):
    """``(loss, grad_student, grad_teacher)`` of the formula in ``dtype``; the gradients have the
    full ``(B, C)`` shape, 0 in ignored rows (which are never read)."""
    if weights is not None and weights_kind != "factor":
        raise ValueError("rank-one (B, C) factors only")
    s_leaf = student.detach().to(dtype).requires_grad_()
    t_leaf = teacher.detach().to(dtype).requires_grad_()
    kept = torch.ones(student.shape[0], dtype=torch.bool)
    if labels is not None:
        kept = labels != ignore_index
    s, t = s_leaf[kept], t_leaf[kept]
    v = _rank_one_factor(t, dtype, exact, labels[kept] if labels is not None else None,
                         class_prior, weights[kept] if weights is not None else None, gamma,
                         weight_temperature)
    loss = _loss_of_kept_rows(s, t, v, temperature=temperature, mse_weight=mse_weight,
                              ce_weight=ce_weight, normalize=normalize, symmetric=symmetric,
                              pairwise=pairwise)
    grad_s, grad_t = torch.autograd.grad(loss, (s_leaf, t_leaf))
    return loss.detach(), grad_s, grad_t


def masked_oracle(student, teacher, **options):
    """The float64 oracle with the masked semantics (``-inf`` classes dropped from the wMSE, ignored
    rows dropped); takes ``gkl_loss``'s keyword arguments (rank-one weight sources)."""
    return _evaluate(student, teacher, torch.float64, True, **options)


def row_max_shifted(x):
    """``x`` minus its row maxima (a constant per row; rows without a finite maximum as given)."""
    top = x.amax(dim=1, keepdim=True)
    return x - torch.where(torch.isfinite(top), top, 0.0)


def plain_float32(student, teacher, **options):
    """The plain float32 baselines: the same formula evaluated in float32 (inputs upcast), centred
    two-pass wMSE, ``torch.log_softmax``, autograd; on the logits as given, on row-max-shifted
    logits and (C <= ``PAIR_FORM_LIMIT``) with the pairwise wMSE. A list of ``(loss, grad_student,
    grad_teacher)``; the rule takes the best of them per quantity."""
    evaluations = [_evaluate(student, teacher, torch.float32, False, **options),
                   _evaluate(row_max_shifted(student), row_max_shifted(teacher), torch.float32,
                             False, **options)]
    if student.shape[-1] <= PAIR_FORM_LIMIT:
        evaluations.append(_evaluate(student, teacher, torch.float32, False, pairwise=True,
                                     **options))
    return evaluations


def bound_for(plain_error, dtype):
    """What the package's relative error may be, given the plain baseline's, for inputs of
    ``dtype``: ``max(4 plain, 1e-5)`` for float32, ``plain + unit`` for float16 / bfloat16."""
    if dtype == torch.float32:
        return max(FLOAT32_FACTOR * plain_error, FLOAT32_FLOOR)
    return plain_error + HALF_UNIT[dtype]


def assert_within_rule(actual, expected, plain, dtype):
    """Loss and both gradients of the package (``actual``) no worse than ``bound_for`` the best
    plain baseline's error (``plain``: ``plain_float32``'s list), both measured against the
    float64 ``expected``. An infinite expected loss
    must be matched exactly (same infinity). A non-finite baseline error would make the rule
    vacuous: such a case is a broken test, and fails."""
    failures = []
    for index, (name, a, e) in enumerate(zip(NAMES, actual, expected)):
        if name == "loss" and not bool(torch.isfinite(e)):
            if not (a.double() == e).item():
                failures.append(f"loss: {a.item()} where the float64 formula gives {e.item()}")
            continue
        baseline = min(relative_error(p[index], e) for p in plain)
        assert math.isfinite(baseline), \
            f"{name}: the plain float32 baseline's error is {baseline}: the rule would be vacuous"
        bound = bound_for(baseline, dtype)
        err = relative_error(a, e)
        if not err <= bound:  # also NaN
            failures.append(f"{name}: relative error {err:.3e} > bound {bound:.3e} "
                            f"(plain float32 {baseline:.3e})")
    assert not failures, "; ".join(failures)


def check_case(student, teacher, *, backend, block_c=None, expected_at=None,
               **options):
    """Run the package on one case and apply the rule; returns ``(actual, expected)``.

    ``expected_at``: other keyword arguments for the oracle and the baseline (the scale test
    compares with the unscaled weights)."""
    reference_options = dict(options, **(expected_at or {}))
    expected = masked_oracle(student, teacher, **reference_options)
    plain = plain_float32(student, teacher, **reference_options)
    actual = loss_and_grads(gkl_loss, student, teacher, backend=backend, block_c=block_c,
                            **options)
    assert actual[0].dtype == torch.float32 and actual[0].dim() == 0
    assert_within_rule(actual, expected, plain, student.dtype)
    return actual, expected


# ----------------------------------------------------------------------------- hostile inputs

def mask_positions(position, num_classes):
    """Columns of a named mask position: the first, a middle, the last column, or several across
    the 16-column tile boundaries (15/16, 31/32) and both ends."""
    if position == "first":
        return [0]
    if position == "middle":
        return [num_classes // 2]
    if position == "last":
        return [num_classes - 1]
    if position == "several":
        return sorted({0, 15, 16, 31, 32, num_classes - 1})
    raise ValueError(position)


def with_columns(x, columns, value):
    """A copy of ``x`` with ``x[:, columns] = value`` (in ``x``'s dtype)."""
    x = x.clone()
    x[:, columns] = value
    return x


def drop_columns(x, columns):
    """``x`` without ``columns`` (dimension 1)."""
    keep = [c for c in range(x.shape[1]) if c not in set(columns)]
    return x[:, keep]


def row_offsets(batch, offset):
    """Per-row offsets ``offset * (1, -1, 2, -0.5, ...)``, (B, 1) float32."""
    pattern = torch.tensor([1.0, -1.0, 2.0, -0.5, 0.25, -3.0, 1.5, -2.0])
    assert batch <= len(pattern)
    return offset * pattern[:batch, None]


def offset_rows(student, teacher, offset, side):
    """Per-row offsets (signs and sizes vary by row) added to s, to t, to both (the same offset:
    d carries none, the softmaxes do) or with opposite signs (d carries twice the offset)."""
    shift = row_offsets(student.shape[0], offset)
    if side in ("student", "both", "opposite"):
        student = student + shift
    if side in ("teacher", "both"):
        teacher = teacher + shift
    if side == "opposite":
        teacher = teacher - shift
    return student, teacher
