"""General pair weights, shared ``(C, C)`` and per-row ``(B, C, C)``: loss and gradients against the
float64 reference on both backends, multi-tile cases, half precision, the rank-one cross-check
``w = v v^T``, the out-of-bounds guard of the kernels and the torch path's peak memory."""

import pytest
import torch

import gkl_kernels
from gkl_kernels import buffers
from gkl_kernels.pairs import per_row_kernels, shared_kernels
from gkl_kernels.pairs.torch_impl import CHUNK_ELEMENTS
from gkl_kernels.testing.memory import measure_peak_memory
from reference import gkl_loss_reference
from tests.conftest import (BACKENDS, DTYPE_PAIRS, PaddedAllocator, assert_close_rel,
                            assert_half_precision, loss_and_grads, oracle, padded)

KINDS = ("shared", "per_row")
F32_RTOL = 2e-5


def make_pair_inputs(kind, batch, num_classes, generator, *, symmetric_matrix=False,
                     weight_dtype=torch.float32):
    """Random logits ``(B, C)`` and pair weights of ``kind`` with about 20% zeros: ``(C, C)``
    (made symmetric on request) or ``(B, C, C)``."""
    student = 3 * torch.randn(batch, num_classes, generator=generator)
    teacher = 3 * torch.randn(batch, num_classes, generator=generator)
    shape = (num_classes, num_classes) if kind == "shared" else (batch, num_classes, num_classes)
    weights = torch.rand(shape, generator=generator)
    weights = weights * (torch.rand(shape, generator=generator) > 0.2)
    if symmetric_matrix:
        weights = weights + weights.transpose(-1, -2)
    return student, teacher, weights.to(weight_dtype)


def assert_matches_oracle(kind, student, teacher, weights, backend, block_c=None, **options):
    """``gkl_loss`` with these weights: loss and both gradients within ``F32_RTOL`` of float64."""
    expected = oracle(student, teacher, weights=weights, weights_kind=kind, **options)
    actual = loss_and_grads(gkl_kernels.gkl_loss, student, teacher, weights=weights,
                            weights_kind=kind, backend=backend, block_c=block_c, **options)
    for name, a, e in zip(("loss", "grad_student", "grad_teacher"), actual, expected):
        assert_close_rel(a, e, F32_RTOL, name)
    return actual


# (B, C): every class count of the issue, every batch size; the largest per-row shapes are
# kept small in B (the interpreter's cost grows with programs x tiles)
SHAPES = {"shared": [(5, 1), (33, 2), (1, 3), (33, 17), (5, 100), (33, 100), (5, 257)],
          "per_row": [(5, 1), (33, 2), (1, 3), (33, 17), (5, 100), (1, 257)]}
CASES = [pytest.param(kind, b, c, id=f"{kind}-B{b}-C{c}") for kind in KINDS
         for b, c in SHAPES[kind]]
