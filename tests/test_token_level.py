"""Token-level GKL: ``labels`` holding ``ignore_index`` drop rows from the loss, its normaliser and
its gradient. Checked against the float64 reference restricted to the kept rows, for every weight
source, both backends, ignored rows anywhere, none and all of them."""

import pytest
import torch

from gkl_kernels import GKLLoss, gkl_loss
from tests.conftest import (BACKENDS, PAPER_SETTINGS, assert_close_rel, loss_and_grads,
                            make_inputs, oracle)

SOURCES = ("teacher", "prior", "explicit", "shared", "per_row")
ROWS, CLASSES = 11, 37
FP32_RTOL = 1e-5


def token_inputs(source, generator, rows=ROWS, classes=CLASSES):
    """Logits, labels in ``[0, C)`` and the weight keyword arguments of one source."""
    student, teacher, kwargs = make_inputs(rows, classes, "explicit" if source in (
        "shared", "per_row") else source, generator)
    if source in ("shared", "per_row"):
        shape = (classes, classes) if source == "shared" else (rows, classes, classes)
        kwargs = dict(weights=torch.rand(*shape, generator=generator), weights_kind=source)
    labels = kwargs.pop("labels", torch.randint(0, classes, (rows,), generator=generator))
    return student, teacher, labels, kwargs


def kept_part(kwargs, kept):
    """The per-row keyword arguments restricted to the kept rows."""
    per_row = ("weights",) if kwargs.get("weights_kind") in ("factor", "per_row") else ()
    return {k: v[kept] if k in per_row else v for k, v in kwargs.items()}


def ignored_mask(pattern, rows, generator):
    if pattern == "random":
        return torch.rand(rows, generator=generator) < 0.4
    if pattern == "ends":
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[[0, 1, rows - 1]] = True
        return mask
    return torch.zeros(rows, dtype=torch.bool)  # "none"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["random", "ends", "none"])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("symmetric", [True, False], ids=["gkl", "dkl"])
def test_ignored_rows_match_reference_on_kept_rows(symmetric, source, pattern, backend,
                                                   generator):
    student, teacher, labels, kwargs = token_inputs(source, generator)
    ignored = ignored_mask(pattern, ROWS, generator)
    assert 0 < int((~ignored).sum())
    labels = labels.masked_fill(ignored, -100)
    options = dict(PAPER_SETTINGS["imagenet_kd"], symmetric=symmetric)
    actual = loss_and_grads(gkl_loss, student, teacher, labels=labels, backend=backend,
                            **options, **kwargs)
    kept = ~ignored
    expected = oracle(student[kept], teacher[kept], labels=labels[kept], **options,
                      **kept_part(kwargs, kept))
    assert_close_rel(actual[0], expected[0], FP32_RTOL, "loss")
    for index, name in ((1, "grad_student"), (2, "grad_teacher")):
        assert_close_rel(actual[index][kept], expected[index], FP32_RTOL, name)
        assert torch.equal(actual[index][ignored], torch.zeros_like(actual[index][ignored]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["weights", "batch"])
def test_normalisers_count_kept_rows_only(normalize, backend, generator):
    student, teacher, labels, kwargs = token_inputs("prior", generator)
    ignored = ignored_mask("random", ROWS, generator)
    labels = labels.masked_fill(ignored, -100)
    actual = loss_and_grads(gkl_loss, student, teacher, labels=labels, backend=backend,
                            normalize=normalize, **kwargs)
    kept = ~ignored
    expected = oracle(student[kept], teacher[kept], labels=labels[kept], normalize=normalize,
                      **kwargs)
    assert_close_rel(actual[0], expected[0], FP32_RTOL, "loss")
    # the whole batch's loss differs: the ignored rows would have counted
    whole = oracle(student, teacher, labels=labels.masked_fill(ignored, 0), normalize=normalize,
                   **kwargs)
    assert abs(float(whole[0] - expected[0])) > 1e-3 * abs(float(expected[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
def test_all_ignored_gives_zero_loss_and_zero_gradients(source, backend, generator):
    student, teacher, labels, kwargs = token_inputs(source, generator)
    labels = torch.full_like(labels, -100)
    loss, grad_s, grad_t = loss_and_grads(gkl_loss, student, teacher, labels=labels,
                                          backend=backend, **kwargs)
    assert loss.item() == 0.0
    assert torch.equal(grad_s, torch.zeros_like(grad_s))
    assert torch.equal(grad_t, torch.zeros_like(grad_t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_ignored_labels_equal_no_labels(backend, generator):
    student, teacher, labels, _ = token_inputs("teacher", generator)
    with_labels = loss_and_grads(gkl_loss, student, teacher, labels=labels, backend=backend)
    without = loss_and_grads(gkl_loss, student, teacher, backend=backend)
    for a, b in zip(with_labels, without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_with_its_own_ignore_index(backend, generator):
    student, teacher, labels, kwargs = token_inputs("prior", generator)
    ignored = ignored_mask("random", ROWS, generator)
    module = GKLLoss(ignore_index=-1, backend=backend, gamma=0.6)
    actual = loss_and_grads(module, student, teacher, labels=labels.masked_fill(ignored, -1),
                            **kwargs)
    kept = ~ignored
    expected = oracle(student[kept], teacher[kept], labels=labels[kept], gamma=0.6, **kwargs)
    assert_close_rel(actual[0], expected[0], FP32_RTOL, "loss")
    assert_close_rel(actual[1][kept], expected[1], FP32_RTOL, "grad_student")
    assert "ignore_index=-1" in repr(module)


def test_vocabulary_scale_rows(generator):
    """A few tokens over a 32000-entry vocabulary, half of them ignored, plain-PyTorch path."""
    student, teacher, labels, _ = token_inputs("teacher", generator, rows=6, classes=32000)
    ignored = torch.tensor([True, False, True, False, True, False])
    labels = labels.masked_fill(ignored, -100)
    options = PAPER_SETTINGS["imagenet_kd"]
    actual = loss_and_grads(gkl_loss, student, teacher, labels=labels, backend="torch",
                            **options)
    kept = ~ignored
    expected = oracle(student[kept], teacher[kept], pairwise=False, **options)
    for index, name in enumerate(("loss", "grad_student", "grad_teacher")):
        value = actual[index][kept] if index else actual[index]
        assert_close_rel(value, expected[index], 1e-4, name)


@pytest.mark.parametrize("bad, match", [(-5, r"equal ignore_index=-100, found -5"),
                                        (CLASSES, rf"\[0, {CLASSES}\).*found {CLASSES}")])
def test_labels_outside_range_and_not_ignored_are_refused(bad, match, generator):
    student, teacher, labels, _ = token_inputs("teacher", generator)
    labels[3] = bad
    labels[5] = -100
    with pytest.raises(ValueError, match=match):
        gkl_loss(student, teacher, labels=labels)


@pytest.mark.parametrize("value", [1.5, True, "x", None])
def test_ignore_index_must_be_an_int(value):
    student = torch.randn(2, 3)
    with pytest.raises(TypeError, match="ignore_index"):
        gkl_loss(student, student, ignore_index=value)
