"""``gkl_loss`` and ``jsd_loss`` on a ``SparseTeacher`` (cached top-k classes), both backends:
``k = C`` equals the dense loss for every ``rest`` option; ``k < C`` equals the float64 formula
of each documented option (written out below, pairwise over the cached classes and the rest; for
the JSD the dense formula on the teacher a cache stands for); ignored rows; the fused paths; bad
input."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import gkl_kernels
from gkl_kernels import SparseTeacher, gkl_loss
from reference import jsd_loss_reference
from tests.conftest import BACKENDS, assert_close_rel

pytestmark = pytest.mark.entry_point  # the kernels through an entry point: CI runs it once

ROWS, CLASSES, TOP = 6, 13, 4
OPTIONS = dict(temperature=3.0, weight_temperature=1.5, gamma=0.7, mse_weight=2.0,
               ce_weight=0.5)
GENERATED_AT = 2.0  # T_gen of the cached log-probabilities
RESTS = ("renormalize", "drop", "rest")


def cache(teacher, top, temperature=GENERATED_AT, rest="renormalize"):
    """What an offline cache stores: the top-k classes of softmax(teacher / T_gen), their
    log-probabilities."""
    log_probs = F.log_softmax(teacher / temperature, dim=-1)
    values, indices = log_probs.topk(top, dim=-1)
    return SparseTeacher(indices, values, temperature=temperature, rest=rest)


def logits(generator, dtype=torch.float32, rows=ROWS):
    return [3 * torch.randn(rows, CLASSES, generator=generator, dtype=dtype) for _ in range(2)]


def sparse_formula(student, cached, factor=None, *, temperature, weight_temperature, gamma,
                   mse_weight, ce_weight):
    """The documented semantics in float64, pairwise: columns = cached classes (+ the rest);
    teacher logits ``T_gen x``; the student's rest column ``T logsumexp(s_other / T)``;
    ``factor``: given rank-one weights (0 on the rest) instead of ``softmax(t / T2) ** gamma``."""
    s = student.double()
    indices, x = cached.indices, cached.values.double()
    t = cached.temperature * x
    other = (s / temperature).scatter(-1, indices, float("-inf"))
    s_rows = torch.cat([s.gather(-1, indices), temperature * other.logsumexp(-1, keepdim=True)],
                       -1)
    mass = x.exp().sum(-1, keepdim=True)
    if cached.rest == "rest":
        t_rows = torch.cat([t, cached.temperature * torch.log(1 - mass)], -1)
    else:
        t_rows = torch.cat([t, torch.full_like(mass, float("-inf"))], -1)
    present = t_rows > float("-inf")
    p = F.softmax(t_rows / temperature, -1)
    ce = -(p * F.log_softmax(s_rows / temperature, -1)).sum(-1)
    if cached.rest == "drop":
        ce = ce * mass[:, 0]
    if factor is None:
        v = torch.where(present, F.softmax(t_rows / weight_temperature, -1) ** gamma, 0.0)
    else:
        v = torch.cat([factor.double().gather(-1, indices), torch.zeros_like(mass)], -1)
    d = torch.where(present, t_rows - s_rows, 0.0)
    pairs = v[:, :, None] * v[:, None, :]
    wmse = (pairs * (d[:, :, None] - d[:, None, :]) ** 2).sum((1, 2))
    return mse_weight * wmse.sum() / (4 * pairs.sum()) + ce_weight * ce.mean()


@pytest.mark.parametrize("rest", RESTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_classes_cached_is_the_dense_loss(rest, backend, generator):
    student, teacher = logits(generator, torch.float64)
    s_dense, s_sparse = student.clone().requires_grad_(), student.clone().requires_grad_()
    dense = gkl_loss(s_dense, teacher, backend=backend, **OPTIONS)
    sparse = gkl_loss(s_sparse, cache(teacher, CLASSES, rest=rest), backend=backend, **OPTIONS)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-13)
    dense.backward()
    sparse.backward()
    torch.testing.assert_close(s_sparse.grad, s_dense.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("source", ["teacher", "explicit", "prior"])
@pytest.mark.parametrize("rest", RESTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_is_the_formula_of_its_option(source, rest, backend, generator):
    student, teacher = logits(generator)
    cached = cache(teacher, TOP, rest=rest)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    kwargs, factor = {}, None
    if source == "explicit":
        factor = torch.rand(ROWS, CLASSES, generator=generator)
        kwargs = dict(weights=factor)
    elif source == "prior":
        prior = torch.rand(CLASSES, CLASSES, generator=generator)
        kwargs, factor = dict(labels=labels, class_prior=prior), prior[labels] ** OPTIONS["gamma"]
    s = student.clone().requires_grad_()
    s64 = student.double().requires_grad_()
    loss = gkl_loss(s, cached, backend=backend, **kwargs, **OPTIONS)
    want = sparse_formula(s64, cached, factor, **OPTIONS)
    assert_close_rel(loss.detach(), want.detach(), 2e-6, "loss")
    loss.backward()
    want.backward()
    assert_close_rel(s.grad, s64.grad, 2e-5, "student gradient")


@pytest.mark.parametrize("rest", RESTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_read_nothing(rest, backend, generator):
    """Ignored tokens may hold anything in the cache and in the logits: the loss is that of the
    other rows, their gradient exactly 0; per-row losses have 0 there."""
    student, teacher = logits(generator)
    cached = cache(teacher, TOP, rest=rest)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    labels[[1, 4]] = -100
    kept = labels != -100
    hostile = student.clone()
    hostile[1] = float("nan")
    hostile[4, 0] = float("inf")
    indices, values = cached.indices.clone(), cached.values.clone()
    indices[1] = -100  # padding in the cache
    values[4] = float("nan")
    garbage = SparseTeacher(indices, values, temperature=cached.temperature, rest=rest)
    s = hostile.requires_grad_()
    loss = gkl_loss(s, garbage, labels=labels, backend=backend, **OPTIONS)
    s_kept = student[kept].clone().requires_grad_()
    kept_cache = SparseTeacher(cached.indices[kept], cached.values[kept],
                               temperature=cached.temperature, rest=rest)
    want = gkl_loss(s_kept, kept_cache, backend=backend, **OPTIONS)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    loss.backward()
    want.backward()
    assert torch.equal(s.grad[~kept], torch.zeros_like(s.grad[~kept]))
    torch.testing.assert_close(s.grad[kept], s_kept.grad, rtol=1e-5, atol=1e-7)
    rows = gkl_loss(hostile.detach(), garbage, labels=labels, backend=backend,
                    reduction="none", **OPTIONS)
    assert torch.equal(rows[~kept], torch.zeros(2)) and torch.isfinite(rows).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_shapes_and_reductions(backend, generator):
    """``(B, T, V)`` student with ``(B, T, k)`` cache; "none" rows sum to "sum"."""
    student, teacher = logits(generator, rows=2 * ROWS)
    cached = cache(teacher, TOP, rest="drop")
    shaped = SparseTeacher(cached.indices.reshape(2, ROWS, TOP),
                           cached.values.reshape(2, ROWS, TOP), temperature=GENERATED_AT,
                           rest="drop")
    rows = gkl_loss(student.reshape(2, ROWS, CLASSES), shaped, backend=backend,
                    reduction="none", **OPTIONS)
    assert rows.shape == (2, ROWS)
    total = gkl_loss(student, cached, backend=backend, reduction="sum", **OPTIONS)
    torch.testing.assert_close(rows.sum(), total, rtol=1e-6, atol=1e-6)
    flat = gkl_loss(student, cached, backend=backend, **OPTIONS)
    folded = gkl_loss(student.reshape(2, ROWS, CLASSES), shaped, backend=backend, **OPTIONS)
    torch.testing.assert_close(folded, flat, rtol=1e-6, atol=1e-7)


def test_bad_sparse_teachers_are_named(generator):
    student, teacher = logits(generator)
    cached = cache(teacher, TOP)
    cases = [
        (SparseTeacher(cached.indices.float(), cached.values), TypeError, "teacher indices"),
        (SparseTeacher(cached.indices, cached.values[:, :2]), ValueError, "teacher indices"),
        (SparseTeacher(cached.indices[:3], cached.values[:3]), ValueError, "leading shape"),
        (SparseTeacher(cached.indices, cached.values.long()), TypeError, "floating-point"),
        (SparseTeacher(cached.indices, cached.values, temperature=0.0), ValueError,
         "teacher temperature"),
        (SparseTeacher(cached.indices, cached.values, rest="spread"), ValueError, "rest"),
        (SparseTeacher(cached.indices.clamp_max(0), cached.values), ValueError, "distinct"),
        (SparseTeacher(cached.indices + CLASSES, cached.values), ValueError, r"\[0, 13\)"),
        (SparseTeacher(cached.indices, cached.values + 5.0, rest="drop"), ValueError,
         "log-probabilities"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            gkl_loss(student, bad)
    with pytest.raises(ValueError, match="rank-one weights"):
        gkl_loss(student, cached, weights=torch.rand(CLASSES, CLASSES), weights_kind="shared")
    with pytest.raises(ValueError, match="class_prior needs labels"):
        gkl_loss(student, cached, class_prior=torch.rand(CLASSES, CLASSES))
    # logits (not log-probabilities) are fine where the mass is not used
    loss = gkl_loss(student, SparseTeacher(cached.indices, cached.values + 5.0))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ the fused linear path
HIDDEN, TOKENS = 8, 10


def heads(generator, dtype=torch.float32):
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator, dtype=dtype)
    weight = torch.randn(CLASSES, HIDDEN, generator=generator, dtype=dtype) / 2
    bias = torch.randn(CLASSES, generator=generator, dtype=dtype)
    return hidden, weight, bias


@pytest.mark.parametrize("source", ["teacher", "explicit", "prior"])
@pytest.mark.parametrize("rest", RESTS)
@pytest.mark.parametrize("chunk_size, backend", [(1, "torch"), (3, "torch"), (None, "torch"),
                                                 (3, "triton")])
def test_fused_sparse_is_the_unfused_loss(source, rest, chunk_size, backend, generator):
    """``fused_linear_gkl_sparse`` (its gradient formed by hand, on either backend's row ops)
    against ``gkl_loss`` on the materialised logits with the same cache (autograd, plain
    PyTorch): the loss and the gradients of hidden states, weight and bias; ignored rows."""
    hidden, weight, bias = heads(generator)
    teacher = 3 * torch.randn(TOKENS, CLASSES, generator=generator)
    cached = cache(teacher, TOP, rest=rest)
    labels = torch.randint(0, CLASSES, (TOKENS,), generator=generator)
    labels[[2, 7]] = -100
    kwargs = {}
    if source == "explicit":
        kwargs = dict(weights=torch.rand(TOKENS, CLASSES, generator=generator))
    elif source == "prior":
        kwargs = dict(class_prior=torch.rand(CLASSES, CLASSES, generator=generator))
    assert_fused_is_unfused(
        lambda h, w, b: gkl_kernels.fused_linear_gkl_sparse(
            h, w, cached, labels=labels, student_bias=b, chunk_size=chunk_size, backend=backend,
            **kwargs, **OPTIONS),
        lambda h, w, b: gkl_loss(F.linear(h, w, b), cached, labels=labels, backend="torch",
                                 **kwargs, **OPTIONS),
        (hidden, weight, bias), atol=1e-6)


def assert_fused_is_unfused(fused_of, unfused_of, head, atol):
    """The loss of ``fused_of(h, W, b)`` and its gradients with respect to the head ``(h, W, b)``
    equal ``unfused_of``'s (each on fresh copies)."""
    results = []
    for loss_of in (fused_of, unfused_of):
        leaves = [x.clone().requires_grad_() for x in head]
        loss = loss_of(*leaves)
        loss.backward()
        results.append((loss.detach(), leaves))
    (fused, leaves), (unfused, again) = results
    torch.testing.assert_close(fused, unfused, rtol=2e-6, atol=atol)
    for name, ours, want in zip(("hidden", "weight", "bias"), leaves, again):
        torch.testing.assert_close(ours.grad, want.grad, rtol=1e-5, atol=atol, msg=name)


def test_fused_sparse_without_gradients_and_errors(generator):
    hidden, weight, bias = heads(generator)
    cached = cache(3 * torch.randn(TOKENS, CLASSES, generator=generator), TOP)
    with torch.no_grad():
        loss = gkl_kernels.fused_linear_gkl_sparse(hidden, weight, cached, student_bias=bias)
    want = gkl_loss(F.linear(hidden, weight, bias), cached)
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=1e-6)
    with pytest.raises(ValueError, match="leading shape"):
        gkl_kernels.fused_linear_gkl_sparse(hidden[:4], weight, cached)
    with pytest.raises(ValueError, match="reduction"):
        gkl_kernels.fused_linear_gkl_sparse(hidden, weight, cached, reduction="none")


