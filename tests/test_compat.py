"""``gkl_kernels.compat`` called exactly as the authors' repository (jiequancui/DKL) calls its loss
functions: their signatures (names, order, defaults), each call form of their scripts
(positional, keyword, omitted defaults), against their definitions written out below in float64
(``B x C x C`` pairwise, small C), values and gradients (the Python blocks of docs/DROP_IN.md run in tests/test_docs.py).

The one documented difference: compat's pair weights are constants. With ``GI=False`` and a
teacher that requires a gradient, the authors also differentiate through ``softmax(t / T2) **
gamma``; there the teacher's gradient is compared with the formula whose weights are detached,
and with ``teacher_weight_gradient=True`` with the authors' whole gradient."""

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F

from gkl_kernels import compat
from tests.conftest import assert_close_rel, relative_error

pytestmark = pytest.mark.entry_point  # the kernels through an entry point: CI runs it once

ROWS, CLASSES = 6, 5
RTOL = 2e-5
REQUIRED = inspect.Parameter.empty

# The authors' signatures: (our function, their parameters with defaults, where they are defined).
AUTHORS_SIGNATURES = {
    "second paper, GKL_KD.py": (compat.dkl_loss, [
        ("logits_student", REQUIRED), ("logits_teacher", REQUIRED), ("temperature", REQUIRED),
        ("alpha", REQUIRED), ("beta", REQUIRED), ("gamma", REQUIRED), ("CLASS_PRIOR", None),
        ("GI", True), ("T2", 1.0)]),
    "second paper, imagenetlt_distill_dkl.py": (compat.dkl_loss, [
        ("logits_student", REQUIRED), ("logits_teacher", REQUIRED), ("temperature", REQUIRED),
        ("alpha", REQUIRED), ("beta", REQUIRED), ("gamma", REQUIRED), ("CLASS_PRIOR", None),
        ("GI", False), ("T2", 1.0)]),
    "second paper, Adv-training-dkl": (compat.dkl_loss, [
        ("logits_student", REQUIRED), ("logits_teacher", REQUIRED), ("temperature", 1.0),
        ("alpha", 1.0), ("beta", 1.0), ("gamma", 1.0), ("CLASS_PRIOR", None)]),
    "first paper, IKL_KD.py and imagenetlt_distill_dkl.py": (compat.ikl_loss, [
        ("logits_student", REQUIRED), ("logits_teacher", REQUIRED), ("temperature", REQUIRED),
        ("alpha", REQUIRED), ("beta", REQUIRED), ("CLASS_PRIOR", None), ("GI", False),
        ("T2", 100.0)]),
    "first paper, Adv-training-dkl": (compat.adv_dkl_loss, [
        ("logits_nat", REQUIRED), ("logits_adv", REQUIRED), ("weight", REQUIRED),
        ("alpha", REQUIRED), ("beta", REQUIRED)]),
    "first paper, consistency.py consistency_loss": (compat.consistency_loss, [
        ("logits", REQUIRED), ("targets", REQUIRED), ("name", "ce"), ("mask", None),
        ("temperature", 1.0), ("alpha", None), ("beta", None), ("CLASS_PRIOR", None),
        ("GI", False), ("T2", 100.0)]),
    "first paper, consistency.py ConsistencyLoss.forward": (compat.ConsistencyLoss().forward, [
        ("logits", REQUIRED), ("targets", REQUIRED), ("name", "ce"), ("mask", None),
        ("temperature", 1.0), ("alpha", None), ("beta", None), ("CLASS_PRIOR", None),
        ("GI", False), ("T2", 1.0)]),
}
# Defaults of theirs that ours cannot share: the long-tailed script's GI=False (GKL_KD's is True,
# and the adversarial scripts, which have no GI, always use the prior); that script always
# passes GI.
DIFFERENT_DEFAULTS = {("second paper, imagenetlt_distill_dkl.py", "GI")}