OPTIONS = dict(mse_weight=20.0, ce_weight=4.0, temperature=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind, batch, num_classes", CASES)
def test_matches_reference(kind, batch, num_classes, backend, generator):
    student, teacher, weights = make_pair_inputs(kind, batch, num_classes, generator)
    assert_matches_oracle(kind, student, teacher, weights, backend, **OPTIONS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric_matrix", [True, False], ids=["symmetric_M", "general_M"])
@pytest.mark.parametrize("normalize", ["weights", "batch"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["gkl", "dkl"])
def test_shared_options(symmetric, normalize, symmetric_matrix, backend, generator):
    student, teacher, weights = make_pair_inputs("shared", 9, 40, generator,
                                                 symmetric_matrix=symmetric_matrix)
    actual = assert_matches_oracle("shared", student, teacher, weights, backend,
                                   normalize=normalize, symmetric=symmetric, **OPTIONS)
    # a general M acts as (M + M^T) / 2, computed without a copy of M
    halves = loss_and_grads(gkl_kernels.gkl_loss, student, teacher,
                            weights=(weights + weights.T) / 2, backend=backend,
                            normalize=normalize, symmetric=symmetric, **OPTIONS)
    for name, a, h in zip(("loss", "grad_student", "grad_teacher"), actual, halves):
        assert_close_rel(a, h, F32_RTOL, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["weights", "batch"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["gkl", "dkl"])
def test_per_row_options(symmetric, normalize, backend, generator):
    student, teacher, weights = make_pair_inputs("per_row", 6, 40, generator)
    assert_matches_oracle("per_row", student, teacher, weights, backend, normalize=normalize,
                          symmetric=symmetric, **OPTIONS)


@pytest.mark.parametrize("kind, batch, num_classes, block_c", [
    pytest.param("shared", 33, 100, 16, id="shared-7x7_tiles"),
    pytest.param("shared", 100, 40, 16, id="shared-2_row_tiles"),
    pytest.param("per_row", 3, 40, 16, id="per_row-3x3_tiles"),
    pytest.param("per_row", 2, 37, 4, id="per_row-10x10_tiles"),
])
def test_multi_tile(kind, batch, num_classes, block_c, generator):
    student, teacher, weights = make_pair_inputs(kind, batch, num_classes, generator)
    assert_matches_oracle(kind, student, teacher, weights, "triton", block_c=block_c, **OPTIONS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_weights_with_zero_rows_and_columns(kind, backend, generator):
    """Classes with no weight at all, and (per row) one row whose weights are all zero."""
    student, teacher, weights = make_pair_inputs(kind, 5, 30, generator)
    weights[..., 3, :] = 0
    weights[..., :, 7] = 0
    if kind == "per_row":
        weights[2] = 0
    assert_matches_oracle(kind, student, teacher, weights, backend, **OPTIONS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_weights_give_zero_wmse(kind, backend, generator):
    """Named edge case: weights summing to 0 leave only the cross-entropy (no NaN)."""
    student, teacher, weights = make_pair_inputs(kind, 4, 12, generator)
    weights.zero_()
    assert_matches_oracle(kind, student, teacher, weights, backend, **OPTIONS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(weight_dtype, kind, backend, generator):
    """Half-precision weights are read as they are (their float64 values are the oracle's)."""
    student, teacher, weights = make_pair_inputs(kind, 5, 40, generator,
                                                 weight_dtype=weight_dtype)
    assert_matches_oracle(kind, student, teacher, weights, backend, **OPTIONS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("s_dtype, t_dtype", DTYPE_PAIRS,
                         ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPE_PAIRS])
def test_half_precision_logits(s_dtype, t_dtype, kind, backend, generator):
    student, teacher, weights = make_pair_inputs(kind, 6, 40, generator, weight_dtype=s_dtype)
    student, teacher = student.to(s_dtype), teacher.to(t_dtype)
    options = dict(weights=weights, weights_kind=kind, **OPTIONS)
    expected = oracle(student, teacher, **options)
    actual = loss_and_grads(gkl_kernels.gkl_loss, student, teacher, backend=backend, **options)
    own = loss_and_grads(gkl_loss_reference, student, teacher, **options)
    assert actual[1].dtype == s_dtype and actual[2].dtype == t_dtype
    assert_half_precision(actual, expected, own, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_invariance(backend, generator):
    """Per-row offsets of 1e4 on the logits change nothing (float32 pivots)."""
    for kind in KINDS:
        student, teacher, weights = make_pair_inputs(kind, 4, 30, generator)
        offsets = 1e4 * torch.randn(4, 1, generator=generator)
        expected = oracle(student, teacher, weights=weights, weights_kind=kind, **OPTIONS)
        actual = loss_and_grads(gkl_kernels.gkl_loss, student + offsets, teacher - offsets,
                                weights=weights, backend=backend, **OPTIONS)
        for name, a, e in zip(("loss", "grad_student", "grad_teacher"), actual, expected):
            assert_close_rel(a, e, 1e-4, f"{kind} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_one_cross_check(backend, generator):
    """``w = v v^T`` through the (C, C) path (row by row) and the (B, C, C) path agrees with the
    rank-one O(C) kernel to float32 rounding: loss rows and gradients."""
    batch, num_classes = 4, 50
    student = (3 * torch.randn(batch, num_classes, generator=generator)).requires_grad_()
    teacher = (3 * torch.randn(batch, num_classes, generator=generator)).requires_grad_()
    v = torch.rand(batch, num_classes, generator=generator)
    outer = v[:, :, None] * v[:, None, :]

    def rows_and_grads(wmse):
        return (wmse.detach(), *torch.autograd.grad(wmse.sum(), (student, teacher)))

    wmse = gkl_kernels.pairwise_wmse
    rank_one = rows_and_grads(wmse(student, teacher, v, reduction="none", backend=backend))
    per_row = rows_and_grads(wmse(student, teacher, outer, reduction="none", backend=backend))
    shared = rows_and_grads(torch.cat([
        wmse(student[b:b + 1], teacher[b:b + 1], outer[b], weights_kind="shared",
             reduction="none", backend=backend) for b in range(batch)]))
    for path, result in (("per_row", per_row), ("shared", shared)):
        for name, a, e in zip(("wmse", "grad_student", "grad_teacher"), result, rank_one):
            assert_close_rel(a, e, 1e-5, f"{path} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, generator):
    """Transposed ``(C, C)`` views and permuted ``(B, C, C)`` views are read through their
    strides."""
    for kind, transpose in (("shared", (0, 1)), ("per_row", (1, 2))):
        student, teacher, weights = make_pair_inputs(kind, 5, 24, generator)
        view = weights.transpose(*transpose).contiguous().transpose(*transpose)
        assert not view.is_contiguous() and torch.equal(view, weights)
        assert_matches_oracle(kind, student.T.contiguous().T, teacher, view, backend, **OPTIONS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("needs_teacher_grad", [False, True])
def test_out_of_bounds_guard(kind, needs_teacher_grad, generator, monkeypatch):
    """Inputs inside NaN padding and every buffer the launchers allocate padded with NaN: the
    padding stays untouched and the results are right."""
    allocator = PaddedAllocator()
    module = shared_kernels if kind == "shared" else per_row_kernels
    monkeypatch.setattr(module, "torch", allocator)
    monkeypatch.setattr(buffers, "torch", allocator)
    student, teacher, weights = make_pair_inputs(kind, 5, 37, generator)
    expected = oracle(student, teacher, weights=weights, weights_kind=kind, ce_weight=0.0)
    s = padded(student).requires_grad_()
    t = padded(teacher).requires_grad_(needs_teacher_grad)
    loss = gkl_kernels.gkl_loss(s, t, weights=padded(weights), ce_weight=0.0, backend="triton",
                                block_c=16)
    loss.backward()
    assert allocator.padding_is_untouched()
    # forward parts, backward gradients (2, empty when not needed), per-row accumulator
    assert len(allocator.buffers) == {"shared": 3, "per_row": 4}[kind]
    assert_close_rel(loss, expected[0], F32_RTOL, "loss")
    assert_close_rel(s.grad, expected[1], F32_RTOL, "grad_student")
    if needs_teacher_grad:
        assert_close_rel(t.grad, expected[2], F32_RTOL, "grad_teacher")


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_torch_path_allocates_nothing_of_size_b_c_c(kind, weight_dtype, generator):
    """Peak memory of a forward+backward pass on the torch path (CPU allocator events): far below
    one ``B x C x C`` float32 tensor (the reference needs several); the per-row path's float64
    chunk of the weights is at most ``CHUNK_ELEMENTS`` of them."""
    batch, num_classes = 64, 300
    assert batch * num_classes ** 2 > 16 * CHUNK_ELEMENTS
    student, teacher, weights = make_pair_inputs(kind, batch, num_classes, generator,
                                                 weight_dtype=weight_dtype)
    s, t = student.requires_grad_(), teacher.requires_grad_()

    def step():
        loss = gkl_kernels.gkl_loss(s, t, weights=weights, backend="torch", **OPTIONS)
        return torch.autograd.grad(loss, (s, t))

    step()
    peak, _ = measure_peak_memory(step)
    pairs_bytes = batch * num_classes * num_classes * 4
    assert peak < pairs_bytes / 4, f"peak {peak} bytes, B x C x C float32 is {pairs_bytes}"