# ------------------------------------------------------------------ the generalized JSD
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def cached_dense(cached, classes, outside=None):
    """The dense float64 teacher logits at the cache's temperature that a cache stands for:
    ``T_gen x`` at the cached classes, elsewhere ``-inf`` or ``T_gen log(outside)`` (``outside``
    ``(B, C)``: the teacher's probabilities there)."""
    dense = torch.full((cached.indices.shape[0], classes), float("-inf"), dtype=torch.float64)
    if outside is not None:
        dense = cached.temperature * outside.double().log()
    return dense.scatter(-1, cached.indices, cached.temperature * cached.values.double())


def jsd_and_grad(student, teacher, **options):
    s = student.clone().requires_grad_()
    loss = gkl_kernels.jsd_loss(s, teacher, **options)
    return loss.detach(), torch.autograd.grad(loss, s)[0]


def jsd_oracle(student, dense_teacher, **options):
    s = student.double().requires_grad_()
    loss = jsd_loss_reference(s, dense_teacher, **options)
    return loss.detach(), torch.autograd.grad(loss, s)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS[:-1])
def test_jsd_against_the_renormalized_cache_is_the_full_vocabulary_jsd(beta, backend, generator):
    """``rest="renormalize"``: the JSD (value and gradient) of the whole vocabulary against the
    teacher's renormalised cache, zero outside it; ignored rows hold garbage."""
    student, teacher = logits(generator)
    cached = cache(teacher, TOP)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    labels[2] = -100
    indices = cached.indices.clone()
    indices[2] = -7
    options = dict(beta=beta, temperature=1.5, labels=labels)
    got = jsd_and_grad(student, replace(cached, indices=indices), backend=backend, **options)
    want = jsd_oracle(student, cached_dense(cached, CLASSES), **options)
    assert_close_rel(got[0], want[0], 2e-6, "loss")
    assert_close_rel(got[1], want[1], 1e-5, "gradient")
    assert torch.equal(got[1][2], torch.zeros(CLASSES))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_kl_against_a_renormalized_cache_is_infinite(backend, generator):
    """``beta = 1``: ``KL(Q || P)`` with ``P = 0`` where the student has mass."""
    student, teacher = logits(generator)
    loss = gkl_kernels.jsd_loss(student, cache(teacher, TOP), beta=1.0, backend=backend)
    assert loss == float("inf")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", BETAS)
