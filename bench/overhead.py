"""Part 2 of ``python -m bench``: the per-call overhead of the package's plain-PyTorch path.

At B=32, C=10 and B=64, C=100 a step's time is all overhead (Python, dispatch, launches, value
checks), not arithmetic: there ``gkl_loss(..., backend="torch")`` with its default options and
checks, on class-prior weights (labels and a ``(C, C)`` prior) and on teacher weights, is timed
forward+backward against ``F.kl_div`` (``log_softmax`` of both logits, ``log_target=True``,
``reduction="batchmean"``: plain distillation, as part 1 times it), with the meter of part 1; the
project's goal is at most ``TARGET_RATIO`` times ``F.kl_div``'s time. The launches and host syncs
of each step are counted as in part 1 (``bench.traffic.count_step``). Also the Python time of one
call: the median wall time of a forward call under ``torch.no_grad()`` at the smallest shape (on a
GPU the host's time: nothing waits for the device).
"""

import statistics
import time

import torch

from bench.cases import PRIOR, TEACHER, Case
from bench.devices import CpuMeter
from bench.measure import format_seconds, inputs_on
from bench.providers import KL_DIV, PACKAGE, make_passes, select_providers
from bench.report import speed, times

SHAPES = ((32, 10), (64, 100))  # (B, C) where a step's time is overhead
SOURCES = ((PRIOR, "class prior (labels)"), (TEACHER, "teacher weights"))
TARGET_RATIO = 2.0  # gkl_loss[torch] at most this many times F.kl_div's forward+backward time
WARMUP_STEPS = 3
MIN_REPEATS, MAX_REPEATS = 20, 20000  # timed steps on CPU (the target time decides between)
MIN_CALLS, MAX_CALLS = 50, 20000  # timed forward calls for the Python time per call


def overhead_case(source, batch, classes):
    """The case of ``source`` weights at ``(batch, classes)`` with gkl_loss's default options."""
    return Case(f"overhead {source} B={batch} C={classes}", batch, classes, source, {})


def overhead_meter(meter, target_seconds):
    """The meter of part 1 on a GPU (and in its dry run); on CPU one that times more steps than
    part 1's (these steps take tens of microseconds)."""
    if meter.device == "cpu" and not meter.dry_run:
        return CpuMeter(target_seconds, min_repeats=MIN_REPEATS, max_repeats=MAX_REPEATS)
    return meter


def time_and_count(loss_fn, case, meter):
    """``(Timing, StepLaunches)`` of ``loss_fn`` on ``case`` after ``WARMUP_STEPS`` steps."""
    from bench.traffic import count_step  # bench.traffic imports bench.measure
    input_sets = [inputs_on(meter.device, case, seed) for seed in range(meter.input_sets(case))]
    passes = [make_passes(loss_fn, *inputs) for inputs in input_sets]
    retained = [make_passes(loss_fn, *inputs, retain_graph=True) for inputs in input_sets]
    for _ in range(WARMUP_STEPS):
        passes[0].step()
    timing = meter.time(passes, retained)
    return timing, count_step(passes[0])


