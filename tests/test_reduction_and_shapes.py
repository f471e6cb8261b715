"""``reduction``, logits of any shape ``(..., C)``, float64, empty batches and the small argument
forms of ``gkl_loss`` / ``GKLLoss``: against the float64 pairwise reference written per row, and
against the flattened call."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from gkl_kernels import FusedLinearGKLLoss, GKLLoss, functional, fused_linear_gkl, gkl_loss
from gkl_kernels.options import GKLOptions
from reference.gkl import pair_weights_reference, pairwise_wmse_reference, rank1_factor_reference
from tests.conftest import BACKENDS, assert_close_rel, make_inputs

SOURCES = ("teacher", "prior", "explicit", "shared", "per_row")
ROWS, CLASSES = 9, 13
OPTIONS = dict(mse_weight=3.0, ce_weight=0.7, gamma=0.6, temperature=2.0, weight_temperature=1.5)
RTOL = 1e-5


def source_inputs(source, generator, rows=ROWS, classes=CLASSES, dtype=torch.float32):
    """Logits, labels with two rows ignored, and the weight keyword arguments of ``source``."""
    student, teacher, kwargs = make_inputs(rows, classes, "explicit" if source in (
        "shared", "per_row") else source, generator, dtype=dtype)
    if source in ("shared", "per_row"):
        shape = (classes, classes) if source == "shared" else (rows, classes, classes)
        kwargs = dict(weights=torch.rand(*shape, generator=generator, dtype=dtype),
                      weights_kind=source)
    labels = kwargs.pop("labels", torch.randint(0, classes, (rows,), generator=generator))
    labels = labels.clone()
    labels[[1, rows - 2]] = -100
    return student, teacher, labels, kwargs


def rows_reference(student, teacher, labels, kwargs, *, mse_weight=1.0, ce_weight=1.0,
                   gamma=1.0, temperature=1.0, weight_temperature=1.0, symmetric=True):
    """Per-row losses ``mse_weight wmse_b / 4 + ce_weight CE_b`` in float64 (0 where ignored)."""
    s, t = student.double(), teacher.double()
    kind = kwargs.get("weights_kind", "factor")
    weights = kwargs.get("weights")
    if weights is not None and kind != "factor":
        w = pair_weights_reference(weights.double(), s.shape[0], shared=kind == "shared")
    else:
        prior = kwargs.get("class_prior")
        v = rank1_factor_reference(
            t, labels=labels.clamp_min(0) if prior is not None else None,
            class_prior=None if prior is None else prior.double(),
            weights=None if weights is None else weights.double(), gamma=gamma,
            weight_temperature=weight_temperature)
        w = pair_weights_reference(v, s.shape[0])
    wmse = pairwise_wmse_reference(s, t, w, stop_student=not symmetric)
    ce = -(torch.softmax(t.detach() / temperature, 1) * torch.log_softmax(s / temperature, 1)
           ).sum(1)
    return torch.where(labels != -100, mse_weight * wmse / 4 + ce_weight * ce, 0.0)


def rows_and_grads(fn, student, teacher, upstream):
    """``fn(s, t)`` per row and the gradients of ``sum(upstream * rows)``."""
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    rows = fn(s, t)
    grads = torch.autograd.grad((rows * upstream.to(rows.dtype)).sum(), (s, t))
    return rows.detach(), *grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["gkl", "dkl"])
@pytest.mark.parametrize("source", SOURCES)
def test_none_is_the_per_row_loss(source, symmetric, backend, generator):
    student, teacher, labels, kwargs = source_inputs(source, generator)
    upstream = torch.randn(ROWS, generator=generator)
    options = dict(OPTIONS, symmetric=symmetric)
    got = rows_and_grads(lambda s, t: gkl_loss(s, t, labels=labels, reduction="none",
                                               backend=backend, **kwargs, **options),
                         student, teacher, upstream)
    want = rows_and_grads(lambda s, t: rows_reference(s, t, labels, kwargs, **options),
                          student.double(), teacher.double(), upstream)
    assert got[0].shape == (ROWS,) and got[0].dtype == torch.float32
    for name, a, b in zip(("rows", "grad_student", "grad_teacher"), got, want):
        assert_close_rel(a, b, RTOL, name)
    ignored = labels == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
def test_sum_and_mean_from_the_rows(source, backend, generator):
    student, teacher, labels, kwargs = source_inputs(source, generator)
    common = dict(labels=labels, backend=backend, **kwargs, **OPTIONS)
    rows = gkl_loss(student, teacher, reduction="none", **common)
    total = gkl_loss(student, teacher, reduction="sum", **common)
    assert total.dim() == 0
    torch.testing.assert_close(total, rows.sum(), rtol=2e-6, atol=0)
    # normalize="batch": the mean over the kept rows; "weights" differs (the wMSE is over N)
    batch_mean = gkl_loss(student, teacher, normalize="batch", **common)
    kept = (labels != -100).sum()
    torch.testing.assert_close(batch_mean, rows.sum() / kept, rtol=2e-6, atol=0)


def test_reduction_refused_where_it_has_no_meaning(generator):
    student, teacher, _, _ = source_inputs("teacher", generator)
    with pytest.raises(ValueError, match="reduction"):
        gkl_loss(student, teacher, reduction="batchmean")
    with pytest.raises(ValueError, match="sync_normalizer.*reduction"):
        gkl_loss(student, teacher, reduction="none", sync_normalizer=True)
    hidden, weight = torch.randn(4, 8), torch.randn(CLASSES, 8)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_gkl(hidden, weight, hidden, weight, reduction="none")


@pytest.mark.parametrize("bad", ["label", "weight"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_per_row_losses_check_values_where_the_kernels_do_not(reduction, bad, generator,
                                                             monkeypatch):
    """As on a GPU, where the finishing kernel's assertion checks labels and weights: the per-row
    losses run no finishing kernel, so their values are checked before (device-side on CUDA)."""
    monkeypatch.setattr(functional, "kernels_check_values", lambda use_triton, device: use_triton)
    student, teacher, labels, kwargs = source_inputs("prior", generator)
    if bad == "label":
        labels[0] = CLASSES
    else:
        kwargs["class_prior"][labels[0], 3] = -1.0
    with pytest.raises(ValueError, match="labels" if bad == "label" else "class_prior"):
        gkl_loss(student, teacher, labels=labels, reduction=reduction, backend="triton",
                 **kwargs)


SHAPES = [(3, 4), (2, 3, 2), (5,)]  # leading shapes of the logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", SHAPES, ids=str)
@pytest.mark.parametrize("source", SOURCES)
def test_leading_dims_equal_the_flattened_call(source, lead, backend, generator):
    rows = int(np.prod(lead))
    student, teacher, labels, kwargs = source_inputs(source, generator, rows=rows)
    shaped = dict(kwargs)
    if source in ("explicit", "per_row"):
        shaped["weights"] = kwargs["weights"].reshape(*lead, *kwargs["weights"].shape[1:])
        shaped.pop("weights_kind")  # the shape says it
    common = dict(backend=backend, **OPTIONS)
    s_nd = student.reshape(*lead, CLASSES).requires_grad_()
    s_2d = student.clone().requires_grad_()
    for reduction in ("mean", "none"):
        got = gkl_loss(s_nd, teacher.reshape(*lead, CLASSES), labels=labels.reshape(lead),
                       reduction=reduction, **shaped, **common)
        want = gkl_loss(s_2d, teacher, labels=labels, reduction=reduction, **kwargs, **common)
        assert got.shape == (lead if reduction == "none" else ())
        torch.testing.assert_close(got.reshape(-1), want.reshape(-1), rtol=1e-6, atol=1e-7)
        got.sum().backward()
        want.sum().backward()
        assert s_nd.grad.shape == s_nd.shape
        torch.testing.assert_close(s_nd.grad.reshape(rows, CLASSES), s_2d.grad, rtol=1e-6,
                                   atol=1e-7)
        s_nd.grad = s_2d.grad = None


def test_leading_dims_errors_name_the_argument(generator):
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="labels must have the logits' leading shape"):
        gkl_loss(student, teacher, labels=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="student and teacher must have the same shape"):
        gkl_loss(student, teacher.reshape(6, 5))
    with pytest.raises(ValueError, match="weights"):
        gkl_loss(student, teacher, weights=torch.rand(6, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", [None, "shared"], ids=["kind_from_shape", "kind_shared"])
def test_square_weights_of_higher_rank_logits_are_shared(kind, backend, generator):
    """``(2, 3, C)`` logits with ``(C, C)`` weights, ``C == 6`` rows once flattened: not
    ambiguous (a factor would be ``(2, 3, C)``), the shared matrix; as the flattened call."""
    student, teacher = torch.randn(2, 3, 6, generator=generator), torch.randn(2, 3, 6)
    weights = torch.rand(6, 6, generator=generator)
    common = dict(backend=backend, **OPTIONS)
    s_nd = student.clone().requires_grad_()
    s_2d = student.reshape(6, 6).clone().requires_grad_()
    for reduction in ("mean", "none"):
        got = gkl_loss(s_nd, teacher, weights=weights, weights_kind=kind, reduction=reduction,
                       **common)
        want = gkl_loss(s_2d, teacher.reshape(6, 6), weights=weights, weights_kind="shared",
                        reduction=reduction, **common)
        assert got.shape == ((2, 3) if reduction == "none" else ())
        torch.testing.assert_close(got.reshape(-1), want.reshape(-1), rtol=1e-6, atol=1e-7)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(s_nd.grad.reshape(6, 6), s_2d.grad, rtol=1e-6, atol=1e-7)
        s_nd.grad = s_2d.grad = None


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_weights_of_one_row_are_its_matrix(backend, generator):
    """1-D logits ``(C,)``: a ``(C, C)`` matrix is the one row's, named "shared" or not."""
    student, teacher = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    weights = torch.rand(5, 5, generator=generator)
    want = gkl_loss(student[None], teacher[None], weights=weights[None], backend=backend)
    for kind in (None, "shared", "per_row"):
        got = gkl_loss(student, teacher, weights=weights, weights_kind=kind, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weights_shape, kind, message", [
    ((6, 6), "factor", r"weights must have shape \(2, 3, 6\), got \(6, 6\)"),
    ((2, 3, 6), "shared", r"weights must have shape \(6, 6\), got \(2, 3, 6\)"),
    ((6, 6), "per_row", r"weights must have shape \(2, 3, 6, 6\), got \(6, 6\)"),
    ((6, 6, 6), None, r"weights must have shape \(\.\.\., C\) = \(2, 3, 6\), \(C, C\) = "
                      r"\(6, 6\) or \(\.\.\., C, C\) = \(2, 3, 6, 6\), got \(6, 6, 6\)"),
], ids=["C_C_named_factor", "factor_named_shared", "C_C_named_per_row", "flattened_per_row"])
def test_weights_of_higher_rank_logits_checked_as_given(weights_shape, kind, message):
    """The weights' shape is checked against the logits' as the caller gave them, not against
    the flattened ``(6, 6)`` rows (where each of these would pass as the named kind)."""
    student, teacher = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    with pytest.raises(ValueError, match=message):
        gkl_loss(student, teacher, weights=torch.rand(weights_shape), weights_kind=kind)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_gradcheck(source, backend, generator):
    student, teacher, labels, kwargs = source_inputs(source, generator, rows=4, classes=5,
                                                     dtype=torch.float64)
    kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in kwargs.items()}
    s = student.clone().requires_grad_()
    for reduction in ("mean", "none"):
        def loss(x):
            return gkl_loss(x, teacher, labels=labels, reduction=reduction, backend=backend,
                            **kwargs, **OPTIONS)
        assert loss(s).dtype == torch.float64
        assert gradcheck(loss, (s,), fast_mode=True)  # a random projection of the Jacobian
    if source in ("explicit", "shared", "per_row"):  # weights constant: the teacher's too
        t = teacher.clone().requires_grad_()
        assert gradcheck(lambda x, y: gkl_loss(x, y, ce_weight=0.0, backend=backend, **kwargs),
                         (s, t), fast_mode=True)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_the_reference(source, backend, generator):
    """float64 logits are computed in float64 on both backends (the Triton kernels' ``ACC``):
    per-row losses and the loss to float64 rounding, gradients against the torch path."""
    student, teacher, labels, kwargs = source_inputs(source, generator, dtype=torch.float64)
    kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in kwargs.items()}
    rows = gkl_loss(student, teacher, labels=labels, reduction="none", backend=backend, **kwargs,
                    **OPTIONS)
    assert rows.dtype == torch.float64
    want = rows_reference(student, teacher, labels, kwargs, **OPTIONS)
    torch.testing.assert_close(rows, want, rtol=1e-12, atol=1e-13)
    s = student.clone().requires_grad_()
    loss = gkl_loss(s, teacher, labels=labels, backend=backend, **kwargs, **OPTIONS)
    s_torch = student.clone().requires_grad_()
    plain = gkl_loss(s_torch, teacher, labels=labels, backend="torch", **kwargs, **OPTIONS)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, plain, rtol=1e-12, atol=1e-14)
    loss.backward()
    plain.backward()
    torch.testing.assert_close(s.grad, s_torch.grad, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("dot_precision", ["tf32", "tf32x3"])
def test_float64_needs_ieee_dot_precision(dot_precision, generator):
    student, teacher = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, 16)
    weights = torch.rand(16, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 logits need dot_precision='ieee'"):
        gkl_loss(student, teacher, weights=weights, weights_kind="shared", backend="triton",
                 dot_precision=dot_precision)
    rows = gkl_loss(student, teacher, weights=weights, weights_kind="shared", backend="torch",
                    dot_precision=dot_precision, reduction="none")  # the torch path has no dot
    assert rows.dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_zero(backend):
    student = torch.randn(0, CLASSES, requires_grad=True)
    teacher = torch.randn(0, CLASSES)
    labels = torch.zeros(0, dtype=torch.long)
    loss = gkl_loss(student, teacher, labels=labels, backend=backend)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert student.grad.shape == student.shape
    rows = GKLLoss(reduction="none", backend=backend)(torch.randn(2, 0, 5), torch.randn(2, 0, 5))
    assert rows.shape == (2, 0)


@pytest.mark.parametrize("value", [np.float32(2.0), np.float64(2.0), np.int64(2), 2, 2.0],
                         ids=["np_float32", "np_float64", "np_int64", "int", "float"])
def test_numbers_of_any_real_type(value, generator):
    student, teacher, _, _ = source_inputs("teacher", generator)
    options = GKLOptions(temperature=value, gamma=value, mse_weight=value)
    assert type(options.temperature) is float and options.temperature == 2.0
    expected = gkl_loss(student, teacher, temperature=2.0, gamma=2.0, mse_weight=2.0)
    got = gkl_loss(student, teacher, temperature=value, gamma=value, mse_weight=value)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("value", [True, torch.tensor(2.0), "2", None],
                         ids=["bool", "tensor", "str", "None"])
def test_non_numbers_refused(value):
    with pytest.raises(TypeError, match="temperature must be a number"):
        gkl_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=value)


def test_one_hot_labels_get_a_clear_error(generator):
    student, teacher, kwargs = make_inputs(4, 5, "prior", generator)
    one_hot = F.one_hot(kwargs.pop("labels"), 5).float()
    with pytest.raises(TypeError, match="labels must be class indices.*argmax"):
        gkl_loss(student, teacher, labels=one_hot, **kwargs)


def test_fused_linear_module_repr_lists_only_its_options():
    text = repr(FusedLinearGKLLoss(temperature=2.0))
    assert "temperature=2.0" in text
    for refused in ("sync_normalizer", "process_group", "reduction"):
        assert refused not in text


def test_public_api_is_typed():
    import gkl_kernels
    from pathlib import Path
    assert (Path(gkl_kernels.__file__).parent / "py.typed").exists()
    hints = gkl_loss.__annotations__
    assert "Literal" in str(hints["reduction"]) and hints["return"] is torch.Tensor
    assert "Args:" in gkl_loss.__doc__ and "Args:" in GKLLoss.forward.__doc__
