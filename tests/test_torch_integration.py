"""torch integration: ``opcheck`` of the custom ops, ``torch.compile(fullgraph=True)`` of a training
step, the ``GKLLoss`` module, and ``compat.dkl_loss`` against the float64 reference with the
authors' argument meaning."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gkl_kernels import GKLLoss, compat, gkl_loss, validation
from gkl_kernels.core.config import SOURCE_EXPLICIT, SOURCE_PRIOR, SOURCE_TEACHER, RowConfig
from gkl_kernels.row_ops import RowInputs, loss_and_statistics, rank1_row_stats
from reference import gkl_loss_reference
from tests.conftest import assert_close_rel, loss_and_grads

pytestmark = pytest.mark.entry_point  # the kernels through an entry point: CI runs it once


# --------------------------------------------------------------------------- (a) opcheck

F32, MIXED = (torch.float32, torch.float32), (torch.bfloat16, torch.float16)
SOURCES = {"teacher": SOURCE_TEACHER, "prior": SOURCE_PRIOR, "explicit": SOURCE_EXPLICIT}


def op_inputs(source, generator, batch=5, num_classes=7, dtypes=F32):
    student = (3 * torch.randn(batch, num_classes, generator=generator)).to(dtypes[0])
    teacher = (3 * torch.randn(batch, num_classes, generator=generator)).to(dtypes[1])
    factor = labels = None
    if source == "prior":
        factor = torch.rand(num_classes, num_classes, generator=generator)
        factor = factor / factor.sum(1, keepdim=True)
        labels = torch.randint(0, num_classes, (batch,), generator=generator, dtype=torch.int64)
    elif source == "explicit":
        factor = torch.rand(batch, num_classes, generator=generator)
    return student, teacher, factor, labels


OP_VARIANTS = [  # (ce_weight, symmetric, (student, teacher) dtypes, need_ds, need_dt, labels)
    pytest.param(1.0, True, F32, True, True, False, id="gkl"),
    pytest.param(1.0, False, F32, False, True, True, id="dkl-dt_only-ignore"),
    pytest.param(0.0, True, F32, True, False, False, id="no_ce-ds_only"),
    pytest.param(1.0, True, MIXED, True, True, True, id="gkl_bf16_f16-ignore"),
]
# the interpreter launch is slow: one variant per source
LAUNCH_VARIANTS = [pytest.param(False, variant, id=f"torch_path-{variant.id}")
                   for variant in OP_VARIANTS] + [
    pytest.param(True, OP_VARIANTS[0], id="triton_interpreter-gkl")]


def assert_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


def op_case(source, use_triton, variant, generator):
    """Inputs and ``RowConfig`` of one variant; ignored rows (label -100) when it has labels."""
    ce_weight, symmetric, dtypes, _, _, ignore = variant.values
    student, teacher, factor, labels = op_inputs(source, generator, dtypes=dtypes)
    if ignore:
        labels = torch.randint(0, student.shape[1], (student.shape[0],), generator=generator)
        labels[1] = -100
    config = RowConfig(source=SOURCES[source], gamma=0.6, temperature=4.0,
                       weight_temperature=2.0, ce_weight=ce_weight, symmetric=symmetric,
                       has_labels=labels is not None, use_triton=use_triton)
    return student, teacher, factor, labels, config


@pytest.mark.parametrize("use_triton, variant", LAUNCH_VARIANTS)
@pytest.mark.parametrize("source", SOURCES)
def test_opcheck_rank1_stats_and_finish(source, use_triton, variant, generator):
    student, teacher, factor, labels, config = op_case(source, use_triton, variant, generator)
    assert_opcheck(torch.ops.gkl_kernels.rank1_row_stats.default,
                   (student, teacher, factor, labels, config.floats, config.ints))
    stats = rank1_row_stats(student, teacher, factor, labels, config.floats, config.ints)
    assert_opcheck(torch.ops.gkl_kernels.rank1_finish.default,
                   (stats, config.floats, config.ints))


@pytest.mark.parametrize("use_triton, variant", LAUNCH_VARIANTS)
@pytest.mark.parametrize("source", SOURCES)
def test_opcheck_rank1_loss_backward(source, use_triton, variant, generator):
    need_ds, need_dt = variant.values[3:5]
    student, teacher, factor, labels, config = op_case(source, use_triton, variant, generator)
    _, state = loss_and_statistics(RowInputs(student, teacher, factor, labels), config, True)
    grad_loss = torch.rand((), generator=generator)
    directions = [stats.new_empty(0) if d is None else d
                  for stats, d in ((state.stats, state.softmax_difference),
                                   (state.stats, state.weighted_deviation))]
    args = (grad_loss, *state.inputs, state.stats, state.totals, *directions,
            config.floats, config.ints, need_ds, need_dt)
    assert_opcheck(torch.ops.gkl_kernels.rank1_loss_backward.default, args)


# --------------------------------------------------------------------------- (b) torch.compile

DIM, CLASSES, ROWS, LR = 5, 12, 8, 0.5


def make_model(generator):
    model = torch.nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        model.weight.copy_(torch.randn(CLASSES, DIM, generator=generator))
        model.bias.copy_(torch.randn(CLASSES, generator=generator))
    return model


def make_step(model, backend, **options):
    """A training step: forward, ``gkl_loss``, ``backward`` and an SGD update, in one function."""
    def step(x, teacher, labels, class_prior):
        loss = gkl_loss(model(x), teacher, labels=labels, class_prior=class_prior,
                        backend=backend, **options)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(LR * p.grad)
        return loss.detach()
    return step


def run_steps(step, model, batches):
    """Losses and, per step, the parameter gradients and the parameters after the update."""
    history = []
    for batch in batches:
        for p in model.parameters():
            p.grad = None
        loss = step(*batch)
        history.append((loss, [p.grad.clone() for p in model.parameters()],
                        [p.detach().clone() for p in model.parameters()]))
    return history


def compile_case(source, backend, compiler):
    return pytest.param(source, backend, compiler, id=f"{compiler}-{backend}-{source}")


@pytest.mark.parametrize("source, backend, compiler", [  # each backend meets each weight source
    compile_case("teacher", "torch", "aot_eager"), compile_case("prior", "triton", "aot_eager"),
    compile_case("prior", "torch", "inductor"), compile_case("teacher", "triton", "inductor")])
def test_compiled_training_step_matches_eager(source, backend, compiler, generator):
    """``torch.compile(step, fullgraph=True)`` with the backward inside the graph (Dynamo's
    ``trace_autograd_ops``): two steps give the eager losses, gradients and parameters."""
    model = make_model(generator)
    eager_model = copy.deepcopy(model)
    options = dict(gamma=0.4, temperature=4.0, weight_temperature=2.0, mse_weight=20.0,
                   ce_weight=4.0)
    prior = torch.rand(CLASSES, CLASSES, generator=generator)
    prior = prior / prior.sum(1, keepdim=True)
    batches = [(torch.randn(ROWS, DIM, generator=generator),
                3 * torch.randn(ROWS, CLASSES, generator=generator),
                torch.randint(0, CLASSES, (ROWS,), generator=generator) if source == "prior"
                else None,
                prior if source == "prior" else None) for _ in range(2)]

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(make_step(model, backend, **options), fullgraph=True,
                                 backend=compiler)
        got = run_steps(compiled, model, batches)
    expected = run_steps(make_step(eager_model, backend, **options), eager_model, batches)

    for i, ((loss, grads, params), (e_loss, e_grads, e_params)) in enumerate(zip(got, expected)):
        torch.testing.assert_close(loss, e_loss, rtol=1e-5, atol=1e-6, msg=f"loss, step {i}")
        for g, e in zip(grads, e_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=f"grad, step {i}")
        for p, e in zip(params, e_params):
            torch.testing.assert_close(p, e, rtol=1e-4, atol=1e-5, msg=f"param, step {i}")
    # the compiled SGD update did move the parameters between the two steps
    assert (got[1][2][0] - got[0][2][0]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_compiled_row_losses_match_eager(reduction, backend, generator):
    """Per-row losses (``reduction="none"``, ``"sum"``) compiled with ``fullgraph=True``
    (aot_eager: through the custom ops) give eager's values and gradients (there: their bodies,
    called directly)."""
    student = 3 * torch.randn(ROWS, CLASSES, generator=generator)
    teacher = 3 * torch.randn(ROWS, CLASSES, generator=generator)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    prior = torch.rand(CLASSES, CLASSES, generator=generator)

    def loss_fn(s, t):
        return gkl_loss(s, t, labels=labels, class_prior=prior, gamma=0.5, temperature=2.0,
                        reduction=reduction, backend=backend)

    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(loss_fn, fullgraph=True, backend="aot_eager"), loss_fn):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        loss = fn(s, t)
        weights = torch.arange(1.0, loss.numel() + 1).reshape(loss.shape)
        results.append((loss.detach(), *torch.autograd.grad((loss * weights).sum(), (s, t))))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert results[0][1].abs().max() > 0 and results[0][2].abs().max() > 0


@pytest.mark.parametrize("backend", [pytest.param("torch"),
                                     pytest.param("triton")])
@pytest.mark.parametrize("symmetric", [True, False], ids=["gkl", "dkl"])
def test_compiled_loss_both_sides_need_grad(symmetric, backend, generator):
    """The adversarial-training case: only the loss is compiled (``fullgraph=True``, aot_eager),
    student and teacher both need gradients; a ``GKLLoss`` module inside the compiled function."""
    criterion = GKLLoss(gamma=0.2, temperature=4.0, mse_weight=20.0, ce_weight=4.0,
                        symmetric=symmetric, backend=backend)
    student = 3 * torch.randn(ROWS, CLASSES, generator=generator)
    teacher = 3 * torch.randn(ROWS, CLASSES, generator=generator)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    prior = torch.rand(CLASSES, CLASSES, generator=generator)
    prior = prior / prior.sum(1, keepdim=True)

    def loss_fn(s, t, y, p):
        return criterion(s, t, labels=y, class_prior=p)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss_fn):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        loss = fn(s, t, labels, prior)
        results.append((loss.detach(), *torch.autograd.grad(loss, (s, t))))
    for name, got, expected in zip(("loss", "grad_student", "grad_teacher"), *results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert results[1][2].abs().max() > 0  # the teacher does receive the wMSE gradient


# --------------------------------------------------------------------------- (c) GKLLoss

NON_DEFAULT = dict(gamma=0.6, temperature=4.0, weight_temperature=2.0, mse_weight=16.0,
                   ce_weight=0.5, normalize="batch", symmetric=False)


def weight_source(source, generator, batch, num_classes):
    if source == "prior":
        prior = torch.rand(num_classes, num_classes, generator=generator)
        return dict(labels=torch.randint(0, num_classes, (batch,), generator=generator),
                    class_prior=prior / prior.sum(1, keepdim=True))
    if source == "explicit":
        return dict(weights=torch.rand(batch, num_classes, generator=generator))
    return {}


@pytest.mark.parametrize("backend", [pytest.param("triton"), "torch"])
@pytest.mark.parametrize("source", ["teacher", "prior", "explicit"])
def test_module_equals_functional(source, backend, generator):
    student = 3 * torch.randn(6, 10, generator=generator)
    teacher = 3 * torch.randn(6, 10, generator=generator)
    tensors = weight_source(source, generator, 6, 10)
    module = GKLLoss(backend=backend, **NON_DEFAULT)
    got = loss_and_grads(module, student, teacher, **tensors)
    expected = loss_and_grads(gkl_loss, student, teacher, backend=backend, **tensors,
                              **NON_DEFAULT)
    for name, g, e in zip(("loss", "grad_student", "grad_teacher"), got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("option", NON_DEFAULT)
def test_module_forwards_each_option(option, generator):
    """Each non-default option changes the module's loss or gradients (so it is passed on).
    The base has gamma != 1: with gamma = 1, T2 = 1 every row's weights sum to 1 and
    normalize="weights" equals "batch"."""
    student = 3 * torch.randn(6, 10, generator=generator)
    teacher = 3 * torch.randn(6, 10, generator=generator)
    base = dict(backend="torch", gamma=0.3)
    options = dict(base, **{option: NON_DEFAULT[option]})
    default = loss_and_grads(GKLLoss(**base), student, teacher)
    changed = loss_and_grads(GKLLoss(**options), student, teacher)
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(default, changed))
    reference = loss_and_grads(gkl_loss, student, teacher, **options)
    for g, e in zip(changed, reference):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_module_repr_and_state():
    module = GKLLoss(gamma=0.6, temperature=4.0, normalize="batch", symmetric=False,
                     backend="torch")
    text = repr(module)
    assert text.startswith("GKLLoss(")
    for part in ("gamma=0.6", "temperature=4.0", "weight_temperature=1.0", "mse_weight=1.0",
                 "ce_weight=1.0", "normalize='batch'", "symmetric=False", "backend='torch'",
                 "check_values=True"):
        assert part in text, f"{part!r} missing from {text!r}"
    assert list(module.parameters()) == [] and module.state_dict() == {}


# --------------------------------------------------------------------------- (d) compat.dkl_loss

# (temperature, alpha = the code's CE weight, beta = the code's wMSE weight, gamma, T2)
AUTHORS_SETTINGS = {
    "imagenet_kd": (1.0, 1.0, 0.5, 0.6, 1.0),
    "cifar100_kd": (4.0, 1.0, 16.0, 0.05, 4.0),
    "cifar_adv": (4.0, 4.0, 20.0, 0.4, 1.0),
}


@pytest.fixture(params=[pytest.param(True, id="triton"),
                        pytest.param(False, id="torch")])
def dkl_backend(request, monkeypatch):
    """``dkl_loss`` has no backend argument: pick it through "auto" and the interpreter check."""
    monkeypatch.setattr(validation, "triton_interpreter_active", lambda: request.param)
    return request.param


def authors_inputs(generator, batch=6, num_classes=10):
    student = 3 * torch.randn(batch, num_classes, generator=generator)
    teacher = 3 * torch.randn(batch, num_classes, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    # P: row c is the mean teacher softmax over class-c samples (rows sum to 1)
    prior = torch.softmax(2 * torch.randn(num_classes, num_classes, generator=generator), dim=1)
    per_row = F.one_hot(labels, num_classes).float() @ prior  # the authors' CLASS_PRIOR (B, C)
    return student, teacher, labels, prior, per_row


@pytest.mark.parametrize("gi", [True, False], ids=["GI", "teacher_weights"])
@pytest.mark.parametrize("setting", AUTHORS_SETTINGS)
def test_dkl_loss_matches_reference(setting, gi, generator, dkl_backend):
    temperature, alpha, beta, gamma, t2 = AUTHORS_SETTINGS[setting]
    student, teacher, labels, prior, per_row = authors_inputs(generator)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    # positional, in the authors' order: temperature, alpha, beta, gamma, CLASS_PRIOR, GI, T2
    loss = compat.dkl_loss(s, t, temperature, alpha, beta, gamma, per_row if gi else None, gi, t2)
    got = (loss.detach(), *torch.autograd.grad(loss, (s, t)))

    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    source = dict(labels=labels, class_prior=prior.double()) if gi else {}
    ref = gkl_loss_reference(s64, t64, **source, gamma=gamma, temperature=temperature,
                             weight_temperature=t2, mse_weight=beta, ce_weight=alpha,
                             normalize="weights", symmetric=True)
    expected = (ref.detach(), *torch.autograd.grad(ref, (s64, t64)))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    for name, g, e in zip(("loss", "grad_student", "grad_teacher"), got, expected):
        assert_close_rel(g, e, 2e-5, name)


@pytest.mark.parametrize("gi", [True, False], ids=["GI", "teacher_weights"])
def test_dkl_loss_alpha_is_ce_beta_is_wmse(gi, generator, dkl_backend):
    """beta=0 leaves alpha * CE; alpha=0 leaves beta * wMSE / sum(w) / 4; swapping alpha and beta
    changes the loss."""
    student, teacher, labels, prior, per_row = authors_inputs(generator)
    temperature, gamma, t2 = 4.0, 0.5, 2.0
    class_prior = per_row if gi else None
    s64, t64 = student.double(), teacher.double()
    source = dict(labels=labels, class_prior=prior.double()) if gi else {}
    ref = dict(gamma=gamma, temperature=temperature, weight_temperature=t2, normalize="weights")

    only_ce = compat.dkl_loss(student, teacher, temperature, 3.0, 0.0, gamma, class_prior, gi, t2)
    assert_close_rel(only_ce, gkl_loss_reference(s64, t64, **source, **ref, mse_weight=0.0,
                                           ce_weight=3.0), 2e-5, "alpha * CE")
    only_mse = compat.dkl_loss(student, teacher, temperature, 0.0, 3.0, gamma, class_prior, gi,
                               t2)
    assert_close_rel(only_mse, gkl_loss_reference(s64, t64, **source, **ref, mse_weight=3.0,
                                            ce_weight=0.0), 2e-5, "beta * wMSE")
    assert abs(only_ce.item() - only_mse.item()) > 1e-3 * abs(only_ce.item())

    kw = dict(temperature=temperature, gamma=gamma, CLASS_PRIOR=class_prior, GI=gi, T2=t2)
    forward = compat.dkl_loss(student, teacher, alpha=1.0, beta=16.0, **kw)
    swapped = compat.dkl_loss(student, teacher, alpha=16.0, beta=1.0, **kw)
    assert abs(forward.item() - swapped.item()) > 1e-3 * abs(forward.item())


def test_dkl_loss_gi_uses_class_prior_not_teacher(generator, dkl_backend):
    """GI=True weighs with CLASS_PRIOR ** gamma: a different prior changes the loss, and the
    teacher-weighted loss (GI=False) differs from it."""
    student, teacher, labels, prior, per_row = authors_inputs(generator)
    args = (4.0, 1.0, 16.0, 0.5)
    with_prior = compat.dkl_loss(student, teacher, *args, CLASS_PRIOR=per_row, GI=True)
    other_prior = compat.dkl_loss(student, teacher, *args, CLASS_PRIOR=per_row.flip(1), GI=True)
    teacher_weighted = compat.dkl_loss(student, teacher, *args, CLASS_PRIOR=per_row, GI=False)
    assert abs(with_prior.item() - other_prior.item()) > 1e-3 * abs(with_prior.item())
    assert abs(with_prior.item() - teacher_weighted.item()) > 1e-3 * abs(with_prior.item())
