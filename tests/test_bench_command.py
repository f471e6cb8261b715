"""``python -m bench`` end to end on small cases: the CPU path, the GPU path's dry run, the input
rotation of the GPU meter, and the README's results section against the committed JSON."""

import json

import pytest
import torch

from bench import fused_linear, readme
from bench.__main__ import main
from bench.cases import IMAGENET, TEACHER, Case
from bench.devices import CudaCalls, GpuMeter
from bench.providers import KL_DIV, PACKAGE, PACKAGE_TRITON, REFERENCE, Passes


def test_cpu_command_writes_table_json_plot_traffic_and_compile_report(tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    main(["--quick", "--cases", "sweep C=10", "sweep C=100", "adv per-row C=50",
          "--providers", REFERENCE, PACKAGE, PACKAGE_TRITON, KL_DIV,
          "--json", str(json_path), "--plot", str(plot_path)])
    printed = capsys.readouterr().out
    assert "Ratios at" in printed and "wall time" in printed
    assert f"not timed on cpu: {PACKAGE_TRITON}" in printed
    payload = json.loads(json_path.read_text())
    assert payload["machine"]["torch"] == torch.__version__
    assert payload["machine"]["dry_run"] is False and payload["machine"]["gpu"] is None
    results = payload["results"]
    assert {r["provider"] for r in results} == {REFERENCE, PACKAGE, KL_DIV}
    assert len(results) == 3 * 3
    for r in results:
        assert r["skipped"] is None and r["peak_bytes"] > 0
        assert 0 < r["forward_seconds"] < r["seconds"] and 0 < r["backward_seconds"] < r["seconds"]
        if r["provider"] != KL_DIV:
            assert r["loss_error"] < 1e-4 and r["student_grad_error"] < 1e-5
    assert payload["traffic"] and payload["compile_report"]
    assert all(not row["error"] for row in payload["compile_report"])
    assert plot_path.stat().st_size > 0


def test_gpu_path_dry_run_times_every_pass_and_refuses_the_readme(tmp_path, capsys):
    json_path = tmp_path / "dry.json"
    main(["--quick", "--gpu-dry-run", "--cases", "adv explicit", "--providers", PACKAGE,
          PACKAGE_TRITON, "--skip-traffic", "--skip-compile-report", "--json", str(json_path)])
    assert "DRY RUN" in capsys.readouterr().out
    payload = json.loads(json_path.read_text())
    assert payload["machine"]["dry_run"] is True and payload["machine"]["gpu"] is None
    assert payload["machine"]["copy_bandwidth"] > 0
    results = {r["provider"]: r for r in payload["results"]}
    assert set(results) == {PACKAGE, PACKAGE_TRITON}
    for r in results.values():
        assert r["forward_seconds"] > 0 and r["backward_seconds"] > 0 and r["seconds"] > 0
        assert r["peak_bytes"] > 0 and r["floor_bandwidth"] > 0 and 0 < r["copy_fraction"]
        assert r["loss_error"] < 1e-4 and r["student_grad_error"] < 1e-5
        assert r["teacher_grad_error"] < 1e-5  # adversarial: both logits get gradients
    with pytest.raises(ValueError, match="dry run"):
        readme.render(payload)


class RecordingCalls:
    """Stand-in CUDA calls whose ``bench`` calls ``fn`` a fixed number of times and returns a
    fixed time: the test sees which input set each call used."""

    def __init__(self, calls_per_bench):
        self.calls_per_bench = calls_per_bench

    def bench(self, fn):
        for _ in range(self.calls_per_bench):
            fn()
        return 2.0  # milliseconds

    def as_calls(self):
        return CudaCalls(self.bench, lambda fn: (0, fn()), lambda: 2**30, l2_bytes=3 * 2**10)


def test_gpu_meter_rotates_input_sets_in_every_pass():
    case = Case("tiny", 4, 32, TEACHER, IMAGENET)  # 2 x 512 B a set: 6 sets fill twice 3 KiB
    meter = GpuMeter(RecordingCalls(calls_per_bench=7).as_calls(), device="cpu")
    count = meter.input_sets(case)
    assert count == 6
    used = []

    def passes_of(index, backward_log):
        def forward():
            used.append(("forward", index))
            return torch.tensor(float(index))

        def backward(loss):
            assert int(loss) == index  # each backward gets the loss of its own input set
            backward_log.append(index)
        return Passes(forward, backward)

    backwards = []
    timing = meter.time([passes_of(i, backwards) for i in range(count)],
                        [passes_of(i, backwards) for i in range(count)])
    assert timing.forward == timing.backward == timing.total == pytest.approx(2e-3)
    # forward pass: 7 calls, then the retained graphs (one forward each), backward 7 calls,
    # forward+backward 7 calls; the rotation goes on across passes
    forwards = [index for kind, index in used]
    assert forwards[:7] == [0, 1, 2, 3, 4, 5, 0]
    assert forwards[7:13] == [0, 1, 2, 3, 4, 5]
    assert backwards[:7] == [1, 2, 3, 4, 5, 0, 1]
    assert forwards[13:] == [2, 3, 4, 5, 0, 1, 2] and backwards[7:] == [2, 3, 4, 5, 0, 1, 2]


def test_readme_results_section_is_generated_from_the_committed_json():
    assert readme.main(["--check"]) == 0


def test_fused_linear_command_on_a_small_size(tmp_path, capsys):
    json_path, plot_path = tmp_path / "fused.json", tmp_path / "fused.png"
    fused_linear.main(["--sizes", "96x500x16", "--providers", fused_linear.UNFUSED,
                       fused_linear.FUSED, fused_linear.FUSED_CHUNKED, "--repeats", "1",
                       "--json", str(json_path), "--plot", str(plot_path)])
    printed = capsys.readouterr().out
    assert "Goal at N=8192" in printed and "wall time" in printed
    results = json.loads(json_path.read_text())["results"]
    assert [r["provider"] for r in results] == [fused_linear.UNFUSED, fused_linear.FUSED,
                                                fused_linear.FUSED_CHUNKED]
    for r in results:
        assert r["skipped"] is None and r["peak_bytes"] > 0 and r["seconds"] > 0
        assert r["launches"] > 0 and r["bytes_moved"] > 0
        if r["provider"] != fused_linear.UNFUSED:
            assert r["loss_error"] < 1e-5 and r["grad_error"] < 1e-5
    assert plot_path.stat().st_size > 0