@pytest.mark.parametrize("where", sorted(AUTHORS_SIGNATURES))
def test_signature_serves_the_authors(where):
    """Ours starts with their parameters in their order; each of their defaults is ours (so every
    call of theirs binds to the same values); ours has no default where theirs has none, unless
    another of their versions gives one."""
    function, theirs = AUTHORS_SIGNATURES[where]
    ours = list(inspect.signature(function).parameters.values())
    assert [p.name for p in ours[:len(theirs)]] == [name for name, _ in theirs]
    for parameter, (name, default) in zip(ours, theirs):
        if default is not REQUIRED and (where, name) not in DIFFERENT_DEFAULTS:
            assert parameter.default == default, f"{name}: {parameter.default!r} != {default!r}"
    for parameter in ours[len(theirs):]:
        assert parameter.default is not REQUIRED, f"{parameter.name} must have a default"


# --------------------------------------------------------------------- the authors' definitions
def outer(v):
    return v[:, :, None] * v[:, None, :]


def wmse_rows(student, teacher, pair_weights):
    """``sum_jk w_bjk (Dt_bjk - Ds_bjk)^2`` per row, ``D_jk = x_j - x_k``."""
    dt = teacher[:, :, None] - teacher[:, None, :]
    ds = student[:, :, None] - student[:, None, :]
    return (pair_weights * (dt - ds) ** 2).sum(dim=(1, 2))


def soft_ce_rows(log_probs_of, probs):
    return -(probs * F.log_softmax(log_probs_of, dim=1)).sum(dim=1)


def teacher_factor(teacher, t2, gamma, weight_gradient):
    v = F.softmax(teacher / t2, dim=1) ** gamma
    return v if weight_gradient else v.detach()


def gkl_float64(student, teacher, prior, *, temperature, alpha, beta, gamma, gi, t2,
                weight_gradient=True):
    """The second paper's ``dkl_loss``: ``beta/4 sum w (Dt - Ds)^2 / sum w + alpha CE``, ``w``
    from ``prior ** gamma`` (no gradient) or from ``softmax(t / T2) ** gamma`` (the authors'
    gradient through it unless ``weight_gradient=False``)."""
    v = prior.detach() ** gamma if gi else teacher_factor(teacher, t2, gamma, weight_gradient)
    w = outer(v)
    ce = soft_ce_rows(student / temperature, F.softmax(teacher.detach() / temperature, dim=1))
    return beta * 0.25 * wmse_rows(student, teacher, w).sum() / w.sum() + alpha * ce.mean()


def ikl_float64(student, teacher, prior, *, temperature, alpha, beta, gi, t2,
                weight_gradient=True):
    """The first paper's knowledge-distillation ``dkl_loss``: the wMSE divided by ``B``, no
    power on the weights."""
    v = prior.detach() if gi else teacher_factor(teacher, t2, 1.0, weight_gradient)
    ce = soft_ce_rows(student / temperature, F.softmax(teacher.detach() / temperature, dim=1))
    return beta * 0.25 * wmse_rows(student, teacher, outer(v)).sum() / student.shape[0] \
        + alpha * ce.mean()


def adv_float64(nat, adv, weight, *, alpha, beta):
    """The first paper's adversarial ``dkl_loss(logits_nat, logits_adv, weight, alpha, beta)``."""
    ce = soft_ce_rows(adv, F.softmax(nat.detach(), dim=1))
    return beta * 0.25 * wmse_rows(adv, nat, weight.detach()).sum() / nat.shape[0] \
        + alpha * ce.mean()


def consistency_ikl_float64(logits, targets, prior, mask, *, temperature, alpha, beta, gi, t2,
                            weight_gradient=True):
    """consistency.py with ``name='ikl'``: per-row ``beta/4 sum w (Dt - Ds)^2 + alpha CE_b``, CE
    of ``softmax(targets / T)`` against the unscaled ``log_softmax(logits)``, times ``mask``,
    mean over the rows."""
    v = prior.detach() if gi else teacher_factor(targets, t2, 1.0, weight_gradient)
    rows = beta * 0.25 * wmse_rows(logits, targets, outer(v)) \
        + alpha * soft_ce_rows(logits, F.softmax(targets.detach() / temperature, dim=1))
    return (rows if mask is None else rows * mask).mean()


# --------------------------------------------------------------------------------- the inputs
def logits_pair(generator):
    return [3 * torch.randn(ROWS, CLASSES, generator=generator) for _ in range(2)]


