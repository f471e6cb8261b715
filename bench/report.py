"""Output of ``python -m bench``: the per-case line, the table, the headline ratios, the machine
description, the JSON file and the plot."""

import dataclasses
import json
import os
import platform
import sys
import time

import torch
import triton

from bench.cases import HEADLINE_SHAPE, PLOT_SERIES
from bench.measure import format_bytes, format_seconds
from bench.providers import KL_DIV, PACKAGE, PROVIDERS, REFERENCE, REFERENCE_COMPILED

# per case group, (label, numerator provider, measured field, target): each ratio divides by the
# package's value; the targets are the issues' (rank-one weights: issue 2, shared (C, C): issue 3);
# None: no target, a ratio near 1 is the goal (plain KL distillation, a strictly cheaper loss)
KL_DIV_RATIOS = (
    ("F.kl_div time / package time", KL_DIV, "seconds", None),
    ("F.kl_div peak memory / package peak memory", KL_DIV, "peak_bytes", None),
)
HEADLINE_RATIOS = {
    "rank-one": (
        ("reference eager time / package time", REFERENCE, "seconds", 1000),
        ("torch.compile(reference) time / package time", REFERENCE_COMPILED, "seconds", 100),
        ("reference peak memory / package peak memory", REFERENCE, "peak_bytes", 100),
        ("torch.compile(reference) peak memory / package peak memory", REFERENCE_COMPILED,
         "peak_bytes", None),
        *KL_DIV_RATIOS,
    ),
    "shared": (
        ("reference eager time / package time", REFERENCE, "seconds", 20),
        ("reference peak memory / package peak memory", REFERENCE, "peak_bytes", 50),
        *KL_DIV_RATIOS,
    ),
}
COLUMNS = ("case", "shape", "dtype", "provider", "fwd", "bwd", "fwd+bwd", "peak mem", "|d loss|",
           "|d grad s|", "|d grad t|", "launches f+b", "syncs f+b", "note")
LAUNCH_LEGEND = (
    "launches f+b, syncs f+b: kernel launches and host syncs (.item()) of one forward + one "
    "backward pass, counted, not timed (bench.traffic.count_step): aten kernels by "
    "DispatchCounter, the kernels torch.compile generated (C++ on CPU, Triton on a GPU) by "
    "InductorKernelCounter, gkl_loss[triton]'s Triton launches and the torch ops around them "
    "under Triton's interpreter on CPU tensors (python -m bench.traffic --steps, a subprocess); "
    "at the case's shape, or at the B after @ (fewer rows, the same C and code path: launches do "
    "not depend on B).")


