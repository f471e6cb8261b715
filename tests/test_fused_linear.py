"""Fused linear GKL against the unfused computation (``gkl_loss`` on materialised logits) and the
float64 reference: loss and gradients of hidden states, weights and biases, chunk sizes that do
and do not divide N, every weight source, ignored rows, bfloat16, and its peak memory."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import gkl_kernels
from gkl_kernels import (FusedLinearDistillationLoss, FusedLinearGKLLoss, SparseTeacher,
                         fused_linear_gkl, fused_linear_gkl_sparse, gkl_loss, validation)
from gkl_kernels.testing.dispatch import DispatchCounter
from gkl_kernels.testing.launches import reads_as_on_a_gpu
from gkl_kernels.testing.memory import measure_peak_memory
from gkl_kernels.testing.traffic import TritonTrafficCounter
from reference import gkl_loss_reference
from tests.conftest import PAPER_SETTINGS, assert_close_rel

pytestmark = pytest.mark.entry_point  # the kernels through an entry point: CI runs it once

ROWS, VOCABULARY, HIDDEN, TEACHER_HIDDEN = 23, 61, 12, 17
SOURCES = ("teacher", "teacher_gamma", "prior", "explicit")
torch_only = pytest.mark.torch_only


def linear_inputs(generator, *, rows=ROWS, vocabulary=VOCABULARY, dtype=torch.float32,
                  bias=True, ignored=0.3):
    """Student and teacher ``(hidden, weight, bias)`` (fresh leaves, logits of order 3) and
    labels with a share ``ignored`` of -100."""
    def linear(hidden_size):
        hidden = torch.randn(rows, hidden_size, generator=generator)
        weight = torch.randn(vocabulary, hidden_size, generator=generator) * (
            3.0 / hidden_size**0.5)
        b = torch.randn(vocabulary, generator=generator) if bias else None
        return [None if x is None else x.to(dtype).requires_grad_() for x in (hidden, weight, b)]
    labels = torch.randint(0, vocabulary, (rows,), generator=generator)
    labels[torch.rand(rows, generator=generator) < ignored] = -100
    return linear(HIDDEN), linear(TEACHER_HIDDEN), labels


def source_options(source, generator, rows=ROWS, vocabulary=VOCABULARY):
    options = dict(PAPER_SETTINGS["imagenet_kd"])
    if source == "teacher":
        options["gamma"] = 1.0
    elif source == "prior":
        prior = torch.rand(vocabulary, vocabulary, generator=generator) + 0.01
        options["class_prior"] = prior / prior.sum(1, keepdim=True)
    elif source == "explicit":
        options["weights"] = torch.rand(rows, vocabulary, generator=generator)
    return options


def present(tensors):
    return [x for x in tensors if x is not None]


def fused_result(student, teacher, labels, **options):
    loss = fused_linear_gkl(student[0], student[1], teacher[0], teacher[1], labels=labels,
                            student_bias=student[2], teacher_bias=teacher[2], **options)
    return loss.detach(), torch.autograd.grad(loss, present(student))


def unfused_result(student, teacher, labels, loss_fn=gkl_loss, teacher_grad=False, **options):
    s = F.linear(*student)
    with torch.set_grad_enabled(teacher_grad):
        t = F.linear(*teacher)
    loss = loss_fn(s, t, labels=labels, **options)
    inputs = present(student) + (present(teacher) if teacher_grad else [])
    return loss.detach(), torch.autograd.grad(loss, inputs)


def assert_results_close(actual, expected, rtol, what=""):
    assert_close_rel(actual[0], expected[0], rtol, f"{what}loss")
    assert len(actual[1]) == len(expected[1])
    for index, (a, e) in enumerate(zip(actual[1], expected[1])):
        assert a.shape == e.shape and a.dtype in (e.dtype, torch.float32)
        assert_close_rel(a, e, rtol, f"{what}gradient {index}")


@torch_only
@pytest.mark.parametrize("chunk_size", [1, 5, 8, ROWS, 64, None])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["gkl", "dkl"])
def test_fused_equals_unfused(symmetric, source, chunk_size, generator):
    student, teacher, labels = linear_inputs(generator)
    options = dict(source_options(source, generator), symmetric=symmetric, backend="torch")
    actual = fused_result(student, teacher, labels, chunk_size=chunk_size, **options)
    expected = unfused_result(student, teacher, labels, **options)
    assert_results_close(actual, expected, 2e-6)


@torch_only
@pytest.mark.parametrize("source", ["teacher", "teacher_gamma", "explicit"])
def test_fused_without_labels_keeps_every_row(source, generator):
    student, teacher, _ = linear_inputs(generator)
    options = dict(source_options(source, generator), backend="torch")
    actual = fused_result(student, teacher, None, chunk_size=7, **options)
    expected = unfused_result(student, teacher, None, **options)
    assert_results_close(actual, expected, 2e-6)


@pytest.mark.parametrize("chunk_size", [4, 7])
@pytest.mark.parametrize("source", SOURCES)
def test_fused_triton_backend_equals_unfused(source, chunk_size, generator):
    student, teacher, labels = linear_inputs(generator)
    options = source_options(source, generator)
    actual = fused_result(student, teacher, labels, chunk_size=chunk_size, backend="triton",
                          **options)
    expected = unfused_result(student, teacher, labels, backend="triton", **options)
    assert_results_close(actual, expected, 2e-6)


@torch_only
@pytest.mark.parametrize("normalize", ["weights", "batch"])
@pytest.mark.parametrize("source", SOURCES)
def test_fused_matches_float64_reference_on_kept_rows(source, normalize, generator):
    student, teacher, labels = linear_inputs(generator, bias=False)
    options = dict(source_options(source, generator), normalize=normalize)
    actual = fused_result(student, teacher, labels, chunk_size=6, **options)
    kept = labels != -100
    s64, t64 = (F.linear(x[0].detach().double(), x[1].detach().double()) for x in (student,
                                                                                      teacher))
    hidden, weight = (x.detach().double().requires_grad_() for x in student[:2])
    reference_options = {k: v.double() if torch.is_tensor(v) else v for k, v in options.items()}
    if "weights" in reference_options:
        reference_options["weights"] = reference_options["weights"][kept]
    loss = gkl_loss_reference(F.linear(hidden, weight)[kept], t64[kept], labels=labels[kept],
                              **reference_options)
    expected = (loss.detach(), torch.autograd.grad(loss, (hidden, weight)))
    assert s64.shape == (ROWS, VOCABULARY)
    assert_results_close(actual, expected, 1e-5)


@torch_only
@pytest.mark.parametrize("symmetric", [True, False], ids=["gkl", "dkl"])
def test_teacher_gradients_on_request(symmetric, generator):
    student, teacher, labels = linear_inputs(generator)
    options = dict(PAPER_SETTINGS["cifar_adv"], symmetric=symmetric, backend="torch")
    loss = fused_linear_gkl(student[0], student[1], teacher[0], teacher[1], labels=labels,
                            student_bias=student[2], teacher_bias=teacher[2], chunk_size=5,
                            teacher_grad=True, **options)
    actual = (loss.detach(), torch.autograd.grad(loss, present(student) + present(teacher)))
    expected = unfused_result(student, teacher, labels, teacher_grad=True, **options)
    assert_results_close(actual, expected, 2e-6)


@torch_only
def test_teacher_is_frozen_by_default(generator):
    student, teacher, labels = linear_inputs(generator)
    loss = fused_linear_gkl(student[0], student[1], teacher[0], teacher[1], labels=labels,
                            student_bias=student[2], teacher_bias=teacher[2], gamma=0.5)
    loss.backward()
    assert all(x.grad is None for x in teacher)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in student)


@torch_only
def test_all_ignored_rows_give_zero_loss_and_gradients(generator):
    student, teacher, labels = linear_inputs(generator)
    loss, grads = fused_result(student, teacher, torch.full_like(labels, -100), chunk_size=4,
                               gamma=0.6)
    assert loss.item() == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@torch_only
def test_without_gradients_the_loss_is_the_same(generator):
    student, teacher, labels = linear_inputs(generator)
    with_grads = fused_linear_gkl(student[0], student[1], teacher[0], teacher[1],
                                  labels=labels, chunk_size=5, gamma=0.6)
    with torch.no_grad():
        without = fused_linear_gkl(student[0], student[1], teacher[0], teacher[1],
                                   labels=labels, chunk_size=5, gamma=0.6)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grads.detach(), rtol=0, atol=0)


@torch_only
@pytest.mark.parametrize("source", SOURCES)
def test_no_host_synchronisation_without_value_checks(source, generator):
    student, teacher, labels = linear_inputs(generator)
    options = source_options(source, generator)

    def step(check_values):  # the masked rows' selection reads values on CPU only
        with reads_as_on_a_gpu(), DispatchCounter() as counter:
            fused_result(student, teacher, labels, chunk_size=5, check_values=check_values,
                         **options)
        return counter

    assert step(check_values=False).host_syncs == 0
    assert step(check_values=True).host_syncs > 0  # the label check reads values: it is seen


@torch_only
def test_module_equals_function(generator):
    student, teacher, labels = linear_inputs(generator)
    module = FusedLinearGKLLoss(chunk_size=5, gamma=0.6, temperature=2.0)
    loss = module(student[0], student[1], teacher[0], teacher[1], labels, student[2], teacher[2])
    expected = fused_linear_gkl(student[0], student[1], teacher[0], teacher[1], labels=labels,
                                student_bias=student[2], teacher_bias=teacher[2], chunk_size=5,
                                gamma=0.6, temperature=2.0)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert "chunk_size=5" in repr(module) and "gamma=0.6" in repr(module)


@torch_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_tolerance(dtype, generator):
    """Products in the input dtype (logits rounded to it), loss in float32: the loss and the
    gradients are no further from float64 than the unfused computation in that dtype is, plus
    a margin of 2**-8 (bfloat16) / 2**-10 (float16) of their scale."""
    student, teacher, labels = linear_inputs(generator, rows=40, vocabulary=300, dtype=dtype)
    options = dict(PAPER_SETTINGS["imagenet_kd"], backend="torch")
    actual = fused_result(student, teacher, labels, chunk_size=16, **options)
    unfused = unfused_result(student, teacher, labels, **options)
    as64 = [[x.detach().double().requires_grad_() for x in part] for part in (student, teacher)]
    exact = unfused_result(*as64, labels, loss_fn=gkl_loss_reference, pairwise=False,
                           **dict(PAPER_SETTINGS["imagenet_kd"]))
    margin = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-10
    assert all(g.dtype == dtype for g in actual[1])
    for name, a, u, e in zip(("loss", "hidden", "weight", "bias"), [actual[0], *actual[1]],
                             [unfused[0], *unfused[1]], [exact[0], *exact[1]]):
        error = (a.double() - e).abs().max() / e.abs().max()
        own = (u.double() - e).abs().max() / e.abs().max()
        assert error <= own + margin, f"{name}: {error:.2e} vs unfused {own:.2e}"


@torch_only
def test_peak_memory_below_unfused_at_vocabulary_scale():
    """N = 4096 tokens, V = 32000, H = 512, float32: the fused loss's forward and backward peak
    (allocator events, ``gkl_kernels.testing.memory``) is at most half of the unfused path's."""
    generator = torch.Generator().manual_seed(6)
    student, teacher, labels = linear_inputs(generator, rows=4096, vocabulary=32000,
                                             bias=False)

    def fused():
        fused_linear_gkl(student[0], student[1], teacher[0], teacher[1], labels=labels,
                         backend="torch").backward()

    def unfused():
        with torch.no_grad():
            t = F.linear(teacher[0], teacher[1])
        gkl_loss(F.linear(student[0], student[1]), t, labels=labels, backend="torch").backward()

    fused_peak, _ = measure_peak_memory(fused)
    fused_grads = [x.grad.clone() for x in student[:2]]
    for x in student[:2]:
        x.grad = None
    unfused_peak, _ = measure_peak_memory(unfused)
    logits_bytes = 4096 * 32000 * 4
    assert unfused_peak > 2 * logits_bytes  # the unfused path holds both (N, V) logits
    assert 2 * fused_peak < unfused_peak, (fused_peak, unfused_peak)
    for fused_grad, x in zip(fused_grads, student[:2]):
        assert_close_rel(fused_grad, x.grad, 1e-5, "gradient")


