"""General pair weights on hostile inputs, both kinds, both backends: per-row wMSE and its
gradients against a float64 oracle of the masked semantics, held to the accuracy rule of the
rank-one suite (at most ``max(4 x plain float32 error, 1e-5)``, relative to the largest expected
value), with the literal pairwise formula in float32 as the plain baseline.

Masked semantics: a class is absent from a row when either logit is ``-inf``; absent classes drop
out of every pair (``w[j, k] in_j in_k``), their gradients are exactly 0, and the loss equals the
loss of the rows without those columns (``N`` counts the present pairs' weights only).
"""

import pytest
import torch

import gkl_kernels
from tests.adversarial_cases import FLOAT32_FACTOR, FLOAT32_FLOOR, drop_columns
from tests.conftest import relative_error

NEG_INF = float("-inf")
KINDS = ("shared", "per_row")
CLASSES = 40
ROWS = 5
BACKEND_TILES = [pytest.param("torch", None, id="torch"),
                 pytest.param("triton", None, id="triton"),
                 pytest.param("triton", 16, id="triton-tiles16")]


def _present_pairs(s, t, weights):
    """The weights ``(B, C, C)`` on the present pairs and ``d = t - s`` (0 on absent classes), in
    the logits' dtype."""
    present = (s != NEG_INF) & (t != NEG_INF)
    w = weights.to(s.dtype)
    if w.dim() == 2:
        w = w.expand(s.shape[0], *w.shape)
    both = present[:, :, None] & present[:, None, :]
    return torch.where(both, w, 0.0), torch.where(present, s, 0.0), torch.where(present, t, 0.0)


def oracle_rows(s, t, weights):
    """``sum_{j,k} w[j,k] (d_j - d_k)^2`` per row in float64 on the present pairs."""
    w, s, t = _present_pairs(s, t, weights)
    d = t - s
    diff = d[:, :, None] - d[:, None, :]
    return (w * diff * diff).sum(dim=(1, 2))


def plain_rows(s, t, weights):
    """The literal formula ``w ((t_j - t_k) - (s_j - s_k))^2`` in float32 (masked as the oracle:
    evaluated literally every ``-inf`` case is NaN)."""
    w, s, t = _present_pairs(s, t, weights)
    diff = (t[:, :, None] - t[:, None, :]) - (s[:, :, None] - s[:, None, :])
    return (w * diff * diff).sum(dim=(1, 2))


def rows_and_grads(fn, student, teacher, weights, dtype):
    s = student.detach().to(dtype).requires_grad_()
    t = teacher.detach().to(dtype).requires_grad_()
    rows = fn(s, t, weights)
    grads = torch.autograd.grad(rows.sum(), (s, t))
    return rows.detach(), *grads


def package_rows(backend, block_c):
    def rows(s, t, weights):
        return gkl_kernels.pairwise_wmse(s, t, weights, reduction="none", backend=backend,
                                         block_c=block_c)
    return rows


def assert_within_rule(student, teacher, weights, backend, block_c):
    expected = rows_and_grads(oracle_rows, student, teacher, weights, torch.float64)
    plain = rows_and_grads(plain_rows, student, teacher, weights, torch.float32)
    actual = rows_and_grads(package_rows(backend, block_c), student, teacher, weights,
                            torch.float32)
    for name, a, p, e in zip(("wmse", "grad_student", "grad_teacher"), actual, plain, expected):
        bound = max(FLOAT32_FACTOR * relative_error(p, e), FLOAT32_FLOOR)
        error = relative_error(a, e)
        assert error <= bound, f"{name}: error {error:.3e} > bound {bound:.3e}"
    return actual


def clustered(kind, generator, offsets, blocks, rows=ROWS, classes=CLASSES):
    """The class-hierarchy structure: ``t = s + 0.01 N(0, 1)``, each block of classes shifted by
    its offset in ``t``, weights nonzero only inside the blocks (random, non-symmetric)."""
    student = torch.randn(rows, classes, generator=generator)
    teacher = student + 0.01 * torch.randn(rows, classes, generator=generator)
    matrix = torch.zeros(classes, classes)
    for offset, block in zip(offsets, blocks):
        teacher[:, block] += offset
        size = block.stop - block.start
        matrix[block, block] = torch.rand(size, size, generator=generator)
    if kind == "shared":
        return student, teacher, matrix
    return student, teacher, matrix * torch.rand(rows, classes, classes, generator=generator)


CLUSTERS = {
    "first-block": ([1.0], [slice(0, 10)]),
    "middle-block": ([1.0], [slice(15, 25)]),
    "two-blocks-opposite": ([1.0, -1.0], [slice(3, 13), slice(25, 33)]),
}


@pytest.mark.parametrize("backend, block_c", BACKEND_TILES)
@pytest.mark.parametrize("offset", [10.0, 100.0, 1000.0])
@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
@pytest.mark.parametrize("kind", KINDS)
def test_clustered_offsets(kind, cluster, offset, backend, block_c, generator):
    signs, blocks = CLUSTERS[cluster]
    student, teacher, weights = clustered(kind, generator, [offset * s for s in signs], blocks)
    assert_within_rule(student, teacher, weights, backend, block_c)


def general_inputs(kind, generator, rows=ROWS, classes=CLASSES):
    """Random logits and non-symmetric weights with zero rows and columns."""
    student = 3 * torch.randn(rows, classes, generator=generator)
    teacher = 3 * torch.randn(rows, classes, generator=generator)
    shape = (classes, classes) if kind == "shared" else (rows, classes, classes)
    weights = torch.rand(shape, generator=generator)
    weights[..., 5, :] = 0.0
    weights[..., :, 7] = 0.0
    return student, teacher, weights


