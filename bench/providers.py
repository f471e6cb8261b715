"""What is timed: the forward pass of a loss (building the autograd graph, as in training), its
backward pass (``torch.autograd.grad`` of the loss with respect to the logits that need gradients:
the student, and the teacher in adversarial cases), and the two together.

Providers: the literal ``B x C x C`` reference eager and under ``torch.compile`` (both "quadratic":
memory and time grow with ``B * C^2``), the package's plain-PyTorch path, the package's Triton
kernels (timed on a GPU only: on CPU they run in Triton's interpreter, whose speed means nothing;
``bench.traffic`` counts their memory traffic instead), and ``F.kl_div`` at the same shape as the
cost of plain knowledge distillation (a different loss: no error column).
"""

import dataclasses

import torch
import torch.nn.functional as F

from gkl_kernels import gkl_loss
from reference import gkl_loss_reference

REFERENCE = "reference"
REFERENCE_COMPILED = "reference+compile"
PACKAGE = "gkl_loss[torch]"
PACKAGE_TRITON = "gkl_loss[triton]"
KL_DIV = "F.kl_div"
ORACLE = "reference float64"


@dataclasses.dataclass(frozen=True)
class Provider:
    """``build()`` returns a fresh loss function ``fn(student, teacher, **loss_kwargs)``; it is
    called once per case (so a compiled provider compiles for that case's shapes only).
    ``quadratic``: needs ``B x C x C`` tensors (skipped where they would not fit).
    ``exact``: computes the GKL loss (compared with the float64 reference). ``gpu_only``: timed
    on a GPU only. ``interpreted_counts``: its launches are counted under Triton's interpreter
    (``bench.traffic --steps``, a subprocess, on CPU tensors), not in the timing process."""

    name: str
    build: object
    quadratic: bool
    exact: bool = True
    gpu_only: bool = False
    interpreted_counts: bool = False


def _reference():
    return gkl_loss_reference


def _reference_compiled():
    """``torch.compile`` (default inductor backend) of the reference, after clearing Dynamo's
    caches, so that each case compiles for its own static shapes and no case can run into the
    recompile limit (where Dynamo would quietly fall back to eager)."""
    torch._dynamo.reset()
    return torch.compile(gkl_loss_reference)


def _package(backend):
    def build():
        def package_loss(student, teacher, **kwargs):
            return gkl_loss(student, teacher, backend=backend, **kwargs)
        return package_loss
    return build


def _kl_div():
    def kl_div_loss(student, teacher, *, temperature=1.0, **_):
        log_q = F.log_softmax(student / temperature, dim=1)
        log_p = F.log_softmax(teacher / temperature, dim=1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return kl_div_loss


PROVIDERS = (
    Provider(REFERENCE, _reference, quadratic=True),
    Provider(REFERENCE_COMPILED, _reference_compiled, quadratic=True),
    Provider(PACKAGE, _package("torch"), quadratic=False),
    Provider(PACKAGE_TRITON, _package("triton"), quadratic=False, gpu_only=True,
             interpreted_counts=True),
    Provider(KL_DIV, _kl_div, quadratic=False, exact=False),
)


def select_providers(names):
    """The providers named in ``names`` (all when ``names`` is empty), in the table's order."""
    known = {p.name for p in PROVIDERS}
    unknown = set(names) - known
    if unknown:
        raise ValueError(f"unknown providers {sorted(unknown)}; known: {sorted(known)}")
    return [p for p in PROVIDERS if not names or p.name in names]


@dataclasses.dataclass(frozen=True)
class Passes:
    """The timed passes of one loss on one set of inputs: ``forward()`` returns the loss (with
    its graph), ``backward(loss)`` the gradients of the logits that require them (student first),
    ``step()`` both, as ``(loss detached, grads)``."""

    forward: object
    backward: object

    def step(self):
        loss = self.forward()
        return loss.detach(), self.backward(loss)


def make_passes(loss_fn, student, teacher, loss_kwargs, retain_graph=False):
    """``Passes`` of ``loss_fn`` on these inputs; ``retain_graph`` keeps the graph for another
    backward of the same loss (timing the backward alone on a GPU)."""
    inputs = [x for x in (student, teacher) if x.requires_grad]

    def forward():
        return loss_fn(student, teacher, **loss_kwargs)

    def backward(loss):
        return torch.autograd.grad(loss, inputs, retain_graph=retain_graph)
    return Passes(forward, backward)


def float64_copies(student, teacher, loss_kwargs):
    """Float64 leaf copies of the logits (same ``requires_grad``) and of the float options."""
    s64 = student.detach().double().requires_grad_(student.requires_grad)
    t64 = teacher.detach().double().requires_grad_(teacher.requires_grad)
    kwargs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in loss_kwargs.items()}
    return s64, t64, kwargs


def oracle_loss(pairwise):
    """The float64 oracle: the literal pairwise reference, or (``pairwise=False``, where
    ``B x C x C`` cannot be built) the reference's O(C) identity for the wMSE."""
    def oracle(student, teacher, **kwargs):
        return gkl_loss_reference(student, teacher, pairwise=pairwise, **kwargs)
    return oracle