def per_row_prior(generator):
    """``onehot(y) @ P`` for a row-stochastic ``P`` with some zero entries: ``(B, C)``."""
    prior = torch.rand(CLASSES, CLASSES, generator=generator)
    prior = prior * (torch.rand(CLASSES, CLASSES, generator=generator) > 0.25) + torch.eye(CLASSES)
    prior = prior / prior.sum(1, keepdim=True)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    return F.one_hot(labels, CLASSES).float() @ prior


def run_both(call, formula, tensors, *, detached_formula=None):
    """``call`` on float32 leaves and ``formula`` on float64 leaves of the same ``tensors`` (all
    require a gradient); the values and every gradient agree. ``detached_formula``: the teacher's
    gradient (the second tensor) is compared with it instead (weights constant)."""
    ours = [x.detach().clone().requires_grad_() for x in tensors]
    theirs = [x.detach().double().requires_grad_() for x in tensors]
    loss = call(*ours)
    expected = formula(*theirs)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_rel(loss.detach(), expected.detach(), RTOL, "loss")
    grads = torch.autograd.grad(loss, ours)
    expected_grads = list(torch.autograd.grad(expected, theirs))
    if detached_formula is not None:
        again = [x.detach().double().requires_grad_() for x in tensors]
        expected_grads[1] = torch.autograd.grad(detached_formula(*again), again)[1]
    for index, (grad, want) in enumerate(zip(grads, expected_grads)):
        assert_close_rel(grad, want, RTOL, f"gradient of input {index}")
    return loss


# ------------------------------------------------------------------------- dkl_loss (GKL, v2)
# (how their script calls it, the settings it binds to)
DKL_CALLS = {
    # GKL_KD.forward_train: positional, every argument
    "gkl_kd_positional_prior": (
        lambda s, t, p: compat.dkl_loss(s, t, 4.0, 1.0, 16.0, 0.05, p, True, 4.0),
        dict(temperature=4.0, alpha=1.0, beta=16.0, gamma=0.05, gi=True, t2=4.0)),
    "gkl_kd_positional_teacher": (
        lambda s, t, p: compat.dkl_loss(s, t, 4.0, 1.0, 16.0, 0.05, p, False, 4.0),
        dict(temperature=4.0, alpha=1.0, beta=16.0, gamma=0.05, gi=False, t2=4.0)),
    # imagenetlt_distill_dkl.py: five positional, the rest keywords
    "imagenet_lt_keywords_prior": (
        lambda s, t, p: compat.dkl_loss(s, t, 1.0, 1.0, 0.5, 0.6, CLASS_PRIOR=p, GI=True, T2=1.0),
        dict(temperature=1.0, alpha=1.0, beta=0.5, gamma=0.6, gi=True, t2=1.0)),
    "imagenet_lt_keywords_teacher": (
        lambda s, t, p: compat.dkl_loss(s, t, 2.0, 1.0, 0.5, 0.6, CLASS_PRIOR=p, GI=False,
                                        T2=3.0),
        dict(temperature=2.0, alpha=1.0, beta=0.5, gamma=0.6, gi=False, t2=3.0)),
    # Adv-training-dkl (train loop, perturb_input, TradesAWP.calc_awp): no temperature, no GI
    "adversarial_keywords": (
        lambda s, t, p: compat.dkl_loss(s, t, CLASS_PRIOR=p, alpha=4.0, beta=20.0, gamma=0.4),
        dict(temperature=1.0, alpha=4.0, beta=20.0, gamma=0.4, gi=True, t2=1.0)),
    # every default
    "defaults_prior": (lambda s, t, p: compat.dkl_loss(s, t, CLASS_PRIOR=p),
                       dict(temperature=1.0, alpha=1.0, beta=1.0, gamma=1.0, gi=True, t2=1.0)),
    "defaults_teacher": (lambda s, t, p: compat.dkl_loss(s, t, GI=False),
                         dict(temperature=1.0, alpha=1.0, beta=1.0, gamma=1.0, gi=False, t2=1.0)),
}


