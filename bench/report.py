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
from bench.providers import (KL_DIV, ORACLE, PACKAGE, PROVIDERS, REFERENCE,
                             REFERENCE_COMPILED)

# per case group, (label, numerator provider, measured field, goal): each ratio divides the other
# provider's value by the package's (above 1: the package is faster or smaller); the goals are
# the project's (its issues: rank-one weights, shared (C, C) weights), the factor by which the
# package beats the reference at least; None: no goal (F.kl_div is plain KD, a cheaper loss)
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
# label -> (provider, field), for JSON files that carry the label only
RATIO_MEANINGS = {label: (provider, field) for ratios in HEADLINE_RATIOS.values()
                  for label, provider, field, _ in ratios}
PROVIDER_PHRASES = {
    REFERENCE: "the literal B x C x C reference (eager)",
    REFERENCE_COMPILED: "the B x C x C reference under torch.compile",
    KL_DIV: "F.kl_div (plain KD, a cheaper loss)",
}
GOALS_NOTE = ("the goals: what a user replacing the authors' B x C x C loss should gain at "
              "least, set by the project for float32 at B=256, C=1000")
WEIGHT_WORDS = {"prior": "class-prior", "teacher": "teacher", "explicit": "explicit-factor",
                "shared": "shared (C, C)", "per_row": "per-row (B, C, C)"}


def format_seconds(seconds):
    """``12.3 us``, ``4.56 ms`` or ``7.89 s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_bytes(nbytes):
    """``512 B``, ``1.5 KiB``, ``2.25 MiB``, ``3.1 GiB`` (powers of 1024)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{nbytes} B"


def times(factor):
    """``1008x``, ``3.1x``."""
    return f"{factor:.0f}x" if factor >= 10 else f"{factor:.1f}x"


def speed(ratio):
    """``1008x faster`` or ``3.1x slower``, ``ratio`` being the other's time over the
    package's."""
    return f"{times(ratio)} faster" if ratio >= 1 else f"{times(1 / ratio)} slower"


def comparison(ratio, field):
    """How the package compares, ``ratio`` being the other's value over the package's (seconds
    or peak bytes, lower is better): ``is 1008x faster``, ``is 3.1x slower``, ``uses 489x less
    peak memory``."""
    if field == "seconds":
        return f"is {speed(ratio)}"
    return (f"uses {times(ratio)} less peak memory" if ratio >= 1
            else f"uses {times(1 / ratio)} more peak memory")


def goal_text(ratio, field, target):
    """``at least 1000x faster: met``; empty without a goal."""
    if target is None:
        return ""
    what = "faster" if field == "seconds" else "less peak memory"
    verdict = "met" if ratio is not None and ratio >= target else "MISSED"
    return f"at least {target:g}x {what}: {verdict}"


def ratio_sentence(label, ratio, target):
    """One headline ratio (a ``HEADLINE_RATIOS`` label) as a sentence about gkl_loss."""
    provider, field = RATIO_MEANINGS[label]
    name = PROVIDER_PHRASES[provider]
    if ratio is None:
        return f"gkl_loss against {name}: n/a (a provider was skipped or not selected)"
    goal = goal_text(ratio, field, target)
    return f"gkl_loss {comparison(ratio, field)} than {name}" + (f" (goal: {goal})" if goal else "")


def describe_case(name, batch, classes, weights, dtype):
    """``imagenet (B=256 C=1000, class-prior weights, float32)``."""
    return f"{name} (B={batch} C={classes}, {WEIGHT_WORDS[weights]} weights, {dtype})"


COLUMNS = ("case", "shape", "dtype", "provider", "fwd", "bwd", "fwd+bwd", "peak mem", "|d loss|",
           "|d grad s|", "|d grad t|", "launches f+b", "syncs f+b", "note")
LAUNCH_LEGEND = (
    "launches f+b, syncs f+b: kernel launches and host syncs (.item()) of one forward + one "
    "backward pass, counted, not timed (gkl_kernels.testing.launches.count_step): aten kernels "
    "by DispatchCounter, the kernels torch.compile generated (C++ on CPU, Triton on a GPU) by "
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


def provider_line(case, name, result):
    """The progress line of one provider (or the oracle) on ``case``: its median step time."""
    if getattr(result, "skipped", None):
        timing = f"skipped ({result.skipped})"
    elif name == ORACLE:
        return (f"{case.name} ({case.shape}): oracle, {result.kind}, "
                f"{format_seconds(result.seconds)}")
    else:
        timing = f"{format_seconds(result.seconds)} per forward+backward step (median)"
    return f"{case.name} ({case.shape}): {name} {timing}"


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


def format_error(value):
    """``3.1e-07``, or ``-`` for ``None`` (not compared)."""
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
                     format_error(r.loss_error), format_error(r.student_grad_error),
                     format_error(r.teacher_grad_error), *launch_cells(r), note))
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


def format_headline(case, ratios):
    """The closing lines for one headline case: each ratio as a sentence."""
    goals = f"; {GOALS_NOTE}" if any(target for _, _, target in ratios) else ""
    lines = [describe_case(case.name, case.batch, case.classes, case.weights, case.dtype)
             + f"{goals}:"]
    lines += [f"  {ratio_sentence(label, ratio, target)}" for label, ratio, target in ratios]
    return "\n".join(lines)


def write_json(path, info, settings, cases, results, oracles, headlines, traffic, compile_rows,
               wall_seconds, overhead=None, modelled_step=None):
    """Everything measured, with the machine description, as JSON: ``traffic`` the rows of
    ``bench.traffic``, ``compile_rows`` those of ``tools.compile_report`` (``None``: not run),
    ``overhead`` part 2 (``bench.overhead.run_overhead``), ``modelled_step`` part 3
    (``tools.h100_model.modelled_step``, a model)."""
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
