"""General pair weights in torch: ``opcheck`` of the pair-weight ops, ``torch.compile(fullgraph=True)``
with ``(C, C)`` and ``(B, C, C)`` weights, ``weights_kind`` when ``B == C``, and the first paper's
drop-ins (``compat.ikl_loss``, ``compat.adv_dkl_loss``) against its formulas written out in float64.
"""

import pytest
import torch
import torch.nn.functional as F

from gkl_kernels import GKLLoss, compat, functional, gkl_loss, pairwise_wmse
from gkl_kernels.core.config import SOURCE_PAIRS, STAT_ERROR, TOTAL_ERROR, RowConfig
from gkl_kernels.options import GKLOptions
from gkl_kernels.pairs.op import pair_rows
from gkl_kernels.row_ops import RowInputs, loss_and_statistics, rank1_row_stats
from gkl_kernels.testing.dispatch import DispatchCounter
from gkl_kernels.testing.traffic import TritonTrafficCounter
from tests.conftest import assert_close_rel, loss_and_grads, oracle

pytestmark = pytest.mark.entry_point  # the kernels through an entry point: CI runs it once

KINDS = ("shared", "per_row")


def pair_inputs(kind, generator, batch=5, num_classes=7, dtypes=(torch.float32, torch.float32),
                weight_dtype=torch.float32):
    student = (3 * torch.randn(batch, num_classes, generator=generator)).to(dtypes[0])
    teacher = (3 * torch.randn(batch, num_classes, generator=generator)).to(dtypes[1])
    shape = (num_classes, num_classes) if kind == "shared" else (batch, num_classes, num_classes)
    return student, teacher, torch.rand(shape, generator=generator).to(weight_dtype)


# --------------------------------------------------------------------------- (a) opcheck

MIXED = dict(dtypes=(torch.bfloat16, torch.float16), weight_dtype=torch.bfloat16)
OP_CASES = [  # (use_triton, symmetric, input options, need_ds, need_dt)
    pytest.param(False, True, {}, True, True, id="torch_path-gkl"),
    pytest.param(False, False, {}, False, True, id="torch_path-dkl"),
    pytest.param(False, True, MIXED, True, False, id="torch_path-bf16_f16-ds_only"),
    pytest.param(True, True, {}, True, True, id="triton_interpreter-gkl"),
]


