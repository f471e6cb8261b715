"""Half-precision inputs against the float64 reference and PyTorch's own half-precision result;
out-of-bounds guard of the Triton kernels (inputs and outputs inside NaN padding)."""

import pytest
import torch

import gkl_kernels
from gkl_kernels.rank1 import kernels
from reference import gkl_loss_reference
from tests.conftest import (BACKENDS, assert_close_rel, loss_and_grads, make_inputs, oracle,
                            relative_error)

# Loss: float32 accumulation of exactly-represented inputs. Gradients: one rounding to the
# gradient's dtype (at most 2**-8 of the value for bfloat16, 2**-11 for float16) plus float32
# error. Triton's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest), which can
# cost one whole unit, 2**-7: that bound applies to the Triton backend's bfloat16 gradients here.
HALF_TOLERANCE = {
    torch.float16: dict(loss=2e-5, grad=2.0**-10),
    torch.bfloat16: dict(loss=2e-5, grad=2.0**-8),
    torch.float32: dict(loss=1e-5, grad=1e-5),
}
INTERPRETER_BF16_GRAD = 2.0**-7
LOSS_MARGIN = 1e-6  # the loss may be no worse than PyTorch's own, in the input dtype, plus this

DTYPE_PAIRS = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]


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
    assert actual[1].dtype == s_dtype and actual[2].dtype == t_dtype
    for index, name in enumerate(("loss", "grad_student", "grad_teacher")):
        dtype = s_dtype if index == 1 else t_dtype
        bound = HALF_TOLERANCE[dtype]["loss" if index == 0 else "grad"]
        if index and dtype == torch.bfloat16 and backend == "triton":
            bound = INTERPRETER_BF16_GRAD
        err = relative_error(actual[index], expected[index])
        own_err = relative_error(own[index], expected[index])
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.1e}"
        if index == 0:
            assert err <= own_err + LOSS_MARGIN, \
                f"loss: {err:.2e} worse than PyTorch's own computation in {dtype} ({own_err:.2e})"


class PaddedAllocator:
    """Stands in for ``torch`` inside the launchers: ``empty`` returns views into buffers padded
    with NaN on both sides, which the test inspects after the launch."""

    PAD = 64

    def __init__(self):
        self.buffers = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, dtype, device):
        shape = torch.Size(shape[0] if isinstance(shape[0], (tuple, list)) else shape)
        numel = shape.numel()
        buffer = torch.full((numel + 2 * self.PAD,), float("nan"), dtype=dtype, device=device)
        self.buffers.append((buffer, numel))
        return buffer[self.PAD:self.PAD + numel].view(shape)

    def padding_is_untouched(self):
        return all(torch.isnan(b[:self.PAD]).all() and torch.isnan(b[self.PAD + n:]).all()
                   for b, n in self.buffers)


def padded(x, rows=2, cols=3):
    """``x`` placed inside a NaN-filled buffer (a strided view, rows and columns of padding)."""
    buffer = torch.full((x.shape[0] + 2 * rows, x.shape[1] + 2 * cols), float("nan"), dtype=x.dtype)
    view = buffer[rows:-rows, cols:-cols]
    view.copy_(x)
    return view


@pytest.mark.parametrize("source", ["teacher", "prior", "explicit"])
@pytest.mark.parametrize("needs_teacher_grad", [False, True])
def test_out_of_bounds_guard(source, needs_teacher_grad, generator, monkeypatch):
    allocator = PaddedAllocator()
    monkeypatch.setattr(kernels, "torch", allocator)
    student, teacher, weights = make_inputs(5, 37, source, generator)
    expected = oracle(student, teacher, gamma=0.6, **weights)
    weights = {k: padded(v) if v.dim() == 2 else v for k, v in weights.items()}
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
