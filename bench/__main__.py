"""``python -m bench``: the performance evidence for the GKL loss in one run.

1. Time (forward, backward, forward+backward), peak memory and accuracy of every provider on every
   case (``bench.cases``): the literal ``B x C x C`` reference eager and under ``torch.compile``,
   the package's plain-PyTorch path, ``F.kl_div`` as the cost of plain distillation, and on a GPU
   the package's Triton kernels; then the headline ratios at B=256, C=1000.
   Each provider's kernel launches and host syncs per step (forward, backward) are counted too:
   in this process after its timed steps, or for ``gkl_loss[triton]`` under Triton's
   interpreter (``python -m bench.traffic --steps``, a subprocess; on CPU the Triton provider is
   counted, not timed).
2. The overhead: ``gkl_loss[torch]`` against ``F.kl_div`` at B=32, C=10 and B=64, C=100, where a
   step's time is overhead, and the Python time of one call (``bench.overhead``; always run).
3. The MODELLED (not measured) H100 time of one step of ``gkl_loss[triton]`` against
   ``F.kl_div`` at the ImageNet shape, from counted bytes and launches (``bench.traffic``; always
   run).
4. The memory traffic and launches of the Triton kernels and the torch path, counted under
   Triton's interpreter and a dispatch mode, with a modelled H100 time (``bench.traffic``).
5. The ahead-of-time compile report of every kernel configuration (``bench.compile_report``).

Run from the repository root: ``python -m bench [--quick] [--json PATH] [--plot PATH]
[--cases NAME ...] [--providers NAME ...] [--max-reference-pairs N] [--threads N] [--gpu-dry-run]
[--skip-traffic] [--skip-compile-report]``. On CPU, times are medians of ``time.perf_counter``
around each pass after a warm-up pass; on a GPU, medians of ``triton.testing.do_bench`` over
rotating inputs (``bench.devices``). Errors are against the float64 reference.
"""

import os

# The memory meter starts the profiler once per measurement, and Kineto (the profiler's library)
# writes a line to stderr at each start and stop at every log level it has; 6 is above them all.
# Read when torch is imported; an explicit setting wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench import cases as case_lists  # noqa: E402
from bench import overhead as overhead_part  # noqa: E402
from bench import report  # noqa: E402
from bench.devices import pick_meter  # noqa: E402
from bench.measure import (QuadraticScaling, Settings, format_seconds,  # noqa: E402
                           record_interpreted_launches, run_case)
from bench.providers import PROVIDERS, select_providers  # noqa: E402
from bench.traffic import format_modelled_step  # noqa: E402

DEFAULT_MAX_REFERENCE_PAIRS = 256 * 1000 * 1000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (tests, CI)")
    parser.add_argument("--json", metavar="PATH", help="write all results and the machine to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory against C")
    parser.add_argument("--cases", nargs="+", default=[], metavar="NAME",
                        help="run only the cases of these names (default: all)")
    parser.add_argument("--providers", nargs="+", default=[], metavar="NAME",
                        choices=[p.name for p in PROVIDERS], help="run only these providers")
    parser.add_argument("--max-reference-pairs", type=float, default=DEFAULT_MAX_REFERENCE_PAIRS,
                        metavar="N", help="largest B*C^2 at which the pairwise reference runs "
                        f"(default {DEFAULT_MAX_REFERENCE_PAIRS:.3g}: B=256, C=1000)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch.set_num_threads(N) first (default: torch's own choice)")
    parser.add_argument("--gpu-dry-run", action="store_true",
                        help="run the GPU code path on CPU with stand-ins for the CUDA calls "
                        "(a test of that path; its figures are CPU figures)")
    parser.add_argument("--skip-traffic", action="store_true",
                        help="leave out the traffic counts (part 4)")
    parser.add_argument("--skip-compile-report", action="store_true",
                        help="leave out the compile report (part 5)")
    return parser.parse_args(argv)


def run_module_for_json(module, options):
    """Run ``python -m module *options --json TMP`` (its output streams to ours) and return
    ``(exit status, what it wrote to TMP or None)``."""
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir, "rows.json")
        status = subprocess.call([sys.executable, "-m", module, *options, "--json", str(path)])
        return status, json.loads(path.read_text()) if path.exists() else None


