"""``jsd_loss``, the generalized JSD, on both backends: against the float64 formula of TRL and
Liger-Kernel (``reference.jsd``), its reductions, the hostile inputs under the accuracy rule of
``test_adversarial`` (at most 4 times the best plain float32 evaluation's error, floor 1e-5), its
launches and host syncs, and its argument checks."""

import math

import pytest
import torch

import gkl_kernels
from gkl_kernels.testing.dispatch import DispatchCounter
from gkl_kernels.testing.launches import value_checks_as_on_a_gpu
from gkl_kernels.testing.traffic import TritonTrafficCounter
from reference import jsd_loss_reference, jsd_rows_reference
from tests.adversarial_cases import assert_within_rule, offset_rows, row_max_shifted
from tests.conftest import BACKENDS, relative_error

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def loss_and_student_grad(fn, student, teacher, **options):
    s = student.detach().clone().requires_grad_()
    loss = fn(s, teacher.detach(), **options)
    return loss.detach(), torch.autograd.grad(loss, s)[0]


def oracle(student, teacher, **options):
    """The float64 reference's loss and student gradient."""
    return loss_and_student_grad(jsd_loss_reference, student.double(), teacher.double(),
                                 **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", (0.5, 1.0, 4.0))
@pytest.mark.parametrize("beta", BETAS)
def test_matches_the_float64_formula(beta, temperature, backend, generator):
    """Loss and student gradient, with ignored rows, on tiles of 16 (three per row)."""
    student = 3 * torch.randn(6, 37, generator=generator)
    teacher = 3 * torch.randn(6, 37, generator=generator)
    labels = torch.tensor([0, -100, 5, 36, -100, 2])
    options = dict(beta=beta, temperature=temperature, labels=labels)
    actual = loss_and_student_grad(gkl_kernels.jsd_loss, student, teacher, backend=backend,
                                   **options)
    assert_within_the_rule(actual, student, teacher, **options)
    assert actual[1][labels == -100].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_rows_span_several_tiles(backend, generator):
    """C = 5000: two 4096-column tiles per row on the Triton path."""
    student = 4 * torch.randn(3, 5000, generator=generator)
    teacher = 4 * torch.randn(3, 5000, generator=generator)
    actual = loss_and_student_grad(gkl_kernels.jsd_loss, student, teacher, beta=0.3,
                                   backend=backend)
    assert_within_the_rule(actual, student, teacher, beta=0.3, temperature=1.0, labels=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ("none", "sum"))
def test_reductions_and_leading_shape(reduction, backend, generator):
    student = torch.randn(2, 3, 11, generator=generator)
    teacher = torch.randn(2, 3, 11, generator=generator)
    labels = torch.tensor([[1, -100, 2], [0, 3, -100]])
    rows = jsd_rows_reference(student.double(), teacher.double(), beta=0.7)
    rows = torch.where(labels != -100, rows, 0.0)
    out = gkl_kernels.jsd_loss(student, teacher, beta=0.7, labels=labels, reduction=reduction,
                               backend=backend)
    expected = rows if reduction == "none" else rows.sum()
    assert out.shape == expected.shape
    assert relative_error(out, expected) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_teacher_is_a_constant_and_ends_are_the_two_kls(backend, generator):
    """No teacher gradient; ``beta = 0`` is ``F.kl_div``'s forward KL with ``"batchmean"``."""
    student = torch.randn(4, 9, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 9, generator=generator, requires_grad=True)
    loss = gkl_kernels.jsd_loss(student, teacher, beta=0.0, backend=backend)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    kl = torch.nn.functional.kl_div(student.log_softmax(1), teacher.log_softmax(1),
                                    reduction="batchmean", log_target=True)
    assert torch.allclose(loss, kl, rtol=1e-6, atol=0)
    reverse = gkl_kernels.jsd_loss(student, teacher, beta=1.0, backend=backend)
    assert torch.allclose(reverse, torch.nn.functional.kl_div(
        teacher.log_softmax(1), student.log_softmax(1), reduction="batchmean", log_target=True),
        rtol=1e-6, atol=0)


# ---- hostile inputs ----------------------------------------------------------------------------

def plain_float32(student, teacher, beta, temperature, labels):
    """The honest float32 evaluations of the formula, as given and on row-max-shifted logits:
    ``[(loss, grad), ...]``."""
    return [loss_and_student_grad(jsd_loss_reference, s.float(), t.float(), beta=beta,
                                  temperature=temperature, labels=labels)
            for s, t in ((student, teacher), (row_max_shifted(student), row_max_shifted(teacher)))]


def assert_within_the_rule(actual, student, teacher, *, beta, temperature, labels):
    """``(loss, grad)`` within ``max(4 x plain float32, 1e-5)`` of the float64 oracle, quantity
    by quantity (``adversarial_cases.assert_within_rule``)."""
    options = dict(beta=beta, temperature=temperature, labels=labels)
    assert_within_rule(actual, oracle(student, teacher, **options),
                       plain_float32(student, teacher, **options), torch.float32)


def hostile_case(name, generator, num_classes=33):
    """``(student, teacher, labels)`` of one hostile category."""
    s = 3 * torch.randn(6, num_classes, generator=generator)
    t = 3 * torch.randn(6, num_classes, generator=generator)
    labels = None
    if name.startswith("mask"):  # masked columns in both models (a masked vocabulary)
        value = {"mask-1e9": -1e9, "mask-min": torch.finfo(torch.float32).min,
                 "mask-inf": -math.inf}[name]
        s[:, 3:9] = value
        t[:, 3:9] = value
        s[2, 20:] = value
        t[2, 20:] = value
    elif name.startswith("offset"):
        _, scale, side = name.split("-")
        s, t = offset_rows(s, t, float(scale), side)
    elif name == "peaked":  # a teacher sure of one class
        t[:, 4] += 40.0
        s[:, 4] += 38.0
    elif name == "wide":
        s = 30 * torch.randn(6, num_classes, generator=generator)
        t = s + torch.randn(6, num_classes, generator=generator)
    elif name == "ignored-nan":
        labels = torch.tensor([0, -100, 2, -100, 4, 5])
        s[1] = math.nan
        t[3] = math.nan
    return s, t, labels


HOSTILE = ("mask-1e9", "mask-min", "mask-inf", "offset-1e4-student", "offset-1e5-teacher",
           "offset-1e6-both", "offset-1e6-opposite", "peaked", "wide", "ignored-nan")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_inputs_within_four_times_plain_float32(case, beta, backend, generator):
    student, teacher, labels = hostile_case(case, generator)
    options = dict(beta=beta, temperature=1.0, labels=labels)
    actual = loss_and_student_grad(gkl_kernels.jsd_loss, student, teacher, backend=backend,
                                   **options)
    assert_within_the_rule(actual, student, teacher, **options)
    assert torch.isfinite(actual[0]) and torch.isfinite(actual[1]).all()


def vocabulary_rows(generator, rows=4, vocabulary=32000):
    """Token rows of ``V = 32000`` (eight 4096-column tiles under Triton), logits ``4 N(0, 1)``,
    masked columns at -1e9 in both models (the first, both sides of the first tile boundary, the
    last 1000: a padded vocabulary), one row offset by 1e4 on the student, one ignored row."""
    student = 4 * torch.randn(rows, vocabulary, generator=generator)
    teacher = 4 * torch.randn(rows, vocabulary, generator=generator)
    for x in (student, teacher):
        x[:, [0, 1, 4095, 4096]] = -1e9
        x[:, -1000:] = -1e9
    student[1] += 1e4
    labels = torch.arange(rows)
    labels[2] = -100
    return student, teacher, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_vocabulary_rows_within_four_times_plain_float32(beta, backend, generator):
    student, teacher, labels = vocabulary_rows(generator)
    options = dict(beta=beta, temperature=1.0, labels=labels)
    actual = loss_and_student_grad(gkl_kernels.jsd_loss, student, teacher, backend=backend,
                                   **options)
    assert_within_the_rule(actual, student, teacher, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_fused_vocabulary_rows_within_four_times_plain_float32(beta, backend, generator):
    """``fused_linear_jsd`` at ``V = 32000`` from hidden states (a masked vocabulary through the
    bias; one row offset by 1e4 through a hidden unit every class weighs 1, another peaked by a
    hidden state 8 times larger): the loss and the gradients of the student's hidden states and
    weight, against the float64 formula and the plain float32 evaluation. Hidden states and
    weights are multiples of 1/32 small enough that every product is exact in float32, so that
    all three see the same logits (elsewhere the product's own rounding, 5e-4 at 1e4, decides)."""
    rows, hidden, vocabulary = 4, 16, 32000

    def exact_products(*shape):
        return (32 * torch.randn(*shape, generator=generator)).round().clamp(-128, 128) / 32

    h, w = exact_products(rows, hidden), exact_products(vocabulary, hidden)
    h[1, -1] = 1e4
    h[3] *= 8.0
    w[:, -1] = 1.0
    ht, wt = exact_products(rows, hidden), exact_products(vocabulary, hidden)
    bias = torch.zeros(vocabulary)
    bias[[0, 1, 4095, 4096]] = -1e9
    bias[-1000:] = -1e9
    labels = torch.tensor([0, 1, -100, 3])
    options = dict(beta=beta, temperature=1.0, labels=labels)
    teacher = torch.nn.functional.linear(ht.double(), wt.double(), bias.double())

    def evaluate(loss_of, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (h, w)]
        loss = loss_of(*leaves)
        return (loss.detach(), *torch.autograd.grad(loss, leaves))

    actual = evaluate(lambda hs, ws: gkl_kernels.fused_linear_jsd(
        hs, ws, ht, wt, student_bias=bias, teacher_bias=bias, chunk_size=3, backend=backend,
        **options), torch.float32)
    expected = evaluate(lambda hs, ws: jsd_loss_reference(
        torch.nn.functional.linear(hs, ws, bias.double()), teacher, **options), torch.float64)
    teacher32 = torch.nn.functional.linear(ht, wt, bias)
    plain = [evaluate(lambda hs, ws: jsd_loss_reference(
        shift(torch.nn.functional.linear(hs, ws, bias)), shift(teacher32), **options),
        torch.float32) for shift in (lambda x: x, row_max_shifted)]
    assert_within_rule(actual, expected, plain, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_precision_logits(dtype, backend, generator):
    """Half inputs, float32 arithmetic: within the float32 rule of the rounded inputs."""
    student = (3 * torch.randn(5, 40, generator=generator)).to(dtype)
    teacher = (3 * torch.randn(5, 40, generator=generator)).to(dtype)
    expected = oracle(student, teacher, beta=0.5)
    s = student.clone().requires_grad_()
    loss = gkl_kernels.jsd_loss(s, teacher, beta=0.5, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert relative_error(loss, expected[0]) <= 1e-5
    assert relative_error(grad, expected[1]) <= 2 * {torch.float16: 2**-10,
                                                     torch.bfloat16: 2**-7}[dtype]


def test_a_student_without_mass_where_the_teacher_has_some_is_infinite(generator):
    """Forward KL with ``Q_j = 0 < P_j`` and reverse KL with ``P_j = 0 < Q_j``: +inf, as the
    formula says, on both backends (the mixture stays finite)."""
    student = torch.randn(2, 8, generator=generator)
    student[0, 3] = -math.inf
    teacher = torch.randn(2, 8, generator=generator)
    for backend in BACKENDS:
        assert gkl_kernels.jsd_loss(student, teacher, beta=0.0, backend=backend) == math.inf
        assert torch.isfinite(gkl_kernels.jsd_loss(student, teacher, beta=0.5, backend=backend))
        rows = gkl_kernels.jsd_loss(teacher, student, beta=1.0, backend=backend,
                                    reduction="none")
        assert rows[0] == math.inf and torch.isfinite(rows[1])
        peaked = teacher.clone()
        peaked[0, 3] = 10.0  # where P = 0, the student's most likely class
        assert gkl_kernels.jsd_loss(peaked, student, beta=1.0, backend=backend) == math.inf


# ---- launches, checks --------------------------------------------------------------------------

@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_two_kernels_forward_one_backward_no_host_sync(beta, generator):
    student = torch.randn(8, 50, generator=generator, requires_grad=True)
    teacher = torch.randn(8, 50, generator=generator)
    labels = torch.tensor([0, 1, -100, 3, 4, 5, 6, -100])
    with value_checks_as_on_a_gpu():
        with TritonTrafficCounter() as kernels, DispatchCounter() as ops:
            loss = gkl_kernels.jsd_loss(student, teacher, beta=beta, labels=labels,
                                        backend="triton")
        with TritonTrafficCounter() as backward_kernels, DispatchCounter() as backward_ops:
            torch.autograd.grad(loss, [student])
    assert (kernels.launches, backward_kernels.launches) == (2, 1)
    assert ops.host_syncs == backward_ops.host_syncs == 0


def test_bad_arguments_are_named(generator):
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    for options, pattern in ((dict(beta=1.5), "beta"), (dict(beta=-0.1), "beta"),
                             (dict(beta="x"), "beta"), (dict(temperature=0.0), "temperature"),
                             (dict(reduction="avg"), "reduction"),
                             (dict(labels=torch.tensor([0, 1])), "labels")):
        with pytest.raises((TypeError, ValueError), match=pattern):
            gkl_kernels.jsd_loss(student, teacher, **options)
    with pytest.raises(ValueError, match="shape"):
        gkl_kernels.jsd_loss(student, torch.randn(3, 6))
    with pytest.raises(TypeError, match="beta"):
        gkl_kernels.fused_linear_gkl(torch.randn(2, 4), torch.randn(5, 4), torch.randn(2, 4),
                                     torch.randn(5, 4), beta=0.5)


# ---- from hidden states ------------------------------------------------------------------------

def heads(generator, rows=12, vocabulary=40, hidden=8, bias=True):
    student = [torch.randn(rows, hidden, generator=generator),
               0.5 * torch.randn(vocabulary, hidden, generator=generator),
               0.1 * torch.randn(vocabulary, generator=generator) if bias else None]
    teacher = [torch.randn(rows, hidden + 2, generator=generator),
               0.5 * torch.randn(vocabulary, hidden + 2, generator=generator),
               0.1 * torch.randn(vocabulary, generator=generator) if bias else None]
    return student, teacher


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", (0.0, 0.4, 1.0))
def test_fused_linear_jsd_is_jsd_loss_of_the_heads_logits(beta, backend, generator):
    """Chunks of 5 rows (three chunks, the last short), ignored rows: the loss and the student
    head's gradients of ``jsd_loss`` on the full logits."""
    (h, w, b), (ht, wt, bt) = heads(generator)
    labels = torch.randint(0, 40, (12,), generator=generator)
    labels[[2, 7]] = -100
    tensors = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = gkl_kernels.fused_linear_jsd(*tensors[:2], ht, wt, labels=labels,
                                        student_bias=tensors[2], teacher_bias=bt, beta=beta,
                                        temperature=2.0, chunk_size=5, backend=backend)
    grads = torch.autograd.grad(loss, tensors)
    dense = [x.double().requires_grad_() for x in (h, w, b)]
    logits = torch.nn.functional.linear(dense[0], dense[1], dense[2])
    expected = jsd_loss_reference(logits, torch.nn.functional.linear(ht, wt, bt).double(),
                                  beta=beta, temperature=2.0, labels=labels)
    expected_grads = torch.autograd.grad(expected, dense)
    assert relative_error(loss, expected) <= 2e-6
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) <= 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trainer_loss_switches_to_jsd_with_one_argument(backend, generator):
    """``FusedLinearDistillationLoss(divergence="jsd", beta=...)``: soft term the summed JSD over
    the normaliser, hard term the cross-entropy, as Liger's JSD loss defines them."""
    (h, w, b), (ht, wt, bt) = heads(generator)
    labels = torch.randint(0, 40, (12,), generator=generator)
    labels[3] = -100
    criterion = gkl_kernels.FusedLinearDistillationLoss(
        divergence="jsd", beta=0.3, temperature=2.0, weight_hard_loss=0.25,
        weight_soft_loss=0.75, return_components=True, backend=backend, chunk_size=5,
        logit_scale=1.5, final_logit_softcapping=4.0)
    hidden = h.clone().requires_grad_()
    loss, soft, hard = criterion(hidden, w, ht, wt, labels, b, bt)

    def transformed(z):
        return 4.0 * torch.tanh(1.5 * z / 4.0)

    logits = transformed(torch.nn.functional.linear(hidden.double(), w.double(), b.double()))
    kept = (labels != -100).sum()
    rows = jsd_rows_reference(logits, transformed(torch.nn.functional.linear(ht, wt, bt).double()),
                              beta=0.3, temperature=2.0)
    expected_soft = torch.where(labels != -100, rows, 0.0).sum() / kept
    expected_hard = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / kept
    expected = 0.75 * expected_soft + 0.25 * expected_hard
    assert relative_error(soft, expected_soft) <= 2e-6
    assert relative_error(hard, expected_hard) <= 2e-6
    assert relative_error(loss, expected) <= 2e-6
    grad = torch.autograd.grad(loss, hidden)[0]
    assert relative_error(grad, torch.autograd.grad(expected, hidden)[0]) <= 2e-5
    assert "divergence='jsd', beta=0.3" in repr(criterion)


def test_the_divergence_switch_refuses_what_does_not_apply():
    with pytest.raises(ValueError, match="beta"):
        gkl_kernels.FusedLinearDistillationLoss(beta=0.5)
    with pytest.raises(ValueError, match="gamma"):
        gkl_kernels.FusedLinearDistillationLoss(divergence="jsd", gamma=0.6)
    with pytest.raises(ValueError, match="divergence"):
        gkl_kernels.FusedLinearDistillationLoss(divergence="kl")
    with pytest.raises(ValueError, match="beta"):
        gkl_kernels.FusedLinearDistillationLoss(divergence="jsd", beta=1.5)


@pytest.mark.torch_only
def test_expm1_under_torch_compile_does_not_cancel():
    """Inductor's vectorised CPU ``expm1`` is ``exp(x) - 1`` (all digits lost near 0); the JSD's
    log-mixture takes it from ``tanh`` there: a few roundings at any ``x <= 0``."""
    from gkl_kernels.jsd.torch_impl import _expm1_

    x = -torch.logspace(-12, 2, 4000, dtype=torch.float64).float()
    got = torch.compile(lambda y: _expm1_(y.clone()), dynamic=False)(x)
    exact = torch.expm1(x.double())
    assert ((got.double() - exact).abs() / exact.abs()).max().item() < 1e-6
    assert torch.equal(_expm1_(torch.tensor([-math.inf, 0.0])), torch.tensor([-1.0, 0.0]))