@pytest.mark.parametrize("case", sorted(DKL_CALLS))
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["distill", "adversarial"])
def test_dkl_loss_call_forms(case, teacher_grad, generator):
    """Distillation: the teacher is a constant. Adversarial training: both logits come from the
    trained model; with the prior every gradient is theirs (CLASS_PRIOR gets none, as under
    their no_grad), with teacher weights the teacher's is that of constant weights."""
    call, settings = DKL_CALLS[case]
    student, teacher = logits_pair(generator)
    prior = per_row_prior(generator).requires_grad_()

    def formula(s, t, **extra):
        return gkl_float64(s, t if teacher_grad else t.detach(), prior.double(), **settings,
                           **extra)

    detached = None
    if teacher_grad and not settings["gi"]:
        detached = functools.partial(formula, weight_gradient=False)
    if teacher_grad:
        run_both(lambda s, t: call(s, t, prior), formula, [student, teacher],
                 detached_formula=detached)
    else:
        run_both(lambda s: call(s, teacher, prior), lambda s: formula(s, teacher.double()),
                 [student])
    loss = call(student.requires_grad_(), teacher, prior)
    loss.backward()
    assert prior.grad is None  # the authors' GI branch runs under torch.no_grad() as well


def test_dkl_loss_without_a_prior_as_the_authors_refuse(generator):
    """Their GI branch (and the adversarial dkl_loss) asserts CLASS_PRIOR is given."""
    student, teacher = logits_pair(generator)
    with pytest.raises(ValueError, match="CLASS_PRIOR"):
        compat.dkl_loss(student, teacher)
    with pytest.raises(ValueError, match="CLASS_PRIOR"):
        compat.dkl_loss(student, teacher, 4.0, 1.0, 16.0, 0.05, None, True, 4.0)


def test_teacher_weight_gradient_is_the_documented_difference(generator):
    """GI=False with a teacher that requires a gradient: the value and the student's gradient are
    the authors', the teacher's gradient leaves out the part through softmax(t / T2) ** gamma."""
    student, teacher = logits_pair(generator)
    s, t = student.requires_grad_(), teacher.clone().requires_grad_()
    grad_t = torch.autograd.grad(compat.dkl_loss(s, t, 4.0, 1.0, 16.0, 0.05, None, False, 4.0),
                                 t)[0]
    s64, t64 = student.detach().double(), teacher.double().requires_grad_()
    literal = gkl_float64(s64, t64, None, temperature=4.0, alpha=1.0, beta=16.0, gamma=0.05,
                          gi=False, t2=4.0)
    assert relative_error(grad_t, torch.autograd.grad(literal, t64)[0]) > 1e-3


WEIGHT_GRADIENT_SETTINGS = [dict(temperature=4.0, alpha=1.0, beta=16.0, gamma=0.05, t2=4.0),
                            dict(temperature=1.0, alpha=0.5, beta=2.0, gamma=1.0, t2=1.0),
                            dict(temperature=2.0, alpha=1.0, beta=0.5, gamma=3.5, t2=0.5)]


@pytest.mark.parametrize("settings", WEIGHT_GRADIENT_SETTINGS,
                         ids=lambda x: f"gamma={x['gamma']}-T2={x['t2']}")
def test_dkl_loss_teacher_weight_gradient_is_the_authors(settings, generator):
    """teacher_weight_gradient=True: every gradient, the teacher's through softmax(t / T2) **
    gamma included, is that of the authors' formula; the value is unchanged."""
    student, teacher = logits_pair(generator)
    s, t2 = settings["temperature"], settings["t2"]
    call = functools.partial(compat.dkl_loss, temperature=s, alpha=settings["alpha"],
                             beta=settings["beta"], gamma=settings["gamma"], GI=False, T2=t2)
    loss = run_both(lambda x, y: call(x, y, teacher_weight_gradient=True),
                    lambda x, y: gkl_float64(x, y, None, **settings, gi=False),
                    [student, teacher])
    assert loss.item() == call(student, teacher).item()


def test_ikl_loss_teacher_weight_gradient_is_the_authors(generator):
    student, teacher = logits_pair(generator)
    settings = dict(temperature=2.0, alpha=1.0, beta=3.0, t2=4.0)
    run_both(lambda s, t: compat.ikl_loss(s, t, 2.0, 1.0, 3.0, None, False, 4.0,
                                          teacher_weight_gradient=True),
             lambda s, t: ikl_float64(s, t, None, **settings, gi=False), [student, teacher])


