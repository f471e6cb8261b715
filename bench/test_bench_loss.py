"""pytest-benchmark timings of one forward+backward pass: the package's torch path and the literal
``B x C x C`` reference, at a small and a medium shape.

``pytest bench/ --benchmark-only`` for the timings (one table per shape); a plain ``pytest bench/``
runs the same few rounds, checks that the package agrees with the reference, and runs
``python -m bench --quick`` without its compiled provider. Each benchmark also records its peak
memory in ``extra_info``.
"""

import json

import pytest
import torch

from bench.__main__ import main
from bench.cases import CIFAR100_KD, IMAGENET, PRIOR, TEACHER, Case, make_inputs
from bench.memory import measure_peak_memory
from bench.providers import KL_DIV, PACKAGE, REFERENCE, make_step, select_providers
from reference import gkl_loss_reference

CASES = {
    "small": Case("small", 64, 100, PRIOR, CIFAR100_KD),
    "medium": Case("medium", 128, 300, TEACHER, IMAGENET, adversarial=True),
}
# rounds per (provider, case): the reference's medium pass takes about 0.3 s on two idle cores
ROUNDS = {(PACKAGE, "small"): 50, (PACKAGE, "medium"): 20,
          (REFERENCE, "small"): 10, (REFERENCE, "medium"): 3}


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("provider", select_providers([PACKAGE, REFERENCE]),
                         ids=lambda p: p.name)
def test_forward_backward(benchmark, provider, case_name):
    case = CASES[case_name]
    student, teacher, loss_kwargs = make_inputs(case)
    step = make_step(provider.build(), student, teacher, loss_kwargs)
    benchmark.group = f"{case.name} {case.shape}"
    benchmark.extra_info["peak_bytes"], _ = measure_peak_memory(step)
    loss, grads = benchmark.pedantic(step, rounds=ROUNDS[provider.name, case_name],
                                     warmup_rounds=1, iterations=1)
    reference_loss, reference_grads = make_step(gkl_loss_reference, student, teacher,
                                                loss_kwargs)()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-4, atol=1e-5)
    for grad, reference_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-3, atol=1e-6)


def test_quick_command_writes_table_json_and_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    main(["--quick", "--providers", REFERENCE, PACKAGE, KL_DIV, "--json", str(json_path),
          "--plot", str(plot_path)])
    printed = capsys.readouterr().out
    assert "Ratios at" in printed and "wall time" in printed
    payload = json.loads(json_path.read_text())
    assert payload["machine"]["torch"] == torch.__version__
    results = payload["results"]
    assert {r["provider"] for r in results} == {REFERENCE, PACKAGE, KL_DIV}
    for r in results:
        assert r["skipped"] is None and r["seconds"] > 0 and r["peak_bytes"] > 0
        if r["provider"] != KL_DIV:
            assert r["loss_error"] < 1e-4 and r["student_grad_error"] < 1e-5
    assert plot_path.stat().st_size > 0
