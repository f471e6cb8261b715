"""The Triton kernels compiled on CUDA (run by ``tools/gpu_check.sh`` on a machine with a GPU; the
CPU suite in ``tests/`` runs them under the interpreter): the adversarial accuracy rule against
the float64 oracle, the race-prone per-row ``(B, C, C)`` backward run twice, no host
synchronisation in a default step, and a bad label caught by the device assertion."""

import os
import subprocess
import sys

import pytest
import torch

from gkl_kernels import gkl_loss
from gkl_kernels.testing.dispatch import DispatchCounter
from tests import conftest
from tests.adversarial_cases import assert_within_rule, masked_oracle, plain_float32
from tests.conftest import make_inputs, oracle, relative_error

generator = conftest.generator  # the fixture (tests/conftest.py does not apply to tools/)

CUDA = torch.device("cuda")
SOURCES = ("teacher", "prior", "explicit")


def _on_cuda(kwargs):
    return {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in kwargs.items()}


def _cuda_loss_and_grads(student, teacher, **options):
    s = student.detach().to(CUDA).requires_grad_()
    t = teacher.detach().to(CUDA).requires_grad_()
    loss = gkl_loss(s, t, backend="triton", **_on_cuda(options))
    grads = torch.autograd.grad(loss, (s, t))
    return tuple(x.detach().cpu() for x in (loss, *grads))


@pytest.mark.parametrize("block_c", [None, 16])
@pytest.mark.parametrize("mask", [None, -1e9, torch.finfo(torch.float32).min, float("-inf")])
@pytest.mark.parametrize("num_classes", [10, 1000, 32000])
@pytest.mark.parametrize("source", SOURCES)
def test_rule_on_cuda(source, num_classes, mask, block_c, generator):
    student, teacher, kwargs = make_inputs(8, num_classes, source, generator)
    if mask is not None:
        for column in (0, num_classes // 2, num_classes - 1):
            student[:, column] = teacher[:, column] = mask
    options = dict(kwargs, gamma=0.6, temperature=2.0, mse_weight=0.5)
    actual = _cuda_loss_and_grads(student, teacher, block_c=block_c, **options)
    assert_within_rule(actual, masked_oracle(student, teacher, **options),
                       plain_float32(student, teacher, **options), student.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(dtype, generator):
    student, teacher, kwargs = make_inputs(16, 1000, "teacher", generator, dtype=dtype)
    actual = _cuda_loss_and_grads(student, teacher)
    assert_within_rule(actual, masked_oracle(student, teacher), plain_float32(student, teacher),
                       dtype)


@pytest.mark.parametrize("kind", ["shared", "per_row"])
def test_pair_weights_are_deterministic_and_exact(kind, generator):
    batch, num_classes = 64, 100
    student, teacher, _ = make_inputs(batch, num_classes, "teacher", generator)
    shape = (num_classes, num_classes) if kind == "shared" else (batch, num_classes, num_classes)
    weights = torch.rand(shape, generator=generator)
    runs = [_cuda_loss_and_grads(student, teacher, weights=weights, weights_kind=kind)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "two runs differ: a race"
    expected = oracle(student, teacher, weights=weights, weights_kind=kind)
    for actual, wanted in zip(runs[0], expected):
        assert relative_error(actual, wanted) <= 1e-5


@pytest.mark.parametrize("source", SOURCES)
def test_default_step_has_no_host_sync(source, generator):
    student, teacher, kwargs = make_inputs(256, 1000, source, generator)
    s = student.to(CUDA).requires_grad_()
    kwargs = _on_cuda(kwargs)
    with DispatchCounter() as counter:
        gkl_loss(s, teacher.to(CUDA), **kwargs).backward()
    assert counter.host_syncs == 0


def test_bad_label_fails_the_device_assertion():
    """In a subprocess: a failed device assertion leaves the CUDA context unusable."""
    code = ("import torch; from gkl_kernels import gkl_loss;"
            "s = torch.randn(4, 10, device='cuda'); p = torch.full((10, 10), 0.1, device='cuda');"
            "y = torch.tensor([0, 1, 12, 3], device='cuda');"
            "gkl_loss(s, s, labels=y, class_prior=p).item()")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode != 0
    assert "labels must lie in [0, C)" in done.stdout + done.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("read", [0, 70, 300])
def test_counted_products_on_cuda(dtype, read, generator):
    """The fused losses' counted products compiled: logits over the rows read (the others 0) and
    ``dW`` summed over them, against float64."""
    from gkl_kernels.core.counted_matmul import counted_matmul

    rows, hidden_size, vocabulary = 256, 192, 1000
    hidden = torch.randn(rows, hidden_size, generator=generator).to(dtype)
    weight = torch.randn(vocabulary, hidden_size, generator=generator).to(dtype)
    grad = torch.randn(rows, vocabulary, generator=generator).to(dtype)
    count = torch.tensor(read, device=CUDA)
    logits = counted_matmul(hidden.to(CUDA), weight.to(CUDA).t(),
                            torch.full((rows, vocabulary), float("nan"), device=CUDA), count, 0,
                            "rows").cpu()
    grad_weight = counted_matmul(grad.to(CUDA).t(), hidden.to(CUDA),
                                 torch.ones(vocabulary, hidden_size, device=CUDA), count, 0,
                                 "reduction", accumulate=True).cpu()
    kept = min(read, rows)
    assert torch.equal(logits[kept:], torch.zeros_like(logits[kept:]))
    expected = hidden[:kept].double() @ weight.double().t()
    if kept:
        assert relative_error(logits[:kept], expected) <= 1e-6
    expected = 1 + grad[:kept].double().t() @ hidden[:kept].double()
    assert relative_error(grad_weight, expected) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_rows_are_skipped_on_cuda(dtype, generator):
    """The trainer loss with half the tokens masked: no host synchronisation, and the loss and
    gradients of the kept tokens alone."""
    from gkl_kernels import FusedLinearDistillationLoss

    tokens, hidden_size, vocabulary = 512, 256, 4000
    student = [torch.randn(tokens, hidden_size, generator=generator),
               torch.randn(vocabulary, hidden_size, generator=generator) / 8]
    teacher = [torch.randn(tokens, hidden_size, generator=generator),
               torch.randn(vocabulary, hidden_size, generator=generator) / 8]
    labels = torch.randint(0, vocabulary, (tokens,), generator=generator)
    kept = torch.rand(tokens, generator=generator) < 0.5
    labels[~kept] = -100
    loss_fn = FusedLinearDistillationLoss(chunk_size=128, check_values=False)

    def run(rows):
        leaves = [x[rows].to(CUDA, dtype).requires_grad_() if i == 0 else
                  x.to(CUDA, dtype).requires_grad_() for i, x in enumerate(student)]
        with DispatchCounter() as counter:
            loss = loss_fn(leaves[0], leaves[1], teacher[0][rows].to(CUDA, dtype),
                           teacher[1].to(CUDA, dtype), labels[rows].to(CUDA))
            loss.backward()
        return counter.host_syncs, [x.detach().float().cpu() for x in
                                    (loss, leaves[0].grad, leaves[1].grad)]

    syncs, (loss, grad_hidden, grad_weight) = run(slice(None))
    assert syncs == 0
    _, (want, want_hidden, want_weight) = run(kept)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(loss, want) <= tolerance
    assert relative_error(grad_hidden[kept], want_hidden) <= tolerance
    assert relative_error(grad_weight, want_weight) <= tolerance
    assert torch.equal(grad_hidden[~kept], torch.zeros_like(grad_hidden[~kept]))
