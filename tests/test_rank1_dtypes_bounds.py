"""Half-precision inputs against the float64 reference and PyTorch's own half-precision result;
out-of-bounds guard of the Triton kernels (inputs and outputs inside NaN padding)."""

import pytest
import torch

import gkl_kernels
from gkl_kernels import buffers
from gkl_kernels.core import kernels as core_kernels
from gkl_kernels.rank1 import kernels
from reference import gkl_loss_reference
from tests.conftest import (BACKENDS, DTYPE_PAIRS, PaddedAllocator, assert_close_rel,
                            assert_half_precision, loss_and_grads, make_inputs, oracle, padded)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["teacher", "prior", "explicit"])
@pytest.mark.parametrize("s_dtype, t_dtype", DTYPE_PAIRS,
                         ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPE_PAIRS])
def test_half_precision(s_dtype, t_dtype, source, backend, generator):
    student, teacher, weights = make_inputs(6, 100, source, generator)
    student, teacher = student.to(s_dtype), teacher.to(t_dtype)
    if source == "explicit":
        weights["weights"] = weights["weights"].to(s_dtype)
    options = dict(gamma=0.6, temperature=2.0, mse_weight=4.0, **weights)
    expected = oracle(student, teacher, **options)
    actual = loss_and_grads(gkl_kernels.gkl_loss, student, teacher, backend=backend,
                            block_c=32 if backend == "triton" else None, **options)
    own = loss_and_grads(gkl_loss_reference, student, teacher, **options)
    assert_half_precision(actual, expected, own, backend)


@pytest.mark.parametrize("source", ["teacher", "prior", "explicit"])
@pytest.mark.parametrize("needs_teacher_grad", [False, True])
def test_out_of_bounds_guard(source, needs_teacher_grad, generator, monkeypatch):
    allocator = PaddedAllocator()
    for module in (kernels, core_kernels, buffers):  # every buffer the kernels write to
        monkeypatch.setattr(module, "torch", allocator)
    student, teacher, weights = make_inputs(5, 37, source, generator)
    expected = oracle(student, teacher, gamma=0.6, **weights)
    weights = {k: padded(v) if torch.is_tensor(v) and v.dim() == 2 else v
               for k, v in weights.items()}
    s = padded(student).requires_grad_()
    t = padded(teacher).requires_grad_(needs_teacher_grad)
    loss = gkl_kernels.gkl_loss(s, t, gamma=0.6, backend="triton", block_c=16, **weights)
    loss.backward()
    assert allocator.padding_is_untouched()
    assert len(allocator.buffers) == 5 if needs_teacher_grad else 4
    assert_close_rel(loss, expected[0], 1e-5, "loss")
    assert_close_rel(s.grad, expected[1], 1e-5, "grad_student")
    if needs_teacher_grad:
        assert_close_rel(t.grad, expected[2], 1e-5, "grad_teacher")
