"""pytest-benchmark timings of the loss on CPU: the forward pass and forward+backward, for the
package's torch path, the literal ``B x C x C`` reference and ``F.kl_div``, at a small and a
medium shape.

``pytest tests/test_bench_loss.py --benchmark-enable --benchmark-only`` for the timings (one
table per shape and pass); a plain ``pytest tests/test_bench_loss.py`` runs each pass once and
checks that the package agrees with the reference. Each benchmark also records its peak memory in ``extra_info``.
``python -m bench`` is the full comparison (tested in ``tests/test_bench_command.py``).
"""

import pytest
import torch

from bench.cases import CIFAR100_KD, IMAGENET, PRIOR, TEACHER, Case, make_inputs
from bench.providers import KL_DIV, PACKAGE, REFERENCE, make_passes, select_providers
from gkl_kernels.testing.memory import measure_peak_memory
from reference import gkl_loss_reference

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once

CASES = {
    "small": Case("small", 64, 100, PRIOR, CIFAR100_KD),
    "medium": Case("medium", 128, 300, TEACHER, IMAGENET, adversarial=True),
}
# forward+backward rounds per (provider, case): the reference's medium pass takes about 0.3 s on
# two idle cores; a forward pass alone gets twice as many
ROUNDS = {(PACKAGE, "small"): 50, (PACKAGE, "medium"): 20, (KL_DIV, "small"): 50,
          (KL_DIV, "medium"): 20, (REFERENCE, "small"): 10, (REFERENCE, "medium"): 3}


@pytest.mark.parametrize("timed_pass", ["forward", "forward+backward"])
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("provider", select_providers([PACKAGE, REFERENCE, KL_DIV]),
                         ids=lambda p: p.name)
def test_loss(benchmark, provider, case_name, timed_pass):
    case = CASES[case_name]
    student, teacher, loss_kwargs = make_inputs(case)
    passes = make_passes(provider.build(), student, teacher, loss_kwargs)
    timed = passes.forward if timed_pass == "forward" else passes.step
    rounds = ROUNDS[provider.name, case_name] * (2 if timed_pass == "forward" else 1)
    benchmark.group = f"{case.name} {case.shape} {timed_pass}"
    benchmark.extra_info["peak_bytes"], _ = measure_peak_memory(timed)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    if provider.exact:
        loss, grads = passes.step()
        reference_loss, reference_grads = make_passes(gkl_loss_reference, student, teacher,
                                                      loss_kwargs).step()
        torch.testing.assert_close(loss, reference_loss, rtol=1e-4, atol=1e-5)
        for grad, reference_grad in zip(grads, reference_grads):
            torch.testing.assert_close(grad, reference_grad, rtol=1e-3, atol=1e-6)