def python_seconds_per_call(loss_fn, case, device, target_seconds):
    """``(median wall seconds of one forward call under torch.no_grad(), calls timed)``."""
    student, teacher, loss_kwargs = inputs_on(device, case)
    times = []
    with torch.no_grad():
        for _ in range(WARMUP_STEPS):
            loss_fn(student, teacher, **loss_kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        while len(times) < MAX_CALLS and (len(times) < MIN_CALLS
                                          or sum(times) < target_seconds):
            start = time.perf_counter()
            loss_fn(student, teacher, **loss_kwargs)
            times.append(time.perf_counter() - start)
        if device == "cuda":
            torch.cuda.synchronize()
    return statistics.median(times), len(times)


def _step(timing, launches):
    return {"seconds": timing.total, "forward_seconds": timing.forward,
            "backward_seconds": timing.backward, "seconds_min": timing.total_min,
            "repeats": timing.repeats, **launches.fields()}


def run_overhead(meter, target_seconds):
    """Time and count both providers at ``SHAPES``: the JSON form, with ``rows`` (one per shape
    and weight source: the package's step, F.kl_div's, their ratio and whether it meets
    ``TARGET_RATIO``) and ``python_seconds_per_call`` at the smallest shape."""
    timed = overhead_meter(meter, target_seconds)
    package, kl_div = (provider.build() for provider in select_providers([PACKAGE, KL_DIV]))
    rows = []
    for batch, classes in SHAPES:
        # F.kl_div ignores the weights: one timing per shape, on the class-prior case's logits
        kl_div_step = _step(*time_and_count(kl_div, overhead_case(PRIOR, batch, classes), timed))
        for source, label in SOURCES:
            package_step = _step(*time_and_count(package, overhead_case(source, batch, classes),
                                                 timed))
            ratio = package_step["seconds"] / kl_div_step["seconds"]
            rows.append({"weights": source, "weights_label": label, "batch": batch,
                         "classes": classes, "package": package_step, "kl_div": kl_div_step,
                         "ratio": ratio, "target": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
                         "ratio_min": package_step["seconds_min"] / kl_div_step["seconds_min"]})
    batch, classes = SHAPES[0]
    per_call = {"batch": batch, "classes": classes, "seconds": {}, "calls": {}}
    for key, loss_fn, source in (("package_prior", package, PRIOR),
                                 ("package_teacher", package, TEACHER),
                                 ("kl_div", kl_div, PRIOR)):
        per_call["seconds"][key], per_call["calls"][key] = python_seconds_per_call(
            loss_fn, overhead_case(source, batch, classes), meter.device, target_seconds / 2)
    return {"label": timed.label, "package": PACKAGE, "kl_div": KL_DIV,
            "options": "gkl_loss's default options and value checks (check_values=True)",
            "target": TARGET_RATIO, "rows": rows, "python_seconds_per_call": per_call}


def slower_text(ratio):
    """``7.1x slower than F.kl_div`` for ``ratio`` = the package's time / F.kl_div's."""
    return f"{speed(1 / ratio)} than {KL_DIV}"


def goal_text(met):
    """The goal of ``TARGET_RATIO`` and this run's verdict."""
    return f"goal: at most {TARGET_RATIO:g}x slower: {'met' if met else 'MISSED'}"


def ratio_lines(row):
    """``gkl_loss[torch] fwd+bwd 412 us vs F.kl_div 80 us: 5.2x slower than F.kl_div (goal: at
    most 2x slower: MISSED)`` (medians) with the weights and the shape; then the fastest steps'
    ratio (less sensitive to other processes) and both steps' launches and host syncs."""
    package, kl_div = row["package"], row["kl_div"]
    return (f"  {row['weights_label']}, B={row['batch']} C={row['classes']}: {PACKAGE} fwd+bwd "
            f"{format_seconds(package['seconds'])} vs {KL_DIV} "
            f"{format_seconds(kl_div['seconds'])}: {slower_text(row['ratio'])} "
            f"({goal_text(row['met'])})\n"
            f"    fastest steps {format_seconds(package['seconds_min'])} vs "
            f"{format_seconds(kl_div['seconds_min'])}: {slower_text(row['ratio_min'])}; "
            f"launches per step {package['launches']} (fwd {package['forward_launches']} + bwd "
            f"{package['backward_launches']}) vs {kl_div['launches']}, host syncs "
            f"{package['host_syncs']} vs {kl_div['host_syncs']}")


def headline(payload):
    """One closing line: the range of the package's slowdown against F.kl_div over the rows."""
    rows = payload["rows"]
    low, high = (f(row["ratio"] for row in rows) for f in (min, max))
    if low >= 1:
        span = f"{times(low)} to {times(high)} slower than"
    elif high < 1:
        span = f"{times(1 / high)} to {times(1 / low)} faster than"
    else:
        span = f"between {times(1 / low)} faster and {times(high)} slower than"
    first, _, rest = span.partition(" to ")
    if rest.startswith(first + " "):  # one factor after rounding
        span = rest
    shapes = ", ".join(dict.fromkeys(f"B={row['batch']} C={row['classes']}" for row in rows))
    missed = sum(not row["met"] for row in rows)
    verdict = "met" if not missed else f"MISSED in {missed} of {len(rows)}"
    return (f"where a step is all overhead ({shapes}): gkl_loss is {span} {KL_DIV} "
            f"(goal: at most {TARGET_RATIO:g}x slower, so that a small model's loss "
            f"costs at most twice plain KD's: {verdict})")


def format_overhead(payload):
    """The section's lines: one ratio per shape and weight source (times are medians), then the
    Python time."""
    lines = [ratio_lines(row) for row in payload["rows"]]
    per_call = payload["python_seconds_per_call"]
    seconds = per_call["seconds"]
    lines.append(
        f"  Python time per call (wall time of one forward call under torch.no_grad(), "
        f"B={per_call['batch']} C={per_call['classes']}, median of at least {MIN_CALLS} calls): "
        f"{PACKAGE} {format_seconds(seconds['package_prior'])} with a class prior, "
        f"{format_seconds(seconds['package_teacher'])} with teacher weights; {KL_DIV} "
        f"{format_seconds(seconds['kl_div'])}")
    return "\n".join(lines)
