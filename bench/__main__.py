"""``python -m bench``: the performance evidence for the GKL loss, in minutes by default.

1. Time (forward, backward, forward+backward), peak memory and accuracy of every provider on the
   headline case, ImageNet at B=256, C=1000 (``--full``: every case of ``bench.cases``): the
   literal ``B x C x C`` reference eager and under ``torch.compile``, the package's plain-PyTorch
   path, ``F.kl_div`` as the cost of plain distillation, and on a GPU the package's Triton
   kernels. Each provider's kernel launches and host syncs per step (forward, backward) are
   counted too: in this process after its timed steps, or for ``gkl_loss[triton]`` under
   Triton's interpreter (``python -m bench.traffic --steps``, a subprocess; on CPU the Triton
   provider is counted, not timed).
2. The overhead (``bench.overhead``), judged: the host time of one step of ``gkl_loss[triton]``
   (its launches stubbed, its value checks as on a GPU, measured in the interpreter's subprocess)
   at most 1.5x ``F.kl_div``'s at B=32, C=10; reported, not judged: ``gkl_loss[torch]`` (the
   exact CPU fallback) against ``F.kl_div`` at B=32, C=10 and B=64, C=100, where a step's time is
   overhead, and the Python time of one call.
3. The MODELLED (not measured) H100 time of one step of ``gkl_loss[triton]`` against
   ``F.kl_div`` at the ImageNet shape, from bytes and launches counted by ``bench.traffic``
   (the model: ``tools.h100_model``).
4. ``--traffic``: the memory traffic and launches of the Triton kernels and the torch path,
   counted under Triton's interpreter and a dispatch mode, with a modelled H100 time
   (``bench.traffic``; minutes).
5. ``--compile-report``: the ahead-of-time compile report of every kernel configuration
   (``python -m tools.compile_report``, a subprocess; minutes).

Each step prints a line with the time elapsed and an estimate of the time left; the output ends
with the headline: the ratios of part 1 at the headline shapes, part 2's and part 3's, each as a
sentence ("gkl_loss is 3.1x slower than F.kl_div") with its goal explained.

Run from the repository root: ``python -m bench [--full] [--traffic] [--compile-report]
[--quick] [--json PATH] [--plot PATH] [--cases NAME ...] [--providers NAME ...]
[--max-reference-pairs N] [--threads N] [--gpu-dry-run]``. ``--full`` is every case and part
(what ``bench/results/cpu.json`` is generated from). On CPU, times are medians of
``time.perf_counter`` around each pass after a warm-up pass; on a GPU, medians of
``triton.testing.do_bench`` over rotating inputs (``bench.devices``). Errors are against the
float64 reference.
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
from bench.measure import (QuadraticScaling, Settings, planned_oracle_seconds,  # noqa: E402
                           planned_seconds, record_interpreted_launches, run_case)
from bench.progress import Progress, format_duration  # noqa: E402
from bench.providers import ORACLE, PACKAGE, PROVIDERS, select_providers  # noqa: E402
from bench.traffic import planned_traffic_seconds  # noqa: E402
from tools.h100_model import format_modelled_step, modelled_headline  # noqa: E402

DEFAULT_MAX_REFERENCE_PAIRS = 256 * 1000 * 1000
# the plan's seconds (bench.progress) for the parts that are not per case, on the 2-core CPU
INTERPRETED_SECONDS, INTERPRETED_SECONDS_PER_CASE = 20.0, 1.0  # python -m bench.traffic --steps
OVERHEAD_TARGETS = 8  # part 2 times about this many target_seconds
SUBPROCESS_SECONDS = 10.0  # starting python -m bench.traffic (twice: itself with the interpreter)
COMPILE_REPORT_SECONDS = {False: 100.0, True: 20.0}  # by --quick, warm caches (cold: 5x)
QUICK_SECONDS = 90  # python -m bench --quick finishes within this on the 2-core CPU (a test)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every case, the traffic counts and the compile report (as "
                        "bench/results/cpu.json was made; about 10-20 minutes on 2 cores)")
    parser.add_argument("--traffic", action="store_true",
                        help="also count the memory traffic and launches (part 4)")
    parser.add_argument("--compile-report", action="store_true",
                        help="also compile every kernel configuration ahead of time (part 5)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small shapes only (tests, CI; within {QUICK_SECONDS} s)")
    parser.add_argument("--json", metavar="PATH", help="write all results and the machine to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory against C")
    parser.add_argument("--cases", nargs="+", default=[], metavar="NAME",
                        help="run only the cases of these names, from the full list (default: "
                        "the headline case; --full: all)")
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
    args = parser.parse_args(argv)
    args.traffic |= args.full
    args.compile_report |= args.full
    return args


def run_module_for_json(module, options):
    """Run ``python -m module *options --json TMP`` (its output streams to ours) and return
    ``(exit status, what it wrote to TMP or None)``."""
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir, "rows.json")
        status = subprocess.call([sys.executable, "-m", module, *options, "--json", str(path)])
        return status, json.loads(path.read_text()) if path.exists() else None


def count_interpreted(args, cases, providers):
    """``python -m bench.traffic --steps``: the launches of the providers counted under Triton's
    interpreter (``gkl_loss[triton]``) on ``cases``, and the modelled H100 step with the host
    times; its JSON (``None`` if it failed)."""
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


def plan(args, cases, providers, settings, meter):
    """``{step: estimated seconds}`` of the whole run, in the order it runs."""
    steps = {}
    for case in cases:
        steps[case.name, ORACLE] = planned_oracle_seconds(case, settings)
        for provider in providers:
            steps[case.name, provider.name] = planned_seconds(provider, case, settings, meter)
    steps["interpreted"] = INTERPRETED_SECONDS + INTERPRETED_SECONDS_PER_CASE * len(cases)
    steps["overhead"] = OVERHEAD_TARGETS * settings.target_seconds
    if args.traffic:
        steps["traffic"] = 2 * SUBPROCESS_SECONDS + planned_traffic_seconds(args.quick)
    if args.compile_report:
        steps["compile report"] = COMPILE_REPORT_SECONDS[args.quick]
    return steps


def headline_lines(meter, headlines, overhead, modelled_step):
    """The closing lines: every ratio as a sentence, with its goal."""
    lines = [f"Headline: forward+backward, measured in this run ({meter.label}), gkl_loss being "
             f"gkl_loss(..., backend=\"torch\") ({PACKAGE}); goals are the project's own bars "
             f"(set in its issues), met or MISSED in this run:"]
    lines += [report.format_headline(case, ratios) for case, ratios in headlines]
    lines.append(overhead_part.headline(overhead))
    if modelled_step:
        lines += [overhead_part.host_sentence(modelled_step), modelled_headline(modelled_step)]
    return lines


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
    cases = case_lists.planned_cases(args.quick, args.full, args.cases)
    # smallest first: a quadratic provider's size is predicted from its largest smaller run
    cases.sort(key=lambda case: case.pairs)
    planned = plan(args, cases, providers, settings, meter)
    parts = ", ".join(["timings", "overhead", "modelled H100 step",
                       *(["traffic"] if args.traffic else []),
                       *(["compile report"] if args.compile_report else [])])
    print(f"plan: {len(cases)} case{'s' if len(cases) > 1 else ''} x {len(providers)} "
          f"providers, then {parts}: about {format_duration(sum(planned.values()))} "
          f"(estimated from the work planned, refined as it goes)", flush=True)
    progress = Progress(planned, started)
    scaling = QuadraticScaling()
    results, oracles = [], {}
    print(f"\n1. Timings: {meter.label}", flush=True)
    for index, case in enumerate(cases, 1):
        def done(name, result):
            progress.finish((case.name, name), f"[{index}/{len(cases)}] "
                            + report.provider_line(case, name, result))
        case_results, oracles[case.name] = run_case(case, providers, scaling, settings, meter,
                                                    done)
        report.add_bandwidth(case, case_results, info["copy_bandwidth"])
        results.extend(case_results)
    interpreted = count_interpreted(args, cases, providers) or {}
    progress.finish("interpreted", "counted under Triton's interpreter")
    record_interpreted_launches(results, interpreted.get("launches", []))
    print()
    print(report.format_table(cases, results, oracles, meter))
    headlines = [(case, report.headline_ratios(case, results))
                 for case in case_lists.headline_cases(cases, report.HEADLINE_RATIOS)]
    modelled_step = interpreted.get("modelled_h100_step")
    print(f"\n2. Overhead: the host time of a step of {overhead_part.PACKAGE_TRITON}; "
          f"{overhead_part.PACKAGE} (gkl_loss's default options and value checks) against "
          f"{overhead_part.KL_DIV} at shapes where a step is all overhead, forward+backward, "
          f"measured: {meter.label}", flush=True)
    overhead = overhead_part.run_overhead(meter, settings.target_seconds)
    print(overhead_part.format_overhead(overhead, modelled_step), flush=True)
    progress.finish("overhead", "overhead timed")
    print("\n3. Modelled H100 step at the ImageNet shape (a model, not a measurement)")
    print(format_modelled_step(modelled_step) if modelled_step
          else "not counted: python -m bench.traffic --steps failed")
    quick = ["--quick"] if args.quick else []
    traffic = compile_rows = None
    if args.traffic:
        print("\n4. Memory traffic and launches, counted (python -m bench.traffic)", flush=True)
        _, traffic = run_module_for_json("bench.traffic", quick)
        progress.finish("traffic", "traffic counted")
    if args.compile_report:
        print("\n5. Compile report (ahead of time, sm_80 and sm_90a; python -m "
              "tools.compile_report)", flush=True)
        _, compile_rows = run_module_for_json("tools.compile_report", quick)
        progress.finish("compile report", "compile report done")
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
    print(f"wall time {format_duration(wall_seconds)}")
    print()
    print("\n".join(headline_lines(meter, headlines, overhead, modelled_step)))


if __name__ == "__main__":
    sys.exit(main())