def assert_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("use_triton, symmetric, inputs, need_ds, need_dt", OP_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_pair_rows(kind, use_triton, symmetric, inputs, need_ds, need_dt, generator):
    student, teacher, weights = pair_inputs(kind, generator, **inputs)
    args = (student.requires_grad_(), teacher.requires_grad_(), weights, kind == "per_row",
            symmetric, use_triton, 0, "ieee")
    assert_opcheck(torch.ops.gkl_kernels.pair_rows.default, args)
    g = pair_rows(*args)[2].detach()  # the torch path's kept half-gradient (empty on Triton)
    grad_wmse = torch.rand(student.shape[0], generator=generator)
    args = (grad_wmse, student.detach(), teacher.detach(), weights, g, kind == "per_row",
            need_ds, need_dt, use_triton, 0, "ieee")
    assert_opcheck(torch.ops.gkl_kernels.pair_rows_backward.default, args)


# --------------------------------------------------------------------------- (b) torch.compile


@pytest.mark.parametrize("backend, compiler", [("torch", "inductor"), ("triton", "aot_eager")])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_loss_matches_eager(kind, backend, compiler, generator):
    """The adversarial-training shape: both logits need gradients; loss and backward compiled
    together (``fullgraph=True``, Dynamo's ``trace_autograd_ops``)."""
    student, teacher, weights = pair_inputs(kind, generator, batch=6, num_classes=12)
    options = dict(mse_weight=20.0, ce_weight=4.0, temperature=4.0, backend=backend)

    def loss_and_grad(s, t):
        loss = gkl_loss(s, t, weights=weights, **options)
        loss.backward()
        return loss.detach()

    def run(fn):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        return fn(s, t), s.grad, t.grad

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = run(torch.compile(loss_and_grad, fullgraph=True, backend=compiler))
    eager = run(loss_and_grad)
    for name, c, e in zip(("loss", "grad_student", "grad_teacher"), compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=name)
    assert_close_rel(eager[0], oracle(student, teacher, weights=weights, weights_kind=kind,
                                      mse_weight=20.0, ce_weight=4.0, temperature=4.0)[0],
                     2e-5, "loss")


# --------------------------------------------------------------------------- (c) weights_kind


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_weights_kind_settles_b_equals_c(backend, generator):
    """One ``(C, C)`` tensor with ``B == C``: as a factor it weighs ``v_j v_k`` per row, as a
    shared matrix ``M[j, k]``; each equals the reference of that reading, and they differ."""
    student, teacher, weights = pair_inputs("shared", generator, batch=7, num_classes=7)
    results = {}
    for kind in ("factor", "shared"):
        results[kind] = loss_and_grads(gkl_loss, student, teacher, weights=weights,
                                       weights_kind=kind, backend=backend)
        expected = oracle(student, teacher, weights=weights, weights_kind=kind)
        for name, a, e in zip(("loss", "grad_student", "grad_teacher"), results[kind], expected):
            assert_close_rel(a, e, 2e-5, f"{kind} {name}")
    assert abs(results["factor"][0] - results["shared"][0]) > 1e-3 * abs(results["shared"][0])
    module = GKLLoss(backend=backend)(student, teacher, weights=weights, weights_kind="shared")
    assert_close_rel(module, results["shared"][0], 1e-6, "GKLLoss")
    rows = pairwise_wmse(student, teacher, weights, weights_kind="shared", reduction="none",
                         backend=backend)
    assert rows.shape == (7,)


# --------------------------------------------------------------------------- (d) the first paper


def differences(x):
    return x[:, :, None] - x[:, None, :]


def first_paper_loss(student, teacher, pair_weights, temperature, alpha, beta):
    """The first paper's code, written out: ``beta * 0.25 * sum(P (Dt - Ds)^2) / B + alpha * CE``
    with the teacher's probabilities constant; float64 loss and gradients."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    wmse = 0.25 * (pair_weights.double() * (differences(t) - differences(s)) ** 2).sum()
    wmse = wmse / s.shape[0]
    p_teacher = torch.softmax(t.detach() / temperature, dim=1)
    ce = -(p_teacher * torch.log_softmax(s / temperature, dim=1)).sum(1).mean()
    loss = beta * wmse + alpha * ce
    return (loss.detach(), *torch.autograd.grad(loss, (s, t)))


def outer(v):
    return v[:, :, None] * v[:, None, :]


# (temperature, alpha = the code's CE weight, beta = the code's wMSE weight, GI, T2): the first
# paper's configurations (ImageNet ResNet34 -> ResNet18 with the class prior; CIFAR-100 with the
# teacher's softmax at T2 = 100, the code's default)
IKL_SETTINGS = {"imagenet_kd": (1.0, 1.0, 0.5, True, 1.0),
                "cifar100_kd": (4.0, 1.0, 4.0, False, 100.0)}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("setting", IKL_SETTINGS)
def test_ikl_loss_matches_first_paper(setting, backend, generator, monkeypatch):
    temperature, alpha, beta, gi, t2 = IKL_SETTINGS[setting]
    monkeypatch.setattr(functional.check, "triton_interpreter_active", lambda: backend == "triton")
    batch, num_classes = 6, 10
    student = 3 * torch.randn(batch, num_classes, generator=generator)
    teacher = 3 * torch.randn(batch, num_classes, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    prior = torch.softmax(2 * torch.randn(num_classes, num_classes, generator=generator), dim=1)
    class_prior = F.one_hot(labels, num_classes).float() @ prior  # the authors' CLASS_PRIOR
    # rows scaled off 1, so that the code's N = B differs from GKL's N = sum(w)
    class_prior = class_prior * (0.5 + torch.rand(batch, 1, generator=generator))
    v = class_prior if gi else torch.softmax(teacher.double() / t2, dim=1)
    expected = first_paper_loss(student, teacher, outer(v.double()), temperature, alpha, beta)
    actual = loss_and_grads(compat.ikl_loss, student, teacher, temperature=temperature,
                            alpha=alpha, beta=beta, CLASS_PRIOR=class_prior if gi else None,
                            GI=gi, T2=t2)
    for name, a, e in zip(("loss", "grad_student", "grad_teacher"), actual, expected):
        assert_close_rel(a, e, 2e-5, name)


def adversarial_weight(labels, num_classes, generator):
    """The first paper's adversarial-training weight: ``s_n = onehot(y) @ W`` for a row-normalised
    class matrix ``W``, then ``s_n s_n^T`` per row, ``(B, C, C)``."""
    matrix = torch.softmax(2 * torch.randn(num_classes, num_classes, generator=generator), dim=1)
    return outer(F.one_hot(labels, num_classes).float() @ matrix)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("weight_source", ["class_prior", "general"])
def test_adv_dkl_loss_matches_first_paper(weight_source, backend, generator, monkeypatch):
    """CIFAR adversarial training (alpha = 4, beta = 20): both logits get gradients; a rank-one
    ``weight`` still runs through the per-row (B, C, C) kernel."""
    monkeypatch.setattr(functional.check, "triton_interpreter_active", lambda: backend == "triton")
    configs = []
    row_config = GKLOptions.row_config
    monkeypatch.setattr(GKLOptions, "row_config",
                        lambda *args, **kwargs: configs.append(row_config(*args, **kwargs))
                        or configs[-1])
    batch, num_classes = 8, 10
    logits_nat = 3 * torch.randn(batch, num_classes, generator=generator)
    logits_adv = logits_nat + torch.randn(batch, num_classes, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    if weight_source == "class_prior":
        weight = adversarial_weight(labels, num_classes, generator)
    else:
        weight = torch.rand(batch, num_classes, num_classes, generator=generator)
    nat = logits_nat.clone().requires_grad_()
    adv = logits_adv.clone().requires_grad_()
    loss = compat.adv_dkl_loss(nat, adv, weight, 4.0, 20.0)
    actual = (loss.detach(), *torch.autograd.grad(loss, (adv, nat)))
    expected = first_paper_loss(logits_adv, logits_nat, weight, 1.0, 4.0, 20.0)
    for name, a, e in zip(("loss", "grad_adv", "grad_nat"), actual, expected):
        assert_close_rel(a, e, 2e-5, name)
    # the per-row pair weights, no silent rank-one detection
    assert [(config.source, config.per_row) for config in configs] == [(SOURCE_PAIRS, True)]


# --------------------------------------------------------------------------- launches, host syncs


@pytest.mark.newest_triton
@pytest.mark.parametrize("with_ignored", [False, True], ids=["all_rows", "ignore_index"])
@pytest.mark.parametrize("kind", ["shared", "per_row"])
def test_triton_step_launches_and_host_syncs(kind, with_ignored, generator, monkeypatch):
    """Default options, as on a GPU (where the kernels check the labels and weights): 2 launches
    forward (the pair kernel, the finishing kernel), 1 backward, no host synchronisation: the
    rank-one path's budget."""
    monkeypatch.setattr(functional, "kernels_check_values", lambda use_triton, device: use_triton)
    student, teacher, weights = pair_inputs(kind, generator)
    labels = None
    if with_ignored:
        labels = torch.randint(0, student.shape[1], (student.shape[0],), generator=generator)
        labels[1] = -100
    student.requires_grad_()
    grad = torch.ones(())  # autograd's own seed, made outside the count
    with DispatchCounter() as ops, TritonTrafficCounter() as kernels:
        loss = gkl_loss(student, teacher, weights=weights, weights_kind=kind, labels=labels,
                        backend="triton")
    assert (ops.launches + kernels.launches, ops.host_syncs) == (2, 0)
    with DispatchCounter() as ops, TritonTrafficCounter() as kernels:
        loss.backward(grad)
    assert (ops.launches + kernels.launches, ops.host_syncs) == (1, 0)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
@pytest.mark.parametrize("kind", ["shared", "per_row"])
def test_pair_kernels_flag_invalid_weights(kind, bad, generator):
    """On a GPU the pair kernels check the weights they read (the finishing kernel's device
    assertion then fails), so the weights are not read a second time: their error flags in the
    statistics and the totals (the interpreter runs no device assertion)."""
    student, teacher, weights = pair_inputs(kind, generator, batch=4, num_classes=20)
    labels = torch.tensor([3, -100, 5, 7])
    if kind == "shared":
        weights[17, 2] = bad
        flagged = [2.0] * 4  # M is every row's: each row tile's programs read all of it
    else:
        weights[2, 17, 2] = bad
        flagged = [0.0, 0.0, 2.0, 0.0]
    config = RowConfig(source=SOURCE_PAIRS, per_row=kind == "per_row", has_labels=True,
                       use_triton=True, block_c=16)
    _, state = loss_and_statistics(RowInputs(student, teacher, weights, labels), config)
    assert state.totals[TOTAL_ERROR] == 2.0
    stats = rank1_row_stats(student, teacher, weights, labels, config.floats, config.ints)
    assert stats[:, STAT_ERROR].tolist() == flagged