@pytest.mark.parametrize("mask_name", ["none", "zeros", "float"])
def test_consistency_teacher_weight_gradient_is_the_authors(mask_name, generator):
    logits, targets = logits_pair(generator)
    mask = masks(generator)[mask_name]
    settings = dict(temperature=0.5, alpha=1.0, beta=0.1, t2=2.0)
    run_both(lambda s, t: CONSISTENCY_MODULE(s, t, "ikl", mask=mask, temperature=0.5, alpha=1.0,
                                             beta=0.1, GI=False, T2=2.0,
                                             teacher_weight_gradient=True),
             lambda s, t: consistency_ikl_float64(
                 s, t, None, None if mask is None else mask.double(), **settings, gi=False),
             [logits, targets])


def test_teacher_weight_gradient_only_where_it_applies(generator):
    """With the prior (GI=True) or a teacher without a gradient the option changes nothing; it
    must be a bool."""
    student, teacher = logits_pair(generator)
    prior = per_row_prior(generator)
    s = student.clone().requires_grad_()
    for flag in (False, True):
        loss = compat.dkl_loss(s, teacher, 2.0, 1.0, 0.5, 0.6, prior, True, 2.0,
                               teacher_weight_gradient=flag)
        plain = compat.dkl_loss(s, teacher, 2.0, 1.0, 0.5, 0.6, prior, True, 2.0)
        assert torch.equal(torch.autograd.grad(loss, s)[0], torch.autograd.grad(plain, s)[0])
    with pytest.raises(TypeError, match="teacher_weight_gradient"):
        compat.dkl_loss(student, teacher, GI=False, teacher_weight_gradient=1)


# ---------------------------------------------------------------------- ikl_loss (KD, v1)
IKL_CALLS = {
    # IKL_KD.forward_train: positional
    "ikl_kd_positional_prior": (
        lambda s, t, p: compat.ikl_loss(s, t, 4.0, 1.0, 2.0, p, True, 4.0),
        dict(temperature=4.0, alpha=1.0, beta=2.0, gi=True, t2=4.0)),
    "ikl_kd_positional_teacher": (
        lambda s, t, p: compat.ikl_loss(s, t, 4.0, 1.0, 2.0, p, False, 4.0),
        dict(temperature=4.0, alpha=1.0, beta=2.0, gi=False, t2=4.0)),
    # imagenetlt_distill_dkl.py: keywords after the loss weights
    "imagenet_lt_keywords": (
        lambda s, t, p: compat.ikl_loss(s, t, 2.0, 1.0, 0.5, CLASS_PRIOR=p, GI=True, T2=100.0),
        dict(temperature=2.0, alpha=1.0, beta=0.5, gi=True, t2=100.0)),
    # the defaults: GI=False, T2=100
    "defaults": (lambda s, t, p: compat.ikl_loss(s, t, 1.0, 1.0, 3.0),
                 dict(temperature=1.0, alpha=1.0, beta=3.0, gi=False, t2=100.0)),
    "all_keywords": (
        lambda s, t, p: compat.ikl_loss(logits_student=s, logits_teacher=t, temperature=3.0,
                                        alpha=2.0, beta=1.0, CLASS_PRIOR=p, GI=True, T2=2.0),
        dict(temperature=3.0, alpha=2.0, beta=1.0, gi=True, t2=2.0)),
}


@pytest.mark.parametrize("case", sorted(IKL_CALLS))
def test_ikl_loss_call_forms(case, generator):
    call, settings = IKL_CALLS[case]
    student, teacher = logits_pair(generator)
    prior = per_row_prior(generator)
    run_both(lambda s: call(s, teacher, prior),
             lambda s: ikl_float64(s, teacher.double(), prior.double(), **settings), [student])


# ------------------------------------------------------------------ adv_dkl_loss (adversarial, v1)
ADV_CALLS = {
    # the training loss: dkl_loss(logits_nat, logits_adv, sample_weight, args.alpha, args.beta)
    "train_positional": (lambda n, a, w: compat.adv_dkl_loss(n, a, w, 4.0, 20.0),
                         dict(alpha=4.0, beta=20.0)),
    # perturb_input: dkl_loss(model(x_natural), model(x_adv), weight, 1.0, 0.0)
    "perturbation_positional": (lambda n, a, w: compat.adv_dkl_loss(n, a, w, 1.0, 0.0),
                                dict(alpha=1.0, beta=0.0)),
    "keywords": (lambda n, a, w: compat.adv_dkl_loss(logits_nat=n, logits_adv=a, weight=w,
                                                     alpha=2.0, beta=5.0),
                 dict(alpha=2.0, beta=5.0)),
}


