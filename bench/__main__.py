"""``python -m bench``: forward+backward time, peak memory and accuracy of the GKL loss on CPU, for
the literal ``B x C x C`` reference (eager and ``torch.compile``), the package's plain-PyTorch path
and ``F.kl_div``, then the headline ratios at B=256, C=1000 (rank-one and shared ``(C, C)``
weights).

Run from the repository root: ``python -m bench [--quick] [--json PATH] [--plot PATH]
[--providers NAME ...] [--max-reference-pairs N] [--threads N]``. Times are medians of
``time.perf_counter`` around whole passes after a warm-up pass; peak memory is measured by
``bench.memory``; errors are against the float64 reference.
"""

import os

# The memory meter starts the profiler once per measurement, and Kineto (the profiler's library)
# writes a line to stderr at each start and stop at every log level it has; 6 is above them all.
# Read when torch is imported; an explicit setting wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from bench import cases as case_lists  # noqa: E402
from bench import report  # noqa: E402
from bench.measure import QuadraticScaling, Settings, format_seconds, run_case  # noqa: E402
from bench.providers import PROVIDERS, select_providers  # noqa: E402

DEFAULT_MAX_REFERENCE_PAIRS = 256 * 1000 * 1000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes only (tests, CI)")
    parser.add_argument("--json", metavar="PATH", help="write all results and the machine to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory against C")
    parser.add_argument("--providers", nargs="+", default=[], metavar="NAME",
                        choices=[p.name for p in PROVIDERS], help="run only these providers")
    parser.add_argument("--max-reference-pairs", type=float, default=DEFAULT_MAX_REFERENCE_PAIRS,
                        metavar="N", help="largest B*C^2 at which the pairwise reference runs "
                        f"(default {DEFAULT_MAX_REFERENCE_PAIRS:.3g}: B=256, C=1000)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch.set_num_threads(N) first (default: torch's own choice)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = report.machine_info()
    print(report.describe_machine(info), flush=True)
    warning = report.busy_warning(info["cpu_busy_before_start"])
    if warning:
        print(warning, flush=True)
    providers = select_providers(args.providers)
    cases = case_lists.quick_cases() if args.quick else case_lists.full_cases()
    # smallest first: a quadratic provider's size is predicted from its largest smaller run
    cases.sort(key=lambda case: case.pairs)
    settings = Settings(target_seconds=0.2 if args.quick else 1.0,
                        max_reference_pairs=int(args.max_reference_pairs))
    scaling = QuadraticScaling()
    results, oracles = [], {}
    for index, case in enumerate(cases, 1):
        case_results, oracles[case.name] = run_case(case, providers, scaling, settings)
        results.extend(case_results)
        print(report.case_line(index, len(cases), case, case_results, oracles[case.name],
                               time.perf_counter() - started), flush=True)
    print()
    print(report.format_table(cases, results, oracles))
    headlines = [(case, report.headline_ratios(case, results))
                 for case in case_lists.headline_cases(cases, report.HEADLINE_RATIOS)]
    for case, ratios in headlines:
        print()
        print(report.format_ratios(case, ratios))
    wall_seconds = time.perf_counter() - started
    info["load_average_at_end"] = report.load_average()
    print(f"load average at the end: {info['load_average_at_end'][0]:.2f} (1 min)")
    if args.json:
        report.write_json(args.json, info, settings, cases, results, oracles, headlines,
                          wall_seconds)
        print(f"wrote {args.json}")
    if args.plot:
        report.write_plot(args.plot, cases, results)
        print(f"wrote {args.plot}")
    print(f"wall time {format_seconds(wall_seconds)}")


if __name__ == "__main__":
    main()
