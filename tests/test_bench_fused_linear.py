"""pytest-benchmark timings of the fused linear + GKL loss on CPU at one small size (N=256 tokens,
V=32000, H=512, float32): forward+backward of every provider of ``bench.fused_linear``
(``fused_linear_gkl`` at its default and an explicit chunk size, the unfused path, Liger-Kernel's
fused linear JSD loss compiled and eager), after one warm-up step, each with the peak memory of
one step in ``extra_info``.

``pytest tests/test_bench_fused_linear.py --benchmark-enable --benchmark-only`` for the timings
(one table); a plain ``pytest tests/test_bench_fused_linear.py`` runs each step once and checks
that the fused loss and its gradients agree with the unfused path's. The Liger and TRL providers
are skipped, with the reason, where their package is not installed (CI installs both).
``python -m bench.fused_linear`` is the full comparison.
"""

import pytest
import torch

from bench.fused_linear import (LIGER, LIGER_EAGER, LIGER_TRAINER, PROVIDERS, TRL_HALF_MASKED,
                                UNFUSED, Size, failure_reason, make_inputs, make_passes)
from gkl_kernels.testing.memory import measure_peak_memory

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once

SIZE = Size(256, 32000, 512)
ROUNDS = 3  # a step takes about a second on two idle cores
# need Liger-Kernel (and, compiled, a C++ compiler), or TRL
OPTIONAL = (LIGER, LIGER_EAGER, LIGER_TRAINER, TRL_HALF_MASKED)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(SIZE)


@pytest.fixture(scope="module")
def unfused_step(inputs):
    """``(loss, (grad hidden, grad weight))`` of the unfused path."""
    unfused = next(p for p in PROVIDERS if p.name == UNFUSED)
    return make_passes(unfused.build(), inputs).step()


def warmed_up_passes(provider, inputs):
    """The provider's ``Passes`` after one step (Liger compiles there); an optional provider
    whose package is not installed is skipped with the reason (installed, it must run: a failure
    is a failure)."""
    try:
        passes = make_passes(provider.build(), inputs)
    except ImportError as error:
        if provider.name not in OPTIONAL:
            raise
        pytest.skip(f"{provider.name} needs a package not installed here: "
                    f"{failure_reason(error)}")
    passes.step()
    return passes


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_fused_linear(benchmark, provider, inputs, request):
    passes = warmed_up_passes(provider, inputs)
    benchmark.group = f"fused linear {SIZE.label} forward+backward"
    benchmark.extra_info["peak_bytes"], (loss, grads) = measure_peak_memory(passes.step)
    benchmark.pedantic(passes.step, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    if provider.computes_gkl and provider.name != UNFUSED:
        reference_loss, reference_grads = request.getfixturevalue("unfused_step")
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
        for grad, reference_grad in zip(grads, reference_grads):
            scale = float(reference_grad.abs().max())
            torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-5 * scale)