@pytest.mark.parametrize("case", sorted(ADV_CALLS))
def test_adv_dkl_loss_call_forms(case, generator):
    """Both logits from the trained model; the weight ``outer(onehot(y) @ P)`` as their trainer
    builds it."""
    call, settings = ADV_CALLS[case]
    nat, adv = logits_pair(generator)
    weight = outer(per_row_prior(generator))
    run_both(lambda n, a: call(n, a, weight),
             lambda n, a: adv_float64(n, a, weight.double(), **settings), [nat, adv])


# ---------------------------------------------------------------- consistency_loss (semi-sup., v1)
def masks(generator):
    return {"none": None, "ones": torch.ones(ROWS), "zeros": torch.zeros(ROWS),
            "float": torch.rand(ROWS, generator=generator),
            "threshold": (torch.rand(ROWS, generator=generator) > 0.5).float()}


CONSISTENCY_MODULE = compat.ConsistencyLoss()
CONSISTENCY_CALLS = {
    # FixMatch's train_step through ConsistencyLoss (self.consistency_loss)
    "fixmatch_module": (
        lambda s, t, p, m: CONSISTENCY_MODULE(s, t, "ikl", mask=m, temperature=0.5, alpha=1.0,
                                              beta=0.1, GI=False, T2=2.0),
        dict(temperature=0.5, alpha=1.0, beta=0.1, gi=False, t2=2.0)),
    # MeanTeacher's train_step: no temperature
    "meanteacher_module": (
        lambda s, t, p, m: CONSISTENCY_MODULE(s, t, "ikl", alpha=2.0, beta=3.0, T2=1.0, GI=False,
                                              mask=m),
        dict(temperature=1.0, alpha=2.0, beta=3.0, gi=False, t2=1.0)),
    # ConsistencyLoss.forward's own call: every argument positional, here with a prior
    "positional_prior": (
        lambda s, t, p, m: compat.consistency_loss(s, t, "ikl", m, 2.0, 1.0, 0.5, p, True, 4.0),
        dict(temperature=2.0, alpha=1.0, beta=0.5, gi=True, t2=4.0)),
    # the function's defaults: GI=False, T2=100, temperature 1
    "function_defaults": (
        lambda s, t, p, m: compat.consistency_loss(s, t, "ikl", m, alpha=1.0, beta=2.0),
        dict(temperature=1.0, alpha=1.0, beta=2.0, gi=False, t2=100.0)),
    "module_defaults_prior": (
        lambda s, t, p, m: CONSISTENCY_MODULE(s, t, name="ikl", mask=m, alpha=1.0, beta=2.0,
                                              CLASS_PRIOR=p, GI=True),
        dict(temperature=1.0, alpha=1.0, beta=2.0, gi=True, t2=1.0)),
}


@pytest.mark.parametrize("mask_name", ["none", "ones", "zeros", "float", "threshold"])
@pytest.mark.parametrize("case", sorted(CONSISTENCY_CALLS))
@pytest.mark.parametrize("targets_grad", [False, True], ids=["weak_detached", "weak_with_grad"])
def test_consistency_ikl(case, mask_name, targets_grad, generator):
    """The weak-augmentation logits (targets) are detached in most of their algorithms, but carry
    a gradient in FixMatch's concatenated forward: then both receive the wMSE gradient."""
    call, settings = CONSISTENCY_CALLS[case]
    logits, targets = logits_pair(generator)
    prior = per_row_prior(generator)
    mask = masks(generator)[mask_name]

    def formula(s, t, **extra):
        return consistency_ikl_float64(s, t, prior.double(),
                                       None if mask is None else mask.double(), **settings,
                                       **extra)

    if targets_grad:
        detached = None if settings["gi"] else functools.partial(formula, weight_gradient=False)
        run_both(lambda s, t: call(s, t, prior, mask), formula, [logits, targets],
                 detached_formula=detached)
    else:
        run_both(lambda s: call(s, targets, prior, mask),
                 lambda s: formula(s, targets.double()), [logits])