def count_interpreted(args, cases, providers):
    """``python -m bench.traffic --steps``: the launches of the providers counted under Triton's
    interpreter (``gkl_loss[triton]``) on ``cases``, and the modelled H100 step; its JSON
    (``None`` if it failed)."""
    names = [p.name for p in providers if p.interpreted_counts]
    counted = [case.name for case in cases] if names else []  # none: the modelled step only
    options = [*(["--quick"] if args.quick else []), "--cases", *counted,
               *(["--providers", *names] if names else [])]
    if names:
        print(f"counting the launches of {', '.join(names)} under Triton's interpreter "
              f"(python -m bench.traffic --steps):", flush=True)
    status, payload = run_module_for_json("bench.traffic", ["--steps", *options])
    if status:
        print(f"python -m bench.traffic --steps failed (exit status {status})", flush=True)
    return payload


def main(argv=None):
    args = parse_args(argv)
    if args.gpu_dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # the dry run's Triton provider runs on CPU tensors: Triton's interpreter, set at import
        return subprocess.call([sys.executable, "-m", "bench", *(argv or sys.argv[1:])],
                               env={**os.environ, "TRITON_INTERPRET": "1"})
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = Settings(target_seconds=0.2 if args.quick else 1.0,
                        max_reference_pairs=int(args.max_reference_pairs))
    meter = pick_meter(settings.target_seconds, args.gpu_dry_run)
    info = report.machine_info(meter)
    print(report.describe_machine(info), flush=True)
    warning = report.busy_warning(info["cpu_busy_before_start"])
    if warning:
        print(warning, flush=True)
    if info["copy_bandwidth"]:
        print(f"device-to-device copy: {info['copy_bandwidth'] / 1e9:.0f} GB/s", flush=True)
    providers = select_providers(args.providers)
    cases = case_lists.select_cases(case_lists.quick_cases() if args.quick
                                    else case_lists.full_cases(), args.cases)
    # smallest first: a quadratic provider's size is predicted from its largest smaller run
    cases.sort(key=lambda case: case.pairs)
    scaling = QuadraticScaling()
    results, oracles = [], {}
    print(f"\n1. Timings: {meter.label}", flush=True)
    for index, case in enumerate(cases, 1):
        case_results, oracles[case.name] = run_case(case, providers, scaling, settings, meter)
        report.add_bandwidth(case, case_results, info["copy_bandwidth"])
        results.extend(case_results)
        print(report.case_line(index, len(cases), case, case_results, oracles[case.name],
                               time.perf_counter() - started), flush=True)
    interpreted = count_interpreted(args, cases, providers) or {}
    record_interpreted_launches(results, interpreted.get("launches", []))
    print()
    print(report.format_table(cases, results, oracles, meter))
    headlines = [(case, report.headline_ratios(case, results))
                 for case in case_lists.headline_cases(cases, report.HEADLINE_RATIOS)]
    for case, ratios in headlines:
        print()
        print(report.format_ratios(case, ratios))
    print(f"\n2. Overhead at shapes where a step is all overhead: {overhead_part.PACKAGE} "
          f"(gkl_loss's default options and value checks) against {overhead_part.KL_DIV}, "
          f"forward+backward, measured: {meter.label}", flush=True)
    overhead = overhead_part.run_overhead(meter, settings.target_seconds)
    print(overhead_part.format_overhead(overhead), flush=True)
    modelled_step = interpreted.get("modelled_h100_step")
    print("\n3. Modelled H100 step at the ImageNet shape (a model, not a measurement)")
    print(format_modelled_step(modelled_step) if modelled_step
          else "not counted: python -m bench.traffic --steps failed")
    quick = ["--quick"] if args.quick else []
    traffic = compile_rows = None
    if not args.skip_traffic:
        print("\n4. Memory traffic and launches, counted", flush=True)
        _, traffic = run_module_for_json("bench.traffic", quick)
    if not args.skip_compile_report:
        print("\n5. Compile report (ahead of time, sm_80 and sm_90a)", flush=True)
        _, compile_rows = run_module_for_json("bench.compile_report", quick)
    wall_seconds = time.perf_counter() - started
    info["load_average_at_end"] = report.load_average()
    print(f"\nload average at the end: {info['load_average_at_end'][0]:.2f} (1 min)")
    if args.json:
        report.write_json(args.json, info, settings, cases, results, oracles, headlines,
                          traffic, compile_rows, wall_seconds, overhead, modelled_step)
        print(f"wrote {args.json}")
    if args.plot:
        report.write_plot(args.plot, cases, results, meter)
        print(f"wrote {args.plot}")
    print(f"wall time {format_seconds(wall_seconds)}")


if __name__ == "__main__":
    sys.exit(main())