def test_jsd_with_the_rest_as_one_class(beta, backend, generator):
    """``rest="rest"``: the JSD of the distributions grouped into the cached classes and the
    rest, which is the full one where the teacher's rest is spread as the student's: checked
    against the dense formula on such a teacher (``T = T_gen``)."""
    student, teacher = logits(generator)
    cached = cache(teacher, TOP, rest="rest")
    q = torch.softmax(student.double() / GENERATED_AT, dim=-1)
    inside = torch.zeros_like(q).scatter(-1, cached.indices, 1.0)
    mass = cached.values.double().exp().sum(-1, keepdim=True)
    spread = (1 - mass) * q * (1 - inside) / (q * (1 - inside)).sum(-1, keepdim=True)
    dense = cached_dense(cached, CLASSES, outside=spread)
    options = dict(beta=beta, temperature=GENERATED_AT)
    got = jsd_and_grad(student, cached, backend=backend, **options)
    want = jsd_oracle(student, dense, **options)
    assert_close_rel(got[0], want[0], 2e-6, "loss")
    assert_close_rel(got[1], want[1], 1e-5, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rest", ("renormalize", "rest"))
def test_fused_sparse_jsd_is_the_unfused_loss(rest, backend, generator):
    """``fused_linear_jsd_sparse`` against ``jsd_loss`` on the materialised logits with the same
    cache, chunks of 3 rows: the loss and the gradients of hidden states, weight and bias."""
    hidden, weight, bias = heads(generator)
    cached = cache(3 * torch.randn(TOKENS, CLASSES, generator=generator), TOP, rest=rest)
    labels = torch.randint(0, CLASSES, (TOKENS,), generator=generator)
    labels[[2, 7]] = -100
    options = dict(beta=0.3, temperature=GENERATED_AT, labels=labels, backend=backend)
    assert_fused_is_unfused(
        lambda h, w, b: gkl_kernels.fused_linear_jsd_sparse(h, w, cached, student_bias=b,
                                                            chunk_size=3, **options),
        lambda h, w, b: gkl_kernels.jsd_loss(F.linear(h, w, b), cached, **options),
        (hidden, weight, bias), atol=1e-7)


def test_jsd_refuses_the_dropped_rest(generator):
    hidden, weight, bias = heads(generator)
    cached = cache(3 * torch.randn(TOKENS, CLASSES, generator=generator), TOP, rest="drop")
    with pytest.raises(ValueError, match="rest='drop'.*no generalized JSD"):
        gkl_kernels.jsd_loss(F.linear(hidden, weight, bias), cached)
    with pytest.raises(ValueError, match="rest='drop'.*no generalized JSD"):
        gkl_kernels.fused_linear_jsd_sparse(hidden, weight, cached)
    with pytest.raises(ValueError, match="leading shape"):
        gkl_kernels.jsd_loss(torch.randn(3, CLASSES), replace(cached, rest="rest"))
