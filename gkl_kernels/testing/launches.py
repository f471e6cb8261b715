"""Kernel launches and host syncs of a training step, per pass (``count_step``), and the Triton
path's host work as on a GPU: its value checks in the kernels (``value_checks_as_on_a_gpu``) and
its launches stubbed (``triton_launches_stubbed``), under Triton's interpreter.

A pass's launches are its aten kernels (``DispatchCounter``, compiled code's extern calls
included), its Triton launches (``TritonTrafficCounter``, counted where Triton's interpreter runs
them) and the kernels ``torch.compile`` generated (``InductorKernelCounter``).
"""

import contextlib
from typing import NamedTuple

from triton.runtime import interpreter

from gkl_kernels import functional as gkl_functional
from gkl_kernels import validation
from gkl_kernels.testing.dispatch import CompiledCodeDispatchCounter, InductorKernelCounter
from gkl_kernels.testing.traffic import TritonTrafficCounter
from gkl_kernels.validation import triton_interpreter_active

class PassLaunches(NamedTuple):
    """Kernel launches and host syncs of one pass: aten kernels (``DispatchCounter``), Triton
    launches (``TritonTrafficCounter``, under Triton's interpreter), kernels ``torch.compile``
    generated (``InductorKernelCounter``); host syncs are ``.item()`` calls."""

    aten: int
    triton: int
    compiled: int
    host_syncs: int

    @property
    def launches(self):
        return self.aten + self.triton + self.compiled


class StepLaunches(NamedTuple):
    """``PassLaunches`` of a training step's forward and backward passes."""

    forward: PassLaunches
    backward: PassLaunches

    @property
    def launches(self):
        return self.forward.launches + self.backward.launches

    @property
    def host_syncs(self):
        return self.forward.host_syncs + self.backward.host_syncs

    def fields(self):
        """Launches and host syncs per pass and per step, and the launches by kind per pass, as
        a dict (the JSON fields of ``python -m bench``'s results)."""
        return {
            "forward_launches": self.forward.launches,
            "backward_launches": self.backward.launches,
            "launches": self.launches,
            "forward_host_syncs": self.forward.host_syncs,
            "backward_host_syncs": self.backward.host_syncs,
            "host_syncs": self.host_syncs,
            "launch_kinds": {name: {kind: getattr(counts, kind)
                                    for kind in ("aten", "triton", "compiled")}
                             for name, counts in zip(("forward", "backward"), self)},
        }


def count_launches(run):
    """Run ``run()`` under the launch counters, reading values back as on a GPU
    (``reads_as_on_a_gpu``): ``(its result, PassLaunches)``. Triton launches are counted when
    Triton's interpreter runs them (``TRITON_INTERPRET=1``); a Triton kernel run on a GPU would
    be missed."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(reads_as_on_a_gpu())
        triton_counter = (stack.enter_context(TritonTrafficCounter())
                          if triton_interpreter_active() else None)
        compiled = stack.enter_context(InductorKernelCounter())
        aten = stack.enter_context(CompiledCodeDispatchCounter())
        result = run()
    triton_launches = triton_counter.launches if triton_counter else 0
    return result, PassLaunches(aten.launches, triton_launches, compiled.launches,
                                aten.host_syncs)


def count_step(forward, backward):
    """``StepLaunches`` of one training step: ``loss = forward()``, then ``backward(loss)``. Run
    a step first (warm-up, compiles)."""
    loss, forward_launches = count_launches(forward)
    _, backward_launches = count_launches(lambda: backward(loss))
    return StepLaunches(forward_launches, backward_launches)


@contextlib.contextmanager
def value_checks_as_on_a_gpu(triton_path=True):
    """While active (and ``triton_path``), the Triton path's value checks are where a GPU run has
    them: in the kernels (the finishing kernel's device assertion), not on the host as for the
    interpreter's CPU tensors (``gkl_kernels.functional.kernels_check_values``)."""
    if not triton_path:
        yield
        return
    original = gkl_functional.kernels_check_values
    gkl_functional.kernels_check_values = lambda use_triton, device: use_triton
    try:
        yield
    finally:
        gkl_functional.kernels_check_values = original


@contextlib.contextmanager
def reads_as_on_a_gpu():
    """While active, the plain-PyTorch rows and the fused losses read no values back on CPU
    either (``validation.host_reads_free``), as on a GPU: a step's host syncs counted on CPU are a
    GPU step's."""
    original = validation.host_reads_free
    validation.host_reads_free = lambda device: False
    try:
        yield
    finally:
        validation.host_reads_free = original


@contextlib.contextmanager
def triton_launches_stubbed():
    """While active, every Triton launch (under the interpreter) returns at once and runs
    nothing: what remains of a step is its host time (Python, dispatch, allocations)."""
    kernel_type = interpreter.InterpretedFunction
    original = kernel_type.__dict__.get("__getitem__")  # triton 3.2 has its own, 3.9 inherits it
    kernel_type.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    try:
        yield
    finally:
        if original is None:
            del kernel_type.__getitem__
        else:
            kernel_type.__getitem__ = original