@torch_only
@pytest.mark.parametrize("loss_name", ["fused_linear_gkl", "fused_linear_gkl_sparse",
                                       "FusedLinearDistillationLoss"])
def test_inputs_are_checked_once_not_per_chunk(loss_name, generator, monkeypatch):
    """Each fused loss checks its inputs once, at its entry: over 8 chunks the labels and the
    weights are checked once each, and no chunk checks logits or weights again."""
    calls = Counter()
    for name in ("check_labels", "check_logits", "check_weights", "check_nonnegative_finite"):
        def counted(*args, _name=name, _check=getattr(validation, name), **kwargs):
            calls[_name] += 1
            return _check(*args, **kwargs)
        monkeypatch.setattr(validation, name, counted)
    student, teacher, labels = linear_inputs(generator)
    weights = torch.rand(ROWS, VOCABULARY, generator=generator)
    options = dict(labels=labels, student_bias=student[2], weights=weights, chunk_size=3,
                   backend="torch", gamma=0.5)
    if loss_name == "fused_linear_gkl":
        loss = fused_linear_gkl(student[0], student[1], teacher[0], teacher[1],
                                teacher_bias=teacher[2], **options)
    elif loss_name == "fused_linear_gkl_sparse":
        values, indices = F.linear(*teacher).detach().log_softmax(-1).topk(5, dim=-1)
        loss = fused_linear_gkl_sparse(student[0], student[1],
                                       SparseTeacher(indices, values, rest="drop"), **options)
    else:
        weights = None
        loss = FusedLinearDistillationLoss(chunk_size=3, backend="torch", gamma=0.5)(
            student[0], student[1], teacher[0], teacher[1], labels, student[2], teacher[2])
    loss.backward()
    assert calls == Counter(check_labels=1, check_nonnegative_finite=int(weights is not None))