MASK_COLUMNS = {"first": [0], "middle": [CLASSES // 2], "last": [CLASSES - 1],
                "several": [0, 9, 21, CLASSES - 1]}
MASKS = [pytest.param(v, id=f"{v:.0e}") for v in (-1e4, -1e6, -1e9)] + [
    pytest.param(torch.finfo(torch.float32).min, id="finfo.min")]


@pytest.mark.parametrize("backend, block_c", BACKEND_TILES)
@pytest.mark.parametrize("value", MASKS)
@pytest.mark.parametrize("position", sorted(MASK_COLUMNS))
@pytest.mark.parametrize("kind", KINDS)
def test_masked_columns(kind, position, value, backend, block_c, generator):
    """Huge finite masks in both logits, the masked classes' weights nonzero."""
    student, teacher, weights = general_inputs(kind, generator)
    columns = MASK_COLUMNS[position]
    student[:, columns] = value
    teacher[:, columns] = value
    assert_within_rule(student, teacher, weights, backend, block_c)


@pytest.mark.parametrize("backend, block_c", BACKEND_TILES)
@pytest.mark.parametrize("offset", [1e4, 1e6])
@pytest.mark.parametrize("side", ["both", "teacher"])
@pytest.mark.parametrize("kind", KINDS)
def test_row_offsets(kind, side, offset, backend, block_c, generator):
    student, teacher, weights = general_inputs(kind, generator)
    shift = offset * torch.arange(1, ROWS + 1, dtype=torch.float32)[:, None]
    teacher = teacher + shift
    if side == "both":
        student = student + shift
    assert_within_rule(student, teacher, weights, backend, block_c)


MINUS_INF_SIDES = ["both", "teacher", "student"]


@pytest.mark.parametrize("backend, block_c", BACKEND_TILES)
@pytest.mark.parametrize("side", MINUS_INF_SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_classes_are_absent(kind, side, backend, block_c, generator):
    """``-inf`` on either side: the row's wMSE (and the GKL loss, whose ``N`` counts the present
    pairs) equals that of the rows without those columns; their gradients are exactly 0."""
    student, teacher, weights = general_inputs(kind, generator)
    columns = [0, 13, CLASSES - 1]
    for x in ((student, teacher) if side == "both" else
              (teacher,) if side == "teacher" else (student,)):
        x[:, columns] = NEG_INF
    actual = assert_within_rule(student, teacher, weights, backend, block_c)
    for grad in actual[1:]:
        assert torch.equal(grad[:, columns], torch.zeros_like(grad[:, columns]))
    kept = [c for c in range(CLASSES) if c not in columns]
    kept_weights = weights[..., kept, :][..., kept]
    options = dict(backend=backend, block_c=block_c, ce_weight=0.0, weights_kind=kind)
    masked = gkl_kernels.gkl_loss(student, teacher, weights=weights, **options)
    without = gkl_kernels.gkl_loss(drop_columns(student, columns), drop_columns(teacher, columns),
                                   weights=kept_weights, **options)
    assert relative_error(masked, without) <= 1e-6


@pytest.mark.parametrize("backend, block_c", BACKEND_TILES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_class_of_a_row_absent(kind, backend, block_c, generator):
    """A row with every class ``-inf``: wMSE and weight sum 0, gradient 0, no NaN."""
    student, teacher, weights = general_inputs(kind, generator)
    student[1] = NEG_INF
    teacher[1] = NEG_INF
    rows, grad_s, grad_t = rows_and_grads(package_rows(backend, block_c), student, teacher,
                                          weights, torch.float32)
    assert rows[1] == 0 and torch.isfinite(rows).all()
    assert torch.equal(grad_s[1], torch.zeros(CLASSES))
    assert torch.equal(grad_t[1], torch.zeros(CLASSES))


IGNORED = [1, 4]


@pytest.mark.parametrize("backend, block_c", BACKEND_TILES)
@pytest.mark.parametrize("fill", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("kind", KINDS)
def test_ignored_rows_hold_nan_and_inf(kind, fill, backend, block_c, generator):
    """Rows labelled ``ignore_index`` are not read: NaN / inf there change nothing, their
    gradients are exactly 0, the loss (wMSE and cross-entropy) is that of the kept rows."""
    rows = 6
    student, teacher, weights = general_inputs(kind, generator, rows=rows)
    labels = torch.randint(0, CLASSES, (rows,), generator=generator)
    labels[IGNORED] = -100
    kept = [r for r in range(rows) if r not in IGNORED]
    options = dict(backend=backend, block_c=block_c, weights_kind=kind, mse_weight=20.0,
                   ce_weight=4.0, temperature=4.0)
    poisoned_s, poisoned_t = student.clone(), teacher.clone()
    poisoned_s[IGNORED] = fill
    poisoned_t[IGNORED] = fill
    s = poisoned_s.requires_grad_()
    t = poisoned_t.requires_grad_()
    loss = gkl_kernels.gkl_loss(s, t, weights=weights, labels=labels, **options)
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    assert torch.equal(grad_s[IGNORED], torch.zeros_like(grad_s[IGNORED]))
    assert torch.equal(grad_t[IGNORED], torch.zeros_like(grad_t[IGNORED]))
    s_kept = student[kept].clone().requires_grad_()
    t_kept = teacher[kept].clone().requires_grad_()
    kept_weights = weights if kind == "shared" else weights[kept]
    expected = gkl_kernels.gkl_loss(s_kept, t_kept, weights=kept_weights, **options)
    expected_grads = torch.autograd.grad(expected, (s_kept, t_kept))
    assert relative_error(loss, expected) <= 1e-6
    for actual, wanted in zip((grad_s[kept], grad_t[kept]), expected_grads):
        assert relative_error(actual, wanted) <= 1e-6