def machine_info(meter):
    """CPU model, core and thread counts, memory, load, the versions that matter, and what the
    timings are measured with: the meter, the GPU's name (``None`` on CPU and in a dry run) and
    its measured device-to-device copy bandwidth (bytes per second; also in a dry run, on
    CPU)."""
    cpu_model = platform.processor() or "unknown"
    memory_total = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu_model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                             if line.startswith("model name"))
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            memory_total = int(meminfo.readline().split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": memory_total,
        "load_average_1_5_15": load_average(),
        "cpu_busy_before_start": cpu_busy_fraction(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "timings": meter.label,
        "dry_run": meter.dry_run,
        "gpu": torch.cuda.get_device_name() if meter.device == "cuda" else None,
        "copy_bandwidth": meter.copy_bandwidth() if hasattr(meter, "copy_bandwidth") else None,
    }


def load_average():
    """The 1, 5 and 15 minute load averages (``[0, 0, 0]`` where the system has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else [0.0, 0.0, 0.0]


def cpu_busy_fraction(seconds=0.5):
    """The share of all CPUs' time spent busy (not idle, not waiting for I/O) over the next
    ``seconds``, from ``/proc/stat``; ``None`` where that file is absent (not Linux)."""
    def idle_and_total():
        with open("/proc/stat", encoding="ascii") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)
    try:
        idle_before, total_before = idle_and_total()
        time.sleep(seconds)
        idle_after, total_after = idle_and_total()
    except OSError:
        return None
    elapsed = total_after - total_before
    return 1.0 - (idle_after - idle_before) / elapsed if elapsed else 0.0


def busy_warning(busy):
    """A warning line when other processes kept the CPUs more than a quarter busy just before the
    run: torch's threads then wait for each other at every parallel region and times swing by up
    to two orders of magnitude."""
    if busy is not None and busy > 0.25:
        return (f"WARNING: the CPUs were {busy:.0%} busy before the start: other processes compete "
                f"and the times below are not reliable (run again on an idle machine, or with "
                f"--threads 1)")
    return None


def describe_machine(info):
    """One line of ``machine_info``."""
    load = info["load_average_1_5_15"]
    gpu = f"GPU {info['gpu']}; " if info["gpu"] else ""
    return (f"{gpu}{info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch threads "
            f"{info['torch_threads']}, memory {format_bytes(info['memory_total_bytes'] or 0)}, "
            f"load {load[0]:.2f} (1 min) at start, CPUs {info['cpu_busy_before_start'] or 0:.0%} "
            f"busy just before; torch {info['torch']}, triton "
            f"{info['triton']}, python {info['python']}")


def case_line(index, total, case, results, oracle, elapsed):
    """One line per finished case: each provider's median time (or "skipped") and the oracle."""
    parts = []
    for r in results:
        parts.append(f"{r.provider} {'skipped' if r.skipped else format_seconds(r.seconds)}")
    return (f"[{index}/{total}] {case.name} ({case.shape}): " + ", ".join(parts)
            + f"; {oracle.kind} {format_seconds(oracle.seconds)}"
            + f" [{format_seconds(elapsed)} elapsed]")


def add_bandwidth(case, results, copy_bandwidth):
    """On a GPU (or in its dry run): each timed result's achieved bandwidth, the floor bytes of
    ``case`` (``Case.floor_bytes``, forward plus backward) over its forward+backward time, and
    that as a share of the device-to-device copy's; nothing on CPU."""
    if not copy_bandwidth:
        return
    for r in results:
        if r.seconds:
            r.floor_bandwidth = sum(case.floor_bytes) / r.seconds
            r.copy_fraction = r.floor_bandwidth / copy_bandwidth


def _error(value):
    return "-" if value is None else f"{value:.1e}"


def table_rows(cases, results):
    """Rows of strings, one per result, in case order then provider order."""
    shapes = {case.name: case.shape for case in cases}
    rows = []
    for r in results:
        if r.skipped:
            forward = backward = "-"
            timing, peak, note = "skipped", "-", r.skipped
        else:
            forward = format_seconds(r.forward_seconds)
            backward = format_seconds(r.backward_seconds)
            timing, peak = format_seconds(r.seconds), format_bytes(r.peak_bytes)
            note = (f"median of {r.repeats}, min {format_seconds(r.seconds_min)}" if r.repeats
                    else "")
            if r.floor_bandwidth:
                note = (f"floor bytes at {r.floor_bandwidth / 1e9:.1f} GB/s, "
                        f"{r.copy_fraction:.0%} of the device copy's")
        rows.append((r.case, shapes[r.case], r.dtype, r.provider, forward, backward, timing, peak,
                     _error(r.loss_error), _error(r.student_grad_error),
                     _error(r.teacher_grad_error), *launch_cells(r), note))
    return rows


def launch_cells(result):
    """``("2+1", "0+0")``: the forward and backward launches (with ``@B=...`` where counted at
    fewer rows) and host syncs of a result; dashes where not counted."""
    if result.launches is None:
        return "-", "-"
    at = f" @B={result.counted_batch}" if result.counted_batch != result.batch else ""
    return (f"{result.forward_launches}+{result.backward_launches}{at}",
            f"{result.forward_host_syncs}+{result.backward_host_syncs}")


def format_table(cases, results, oracles, meter):
    """The results as an aligned text table, which oracle the errors of each case are from, and
    which providers were not timed on this device."""
    rows = [COLUMNS] + table_rows(cases, results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        if n == 0:
            lines.append("-" * len(lines[0]))
    for kind in sorted({oracle.kind for oracle in oracles.values()}):
        names = ", ".join(case.name for case in cases if oracles[case.name].kind == kind)
        lines.append(f"errors against the {kind}: {names}")
    timed = {r.provider for r in results if r.seconds is not None}
    untimed = [p.name for p in PROVIDERS if p.gpu_only and p.name not in timed]
    if untimed:
        lines.append(f"not timed on {meter.device}: {', '.join(untimed)} (runs in Triton's "
                     f"interpreter here: its launches are counted there, its traffic in part 4)")
    lines.append(LAUNCH_LEGEND)
    return "\n".join(lines)


def judged(case):
    """Whether the headline targets apply to ``case``: they were set for float32 logits at
    B=256, C=1000."""
    return (case.batch, case.classes) == HEADLINE_SHAPE and case.dtype == "float32"


def headline_ratios(case, results):
    """``[(label, ratio or None, target or None)]`` for ``case``: reference / package, from one
    run; no target where ``judged(case)`` is false."""
    by_provider = {r.provider: r for r in results if r.case == case.name and not r.skipped}
    package = by_provider.get(PACKAGE)
    ratios = []
    for label, provider, field, target in HEADLINE_RATIOS[case.group]:
        other = by_provider.get(provider)
        ratio = None
        if package and other and getattr(package, field):
            ratio = getattr(other, field) / getattr(package, field)
        ratios.append((label, ratio, target if judged(case) else None))
    return ratios


def format_ratios(case, ratios):
    """The ratios, with their targets where they apply (at B=256, C=1000)."""
    lines = [f"Ratios at {case.name} ({case.shape}, {case.group} weights), {case.dtype}, "
             f"forward+backward, measured in this run (package = {PACKAGE}):"]
    width = max(len(label) for label, _, _ in ratios)
    for label, ratio, target in ratios:
        if ratio is None:
            lines.append(f"  {label.ljust(width)}  n/a (a provider was skipped or not selected)")
        elif target is None:
            lines.append(f"  {label.ljust(width)}  {ratio:10.2f}x")
        else:
            verdict = "met" if ratio >= target else "MISSED"
            lines.append(f"  {label.ljust(width)}  {ratio:10.1f}x  (target >= {target}x: "
                         f"{verdict})")
    if not judged(case):
        batch, classes = HEADLINE_SHAPE
        lines.append(f"  (targets apply to float32 at B={batch}, C={classes}, without --quick)")
    return "\n".join(lines)


def write_json(path, info, settings, cases, results, oracles, headlines, traffic, compile_rows,
               wall_seconds, overhead=None, modelled_step=None):
    """Everything measured, with the machine description, as JSON: ``traffic`` the rows of
    ``bench.traffic``, ``compile_rows`` those of ``bench.compile_report`` (``None``: not run),
    ``overhead`` part 2 (``bench.overhead.run_overhead``), ``modelled_step`` part 3
    (``bench.traffic.modelled_step``, a model)."""
    payload = {
        "machine": info,
        "settings": dataclasses.asdict(settings),
        "wall_seconds": wall_seconds,
        "cases": [dataclasses.asdict(case) for case in cases],
        "oracles": {name: {"kind": o.kind, "seconds": o.seconds, "peak_bytes": o.peak_bytes}
                    for name, o in oracles.items()},
        "results": [dataclasses.asdict(r) for r in results],
        "headlines": [{"case": case.name, "group": case.group,
                       "ratios": [{"ratio": label, "value": value, "target": target}
                                  for label, value, target in ratios]}
                      for case, ratios in headlines],
        "overhead": overhead,
        "modelled_h100_step": modelled_step,
        "traffic": traffic,
        "compile_report": compile_rows,
    }
    with open(path, "w", encoding="utf-8") as out:
        json.dump(payload, out, indent=2)


def write_plot(path, cases, results, meter):
    """PNG: median forward+backward time and peak memory against C for the plot series, log
    scales, one line per provider (skipped points are absent)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    series = [case for case in cases if case.series == PLOT_SERIES]
    classes = {case.name: case.classes for case in series}
    batches = "/".join(str(b) for b in dict.fromkeys(case.batch for case in series))
    figure, (time_axis, memory_axis) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for provider in PROVIDERS:
        points = sorted((classes[r.case], r.seconds, r.peak_bytes) for r in results
                        if r.provider == provider.name and r.case in classes and not r.skipped)
        if not points:
            continue
        c, seconds, peak = zip(*points)
        time_axis.plot(c, seconds, marker="o", label=provider.name)
        memory_axis.plot(c, [p / 2**20 for p in peak], marker="o", label=provider.name)
    for axis, ylabel in ((time_axis, "forward+backward time, median (s)"),
                         (memory_axis, "peak memory (MiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("classes C")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"GKL loss, {series[0].dtype}, teacher weights, B={batches} as C grows; "
                    f"{meter.label}\n(missing points: not run, see the table)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
