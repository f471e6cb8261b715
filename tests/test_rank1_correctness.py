"""The rank-one GKL loss, Triton kernels (interpreter) and torch backend, against the float64
reference: loss and both gradients, every weight source, normaliser, mode and paper setting."""

import pytest
import torch

import gkl_kernels
from tests.conftest import (BACKENDS, PAPER_SETTINGS, assert_close_rel, loss_and_grads,
                            make_inputs, oracle)

SOURCES = ("teacher", "prior", "explicit")
FP32_RTOL = 1e-5


def check_against_oracle(student, teacher, backend, rtol=FP32_RTOL, pairwise=True, block_c=None,
                         **options):
    expected = oracle(student, teacher, pairwise=pairwise, **options)
    actual = loss_and_grads(gkl_kernels.gkl_loss, student, teacher, backend=backend,
                            block_c=block_c if backend == "triton" else None, **options)
    assert actual[0].dtype == torch.float32 and actual[0].dim() == 0
    for name, a, e in zip(("loss", "grad_student", "grad_teacher"), actual, expected):
        if not e.any():  # exactly 0 (C = 1): the rounding of d = t - s leaves ulp^2-sized terms
            assert a.abs().max() <= 1e-12, f"{name}: {a.abs().max():.1e} where 0 is exact"
        else:
            assert_close_rel(a, e, rtol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", PAPER_SETTINGS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["gkl", "dkl"])
@pytest.mark.parametrize("normalize", ["weights", "batch"])
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("batch, num_classes, block_c", [(7, 100, None), (5, 100, 16)],
                         ids=["one_tile", "multi_tile"])
def test_options_grid(batch, num_classes, block_c, source, normalize, symmetric, setting, backend,
                      generator):
    student, teacher, weights = make_inputs(batch, num_classes, source, generator)
    check_against_oracle(student, teacher, backend, block_c=block_c, normalize=normalize,
                         symmetric=symmetric, **weights, **PAPER_SETTINGS[setting])


SHAPES = [(b, c) for c in (1, 2, 3, 10, 100, 1000, 1001) for b in (1, 7, 64)]
PAIRWISE_ORACLE_LIMIT = 2**23  # (B, C, C) elements: larger shapes take the reference's O(C) form


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("batch, num_classes", SHAPES, ids=[f"B{b}-C{c}" for b, c in SHAPES])
def test_shapes(batch, num_classes, source, backend, generator):
    """Every C and B; the options rotate with the shape so that each meets several of them. The
    float64 oracle is the reference's pairwise ``B x C x C`` form up to ``PAIRWISE_ORACLE_LIMIT``
    elements (every C at B <= 7), its O(C) form above (B = 64 at C >= 1000)."""
    index = SHAPES.index((batch, num_classes))
    setting = list(PAPER_SETTINGS.values())[index % len(PAPER_SETTINGS)]
    student, teacher, weights = make_inputs(batch, num_classes, source, generator)
    check_against_oracle(student, teacher, backend, normalize=("weights", "batch")[index % 2],
                         pairwise=batch * num_classes**2 <= PAIRWISE_ORACLE_LIMIT,
                         symmetric=bool(index // 2 % 2), **weights, **setting)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("num_classes, block_c", [(100, 16), (37, 8), (1000, 128), (17, 1)])
def test_forced_small_tiles(num_classes, block_c, source, backend, generator):
    """Rows of many tiles, a partial last tile, and one-column tiles."""
    student, teacher, weights = make_inputs(3, num_classes, source, generator)
    check_against_oracle(student, teacher, backend, block_c=block_c, gamma=0.6, temperature=2.0,
                         **weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
def test_vocabulary_row(source, backend, generator):
    """One row of C = 262144 (the largest vocabularies): 64 tiles of 4096; oracle in O(C) form."""
    student, teacher, weights = make_inputs(1, 262144, source if source != "prior" else "explicit",
                                            generator)
    check_against_oracle(student, teacher, backend, pairwise=False, gamma=0.5, **weights)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("side", ["student", "teacher", "both"])
def test_offset_invariance(side, source, backend, generator):
    """Per-row offsets of 1e4 to 3e4 leave loss and gradients unchanged to float32 rounding.

    Logits lie on a grid of 2**-7, so that ``x + offset`` is exact in float32: the shifted problem
    is the same problem, and any difference is the implementation's cancellation."""
    student, teacher, weights = make_inputs(6, 300, source, generator)
    student, teacher = (torch.round(x * 128) / 128 for x in (student, teacher))
    offset = 1e4 * torch.tensor([1.0, 2.0, 3.0, -1.0, -2.0, -3.0])[:, None]
    shifted_s = student + offset if side in ("student", "both") else student
    shifted_t = teacher + 2 * offset if side in ("teacher", "both") else teacher
    options = dict(backend=backend, gamma=0.6, temperature=2.0,
                   block_c=64 if backend == "triton" else None, **weights)
    base = loss_and_grads(gkl_kernels.gkl_loss, student, teacher, **options)
    shifted = loss_and_grads(gkl_kernels.gkl_loss, shifted_s, shifted_t, **options)
    for name, a, e in zip(("loss", "grad_student", "grad_teacher"), shifted, base):
        assert_close_rel(a, e.double(), FP32_RTOL, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_c", [None, 16])
def test_theorem_1_dkl_equals_kl(block_c, backend, generator):
    """DKL with teacher weights, gamma = T = T2 = 1, N = B: the gradients of batch-mean KL(t || s)."""
    student, teacher, _ = make_inputs(9, 100, "teacher", generator)
    dkl = loss_and_grads(gkl_kernels.gkl_loss, student, teacher, backend=backend,
                         block_c=block_c if backend == "triton" else None, normalize="batch",
                         symmetric=False)

    def kl(s, t):
        return torch.nn.functional.kl_div(torch.log_softmax(s, 1), torch.log_softmax(t, 1),
                                          log_target=True, reduction="batchmean")

    expected = loss_and_grads(kl, student.double(), teacher.double())
    assert_close_rel(dkl[1], expected[1], FP32_RTOL, "grad_student")
    assert_close_rel(dkl[2], expected[2], FP32_RTOL, "grad_teacher")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ["student", "teacher", "both"])
def test_only_required_gradients(needs, backend, generator):
    student, teacher, _ = make_inputs(4, 50, "teacher", generator)
    student.requires_grad_(needs in ("student", "both"))
    teacher.requires_grad_(needs in ("teacher", "both"))
    loss = gkl_kernels.gkl_loss(student, teacher, backend=backend, gamma=0.6)
    (0.37 * loss).backward()
    _, grad_s, grad_t = oracle(student, teacher, gamma=0.6)
    assert (student.grad is not None) == (needs in ("student", "both"))
    assert (teacher.grad is not None) == (needs in ("teacher", "both"))
    if student.grad is not None:
        assert_close_rel(student.grad, 0.37 * grad_s, FP32_RTOL, "grad_student")
    if teacher.grad is not None:
        assert_close_rel(teacher.grad, 0.37 * grad_t, FP32_RTOL, "grad_teacher")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_matches(backend, generator):
    student, teacher, weights = make_inputs(5, 40, "explicit", generator)
    with torch.no_grad():
        loss = gkl_kernels.gkl_loss(student, teacher, backend=backend, **weights)
    assert_close_rel(loss, oracle(student, teacher, **weights)[0], FP32_RTOL, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_views(backend, generator):
    """Non-contiguous inputs (column stride != 1) give the contiguous result."""
    student, teacher, weights = make_inputs(6, 33, "explicit", generator)
    views = [x.t().contiguous().t() for x in (student, teacher, weights["weights"])]
    assert not any(v.is_contiguous() for v in views)
    expected = loss_and_grads(gkl_kernels.gkl_loss, student, teacher, backend=backend, **weights)
    actual = loss_and_grads(gkl_kernels.gkl_loss, views[0], views[1], backend=backend,
                            weights=views[2])
    for name, a, e in zip(("loss", "grad_student", "grad_teacher"), actual, expected):
        assert_close_rel(a, e.double(), FP32_RTOL, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_pairwise_wmse(reduction, backend, generator):
    from reference import pair_weights_reference, pairwise_wmse_reference

    student, teacher, weights = make_inputs(7, 45, "explicit", generator)
    v = weights["weights"]

    def reference(s, t):
        rows = pairwise_wmse_reference(s, t, pair_weights_reference(v.double(), s.shape[0]))
        return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]

    def package(s, t):
        return gkl_kernels.pairwise_wmse(s, t, v, reduction=reduction, backend=backend,
                                         block_c=16 if backend == "triton" else None)

    cotangent = torch.rand(7, generator=generator) if reduction == "none" else torch.tensor(0.37)
    expected = loss_and_grads(lambda s, t: (reference(s, t) * cotangent.double()).sum(),
                              student.double(), teacher.double())
    actual = loss_and_grads(lambda s, t: (package(s, t) * cotangent).sum(), student, teacher)
    values = package(student, teacher)
    assert values.shape == ((7,) if reduction == "none" else ())
    assert_close_rel(values, reference(student.double(), teacher.double()), FP32_RTOL, "value")
    for name, a, e in zip(("weighted", "grad_student", "grad_teacher"), actual, expected):
        assert_close_rel(a, e, FP32_RTOL, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_logits_give_zero_wmse(backend, generator):
    """Edge case: student == teacher, so every pairwise difference cancels exactly."""
    student, _, weights = make_inputs(5, 70, "explicit", generator)
    values = gkl_kernels.pairwise_wmse(student, student.clone(), weights["weights"],
                                       reduction="none", backend=backend)
    assert torch.equal(values, torch.zeros(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_rows(backend, generator):
    """Edge cases: a row whose weights are all 0 adds nothing; an all-zero batch gives wMSE 0."""
    student, teacher, weights = make_inputs(4, 30, "explicit", generator)
    weights["weights"][1] = 0
    check_against_oracle(student, teacher, backend, **weights)
    loss = gkl_kernels.gkl_loss(student, teacher, weights=torch.zeros(4, 30), ce_weight=0.0,
                                backend=backend)
    assert loss.item() == 0.0