def other_consistency_float64(name, logits, targets, mask):
    """consistency.py's other losses (plain torch there too)."""
    if name == "mse":
        rows = ((F.softmax(logits, dim=1) - targets) ** 2).mean(dim=1)
    elif name == "kl":
        rows = F.kl_div(F.log_softmax(logits / 0.5, dim=1), F.softmax(targets / 0.5, dim=1),
                        reduction="none").sum(dim=1) * (1.0 - mask)
        return rows.mean()
    elif targets.dim() == 2:
        rows = soft_ce_rows(logits, targets)
    else:
        rows = F.nll_loss(F.log_softmax(logits, dim=1), targets, reduction="none")
    return (rows if mask is None else rows * mask).mean()


@pytest.mark.parametrize("mask_name", ["none", "float", "zeros"])
@pytest.mark.parametrize("name", ["ce_hard", "ce_soft", "mse", "kl"])
def test_consistency_other_names(name, mask_name, generator):
    logits, raw = logits_pair(generator)
    mask = masks(generator)[mask_name]
    if name == "kl" and mask is None:
        with pytest.raises(ValueError, match="mask"):
            compat.consistency_loss(logits, raw, "kl")
        return
    targets = {"ce_hard": raw.argmax(1), "ce_soft": F.softmax(raw, 1), "mse": F.softmax(raw, 1),
               "kl": raw}[name]
    loss_name = name.split("_")[0]
    targets64 = targets.double() if targets.is_floating_point() else targets
    mask64 = None if mask is None else mask.double()
    run_both(lambda s: CONSISTENCY_MODULE(s, targets, loss_name, mask),
             lambda s: other_consistency_float64(loss_name, s, targets64, mask64), [logits])


@pytest.mark.parametrize("name", ["ikl", "ce_hard", "ce_soft", "mse", "kl"])
def test_consistency_bool_mask_is_the_float_mask(name, generator):
    """A bool mask (``probs > threshold``) is the same as its float; ``(B, 1)`` is refused
    (it used to broadcast the rows to ``(B, B)``: a wrong value), its ``(B,)`` reshape taken."""
    logits, raw = logits_pair(generator)
    targets = {"ce_hard": raw.argmax(1), "ce_soft": F.softmax(raw, 1),
               "mse": F.softmax(raw, 1)}.get(name, raw)
    keep = torch.rand(ROWS, generator=generator) > 0.5
    options = dict(alpha=1.0, beta=0.1) if name == "ikl" else {}
    loss_name = name.split("_")[0]
    want = compat.consistency_loss(logits, targets, loss_name, keep.float(), **options)
    got = compat.consistency_loss(logits, targets, loss_name, keep, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"mask must have shape \(6,\), got \(6, 1\)"):
        compat.consistency_loss(logits, targets, loss_name, keep.float()[:, None], **options)
    got = compat.consistency_loss(logits, targets, loss_name, keep.float()[:, None].reshape(-1),
                                  **options)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_consistency_ce_class_indices_as_cross_entropy(generator):
    """int32 class indices are taken; a ``-100`` row adds 0, as in ``F.cross_entropy``."""
    logits, raw = logits_pair(generator)
    labels = raw.argmax(1)
    labels[2] = -100
    mask = masks(generator)["float"]
    want = other_consistency_float64("ce", logits.double(), labels, mask.double())
    for targets in (labels, labels.int()):
        got = compat.consistency_loss(logits, targets, "ce", mask)
        assert_close_rel(got, want, RTOL, "loss")


def test_consistency_errors(generator):
    logits, targets = logits_pair(generator)
    with pytest.raises(ValueError, match="name must be one of"):
        compat.consistency_loss(logits, targets, "dkl", alpha=1.0, beta=1.0)
    with pytest.raises(ValueError, match="needs alpha and beta"):
        compat.consistency_loss(logits, targets, "ikl")
    with pytest.raises(ValueError, match="CLASS_PRIOR"):
        compat.consistency_loss(logits, targets, "ikl", alpha=1.0, beta=1.0, GI=True)
    with pytest.raises(ValueError, match="T2"):
        compat.consistency_loss(logits, targets, "ikl", alpha=1.0, beta=1.0, T2=0.0)
    with pytest.raises(ValueError, match="temperature"):
        compat.consistency_loss(logits, targets, "ikl", temperature=-1.0, alpha=1.0, beta=1.0)
