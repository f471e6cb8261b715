"""Test set-up: Triton's CPU interpreter (set before triton is imported), and the float64 oracle."""

import importlib.util
import os
import pathlib
import zlib

# every Triton test runs in the interpreter (the bench's tests, test_bench_*.py, count the Triton
# path's launches and traffic there), except tools/gpu_tests.py (compiled, on CUDA), which
# tools/gpu_check.sh runs with GKL_COMPILED_TRITON=1
if os.environ.get("GKL_COMPILED_TRITON") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from reference import gkl_loss_reference  # noqa: E402

BACKENDS = ("triton", "torch")


def pytest_collection_modifyitems(items):
    """A test parametrized with ``backend="torch"`` runs no Triton code: marked ``torch_only``
    (CI runs it once, with the newest triton)."""
    for item in items:
        if getattr(item, "callspec", None) and item.callspec.params.get("backend") == "torch":
            item.add_marker(pytest.mark.torch_only)

# docs/SPEC.md's paper settings (mse_weight = the code's beta, ce_weight = alpha), plus plain KL's.
PAPER_SETTINGS = {
    "default": dict(mse_weight=1.0, ce_weight=1.0, gamma=1.0, temperature=1.0,
                    weight_temperature=1.0),
    "imagenet_kd": dict(mse_weight=0.5, ce_weight=1.0, gamma=0.6, temperature=1.0,
                        weight_temperature=1.0),
    "cifar100_kd": dict(mse_weight=16.0, ce_weight=1.0, gamma=0.05, temperature=4.0,
                        weight_temperature=4.0),
    "cifar_adv": dict(mse_weight=20.0, ce_weight=4.0, gamma=0.4, temperature=4.0,
                      weight_temperature=1.0),
}


def make_inputs(batch, num_classes, source, generator, *, dtype=torch.float32, scale=3.0):
    """Fresh random logits ``(B, C)`` and the keyword arguments of one weight source: ``"teacher"``
    (none), ``"prior"`` (labels and a row-stochastic ``(C, C)`` prior with some zeros) or
    ``"explicit"`` (a ``(B, C)`` factor with some zeros, named by ``weights_kind``)."""
    student = (scale * torch.randn(batch, num_classes, generator=generator)).to(dtype)
    teacher = (scale * torch.randn(batch, num_classes, generator=generator)).to(dtype)
    kwargs = {}
    if source == "prior":
        prior = torch.rand(num_classes, num_classes, generator=generator)
        prior = prior * (torch.rand(num_classes, num_classes, generator=generator) > 0.2)
        prior = prior + torch.eye(num_classes)
        kwargs["class_prior"] = prior / prior.sum(1, keepdim=True)
        kwargs["labels"] = torch.randint(0, num_classes, (batch,), generator=generator)
    elif source == "explicit":
        weights = torch.rand(batch, num_classes, generator=generator)
        kwargs["weights"] = weights * (torch.rand(batch, num_classes, generator=generator) > 0.2)
        kwargs["weights_kind"] = "factor"  # (B, C) also when B == C
    return student, teacher, kwargs


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

DTYPE_PAIRS = [  # (student, teacher)
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]


def assert_half_precision(actual, expected, own, backend):
    """``actual`` = (loss, grad_student, grad_teacher) within ``HALF_TOLERANCE`` of ``expected``
    (float64) for the gradients' dtypes, and a loss no worse than PyTorch's ``own`` computation in
    those dtypes plus ``LOSS_MARGIN``."""
    for index, name in enumerate(("loss", "grad_student", "grad_teacher")):
        dtype = actual[2 if index == 0 else index].dtype
        bound = HALF_TOLERANCE[dtype]["loss" if index == 0 else "grad"]
        if index and dtype == torch.bfloat16 and backend == "triton":
            bound = INTERPRETER_BF16_GRAD
        err = relative_error(actual[index], expected[index])
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound:.1e}"
        if index == 0:
            own_err = relative_error(own[index], expected[index])
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

    def zeros(self, *shape, dtype, device):
        return self.empty(*shape, dtype=dtype, device=device).zero_()

    def padding_is_untouched(self):
        return all(torch.isnan(b[:self.PAD]).all() and torch.isnan(b[self.PAD + n:]).all()
                   for b, n in self.buffers)


def padded(x, pads=(2, 3, 1)):
    """``x`` placed inside a NaN-filled buffer: a strided view with ``pads[i]`` elements of padding
    on both sides of dimension ``i``."""
    pads = pads[:x.dim()]
    buffer = torch.full([n + 2 * p for n, p in zip(x.shape, pads)], float("nan"), dtype=x.dtype)
    view = buffer[tuple(slice(p, p + n) for n, p in zip(x.shape, pads))]
    view.copy_(x)
    return view


def to_float64(kwargs):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in kwargs.items()}


def oracle(student, teacher, *, pairwise=True, **options):
    """Loss and gradients (student, teacher) of the float64 reference on the same inputs."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = gkl_loss_reference(s, t, pairwise=pairwise, **to_float64(options))
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    return loss.detach(), grad_s, grad_t


def loss_and_grads(fn, student, teacher, **options):
    """``fn(s, t, **options)`` and its gradients w.r.t. fresh leaf copies of student and teacher."""
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_()
    loss = fn(s, t, **options)
    grad_s, grad_t = torch.autograd.grad(loss, (s, t))
    return loss.detach(), grad_s, grad_t


def relative_error(actual, expected):
    """``max |actual - expected| / max |expected|`` (scale-relative), in float64, detached."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close_rel(actual, expected, rtol, name):
    """``relative_error(actual, expected) <= rtol``."""
    err = relative_error(actual, expected)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"


@pytest.fixture
def generator(request):
    """A torch.Generator seeded from the test's id: every test draws its own, reproducible inputs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def load_example(filename):
    """An example script of ``examples/`` as a module, loaded from its path (``examples`` is
    no package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / filename
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