@pytest.mark.parametrize("change, error, match", [
    (dict(student_weight=torch.randn(VOCABULARY, HIDDEN + 1)), ValueError, "student_weight"),
    (dict(student_weight=torch.randn(VOCABULARY, HIDDEN, dtype=torch.float64)), TypeError,
     "student_weight"),
    (dict(student_hidden=torch.randn(ROWS, HIDDEN).bfloat16()), TypeError, "student_weight"),
    (dict(teacher_weight=torch.randn(VOCABULARY + 1, TEACHER_HIDDEN)), ValueError, "teacher"),
    (dict(teacher_hidden=torch.randn(ROWS + 1, TEACHER_HIDDEN)), ValueError, "teacher"),
    (dict(student_bias=torch.randn(VOCABULARY + 1)), ValueError, "student_bias"),
    (dict(student_hidden=torch.randn(ROWS)), ValueError, "student_hidden"),
    (dict(labels=torch.full((ROWS,), VOCABULARY)), ValueError, "labels"),
    (dict(labels=torch.zeros(ROWS + 1, dtype=torch.long)), ValueError, "labels"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
    (dict(teacher_grad="yes"), TypeError, "teacher_grad"),
    (dict(weights=-torch.rand(ROWS, VOCABULARY)), ValueError, "weights"),
    (dict(weights=torch.rand(VOCABULARY, VOCABULARY)), ValueError, "weights"),
    (dict(class_prior=torch.rand(VOCABULARY, VOCABULARY + 1)), ValueError, "class_prior"),
    (dict(class_prior=torch.rand(VOCABULARY, VOCABULARY) - 0.5), ValueError, "class_prior"),
    (dict(class_prior=torch.full((VOCABULARY, VOCABULARY), float("nan"))), ValueError,
     "class_prior"),
    (dict(sync_normalizer=True), ValueError, "sync_normalizer"),
    (dict(gamma=-1.0), ValueError, "gamma"),
    (dict(colour="red"), TypeError, "unknown option"),
])
def test_bad_arguments_are_refused(change, error, match, generator):
    student, teacher, labels = linear_inputs(generator, bias=False)
    arguments = dict(student_hidden=student[0], student_weight=student[1],
                     teacher_hidden=teacher[0], teacher_weight=teacher[1], labels=labels)
    arguments.update(change)
    with pytest.raises(error, match=match):
        fused_linear_gkl(**arguments)


class LogitRows(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the rows of every product that forms ``(rows, vocabulary)`` logits."""

    def __init__(self, vocabulary):
        super().__init__()
        self.vocabulary, self.rows = vocabulary, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and \
                out.dim() == 2 and out.shape[1] == self.vocabulary:
            self.rows += out.shape[0]
        return out


def masked_loss(loss_name, student_hidden, student, teacher, labels, top, backend="torch",
                check_values=True):
    """The loss ``loss_name`` of the student's hidden states (its weight from ``student``)
    against ``teacher`` (or its ``top`` (values, indices) as a ``SparseTeacher``: the rows of
    ``student_hidden``, all or the kept ones), chunks of 4 rows."""
    options = dict(chunk_size=4, backend=backend, check_values=check_values)
    if loss_name == "gkl":
        return fused_linear_gkl(student_hidden, student[1], teacher[0], teacher[1],
                                labels=labels, **options)
    if loss_name == "jsd":
        return gkl_kernels.fused_linear_jsd(student_hidden, student[1], teacher[0], teacher[1],
                                            labels=labels, **options)
    if loss_name == "sparse":
        rows = slice(None) if labels.shape[0] == ROWS else top[2]
        return fused_linear_gkl_sparse(student_hidden, student[1],
                                       SparseTeacher(top[1][rows], top[0][rows]),
                                       labels=labels, **options)
    return FusedLinearDistillationLoss(**options)(student_hidden, student[1], teacher[0],
                                                  teacher[1], labels)


def masked_inputs(generator):
    """Half the tokens labelled -100: the heads, labels, the kept rows and the teacher's top-5
    ``(values, indices, kept)``."""
    student, teacher, labels = linear_inputs(generator, ignored=0.5)
    kept = labels != -100
    assert 0 < kept.sum() < ROWS
    values, indices = F.linear(teacher[0], teacher[1]).detach().log_softmax(-1).topk(5, dim=-1)
    return student, teacher, labels, kept, (values, indices, kept)


@torch_only
@pytest.mark.parametrize("loss_name", ["gkl", "jsd", "sparse", "trainer"])
def test_masked_rows_are_never_projected(loss_name, generator):
    """Half the tokens labelled -100: the products form the kept tokens' logits only (student
    and teacher, forward only: the gradient reuses them), and the loss and the hidden states'
    gradient (zero on the masked rows) are those of the kept rows alone."""
    student, teacher, labels, kept, top = masked_inputs(generator)
    hidden = student[0].detach().clone().requires_grad_()
    counter = LogitRows(VOCABULARY)
    with counter:
        loss = masked_loss(loss_name, hidden, student, teacher, labels, top)
        loss.backward()
    models = 1 if loss_name == "sparse" else 2
    assert counter.rows == models * int(kept.sum())
    kept_hidden = student[0].detach()[kept].clone().requires_grad_()
    teacher[0] = teacher[0][kept]
    want = masked_loss(loss_name, kept_hidden, student, teacher, labels[kept], top)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-7)
    want.backward()
    torch.testing.assert_close(hidden.grad[kept], kept_hidden.grad, rtol=1e-6, atol=1e-8)
    assert torch.equal(hidden.grad[~kept], torch.zeros_like(hidden.grad[~kept]))


@pytest.mark.parametrize("loss_name", ["gkl", "jsd", "sparse", "trainer"])
def test_masked_rows_are_skipped_on_the_device(loss_name, generator):
    """Read as on a GPU, with the Triton kernels: the rows read go first and every product counts
    them on the device (``counted_matmul``), with no host synchronisation; the loss and the
    gradients of the hidden states and the weight are those of the kept tokens alone, the masked
    rows' gradient is 0, and at half the tokens masked the products load about half the bytes
    of the unmasked batch's."""
    student, teacher, labels, kept, top = masked_inputs(generator)

    def run(labels):
        leaves = [student[0].detach().clone().requires_grad_(),
                  student[1].detach().clone().requires_grad_()]
        with reads_as_on_a_gpu(), DispatchCounter() as dispatch, \
                TritonTrafficCounter() as traffic:
            loss = masked_loss(loss_name, leaves[0], (None, leaves[1]), teacher, labels, top,
                               "triton", check_values=False)
            loss.backward()
        assert dispatch.host_syncs == 0
        products = traffic.per_kernel["counted_matmul_kernel"]
        return loss.detach(), [x.grad for x in leaves], products.bytes_read

    loss, (grad_hidden, grad_weight), masked_bytes = run(labels)
    kept_hidden = student[0].detach()[kept].clone().requires_grad_()
    weight = student[1].detach().clone().requires_grad_()
    kept_teacher = [teacher[0][kept], teacher[1]]
    want = masked_loss(loss_name, kept_hidden, (None, weight), kept_teacher, labels[kept], top,
                       "triton")
    want.backward()
    assert_close_rel(loss, want.detach(), 1e-5, "loss")
    assert_close_rel(grad_hidden[kept], kept_hidden.grad, 1e-5, "hidden")
    assert_close_rel(grad_weight, weight.grad, 1e-5, "weight")
    assert torch.equal(grad_hidden[~kept], torch.zeros_like(grad_hidden[~kept]))
    every_row = run(torch.where(kept, labels, 0))[2]
    assert masked_bytes <= (kept.float().mean() + 0.15) * every_row
