"""Part 2 of ``python -m bench``: the overhead, where a step's time is Python, dispatch, launches
and value checks rather than arithmetic.

The goal, judged: the host time of one step of the Triton path, ``gkl_loss[triton]`` with its
Triton launches stubbed and its value checks as on a GPU (``host_seconds_per_step``, run under
Triton's interpreter by ``python -m bench.traffic --steps``), at most ``HOST_TARGET_RATIO`` times
``F.kl_div``'s at B=32, C=10: on a GPU a step takes at least its host time unless the model's
work hides it. Reported, not judged: ``gkl_loss(..., backend="torch")``, the exact CPU fallback
(not a speed target), with its default options and checks, on class-prior weights (labels and a
``(C, C)`` prior) and on teacher weights, timed forward+backward against ``F.kl_div``
(``log_softmax`` of both logits, ``log_target=True``, ``reduction="batchmean"``: plain
distillation, as part 1 times it) at B=32, C=10 and B=64, C=100, with the meter of part 1; the
launches and host syncs of each step counted as in part 1; and the Python time of one call (a
forward call under ``torch.no_grad()`` at the smallest shape; on a GPU the host's time).
"""

import contextlib
import statistics
import time

import torch

from bench.cases import IMAGENET, PRIOR, TEACHER, Case, make_inputs
from bench.devices import CpuMeter
from bench.measure import inputs_on
from bench.providers import KL_DIV, PACKAGE, PACKAGE_TRITON, make_passes, select_providers
from bench.report import format_seconds, speed, times
from gkl_kernels.testing.launches import (count_step, triton_launches_stubbed,
                                          value_checks_as_on_a_gpu)

SHAPES = ((32, 10), (64, 100))  # (B, C) where a step's time is overhead
SOURCES = ((PRIOR, "class prior (labels)"), (TEACHER, "teacher weights"))
HOST_STEP_CASE = Case("host", 32, 10, PRIOR, IMAGENET)  # where the host time is measured
HOST_TARGET_RATIO = 1.5  # gkl_loss[triton]'s host time per step at most this many F.kl_div's
HOST_STEPS, HOST_WARMUP_STEPS = 400, 20
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
    input_sets = [inputs_on(meter.device, case, seed) for seed in range(meter.input_sets(case))]
    passes = [make_passes(loss_fn, *inputs) for inputs in input_sets]
    retained = [make_passes(loss_fn, *inputs, retain_graph=True) for inputs in input_sets]
    for _ in range(WARMUP_STEPS):
        passes[0].step()
    timing = meter.time(passes, retained)
    return timing, count_step(passes[0].forward, passes[0].backward)


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


def host_seconds_per_step(provider_name, case=HOST_STEP_CASE, steps=HOST_STEPS):
    """Median wall time of ``steps`` forward+backward steps of the provider named
    ``provider_name`` on ``make_inputs(case)`` (CPU), after a warm-up: ``gkl_loss[triton]`` with
    its launches stubbed and its value checks as on a GPU (its host time; needs Triton's
    interpreter); ``F.kl_div`` as it runs, its arithmetic at that shape a few microseconds."""
    student, teacher, loss_kwargs = make_inputs(case)
    passes = make_passes(select_providers([provider_name])[0].build(), student, teacher,
                         loss_kwargs)
    triton_path = provider_name == PACKAGE_TRITON
    with value_checks_as_on_a_gpu(triton_path), \
            triton_launches_stubbed() if triton_path else contextlib.nullcontext():
        times = []
        for index in range(steps + HOST_WARMUP_STEPS):
            start = time.perf_counter()
            passes.step()
            if index >= HOST_WARMUP_STEPS:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def _step(timing, launches):
    return {"seconds": timing.total, "forward_seconds": timing.forward,
            "backward_seconds": timing.backward, "seconds_min": timing.total_min,
            "repeats": timing.repeats, **launches.fields()}


def run_overhead(meter, target_seconds):
    """Time and count both providers at ``SHAPES``: the JSON form, with ``rows`` (one per shape
    and weight source: the package's step, F.kl_div's and their ratio) and
    ``python_seconds_per_call`` at the smallest shape."""
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
                         "ratio": ratio,
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
            "rows": rows, "python_seconds_per_call": per_call}


def slower_text(ratio):
    """``7.1x slower than F.kl_div`` for ``ratio`` = the package's time / F.kl_div's."""
    return f"{speed(1 / ratio)} than {KL_DIV}"


def ratio_lines(row):
    """``gkl_loss[torch] fwd+bwd 412 us vs F.kl_div 80 us: 5.2x slower than F.kl_div``
    (medians) with the weights and the shape; then the fastest steps' ratio (less sensitive to
    other processes) and both steps' launches and host syncs."""
    package, kl_div = row["package"], row["kl_div"]
    return (f"  {row['weights_label']}, B={row['batch']} C={row['classes']}: {PACKAGE} fwd+bwd "
            f"{format_seconds(package['seconds'])} vs {KL_DIV} "
            f"{format_seconds(kl_div['seconds'])}: {slower_text(row['ratio'])}\n"
            f"    fastest steps {format_seconds(package['seconds_min'])} vs "
            f"{format_seconds(kl_div['seconds_min'])}: {slower_text(row['ratio_min'])}; "
            f"launches per step {package['launches']} (fwd {package['forward_launches']} + bwd "
            f"{package['backward_launches']}) vs {kl_div['launches']}, host syncs "
            f"{package['host_syncs']} vs {kl_div['host_syncs']}")


def headline(payload):
    """One closing line: the range of the torch path's slowdown against F.kl_div over the rows,
    reported, not judged."""
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
    return (f"where a step is all overhead ({shapes}): gkl_loss's plain-PyTorch path, the exact "
            f"CPU fallback (not a speed target), is {span} {KL_DIV}")


def format_overhead(payload, step):
    """The section's lines: the judged goal (``host_sentence`` of the modelled step's JSON;
    ``None``: not measured), then, reported, one ratio per shape and weight source (times are
    medians) and the Python time."""
    lines = ["  judged: " + (host_sentence(step) if step else
                             "host time not measured: python -m bench.traffic --steps failed"),
             f"  reported, not judged ({PACKAGE}, the exact CPU fallback, is not a speed target):"]
    lines += [ratio_lines(row) for row in payload["rows"]]
    per_call = payload["python_seconds_per_call"]
    seconds = per_call["seconds"]
    lines.append(
        f"  Python time per call (wall time of one forward call under torch.no_grad(), "
        f"B={per_call['batch']} C={per_call['classes']}, median of at least {MIN_CALLS} calls): "
        f"{PACKAGE} {format_seconds(seconds['package_prior'])} with a class prior, "
        f"{format_seconds(seconds['package_teacher'])} with teacher weights; {KL_DIV} "
        f"{format_seconds(seconds['kl_div'])}")
    return "\n".join(lines)


def host_goal(step):
    """``(ratio, met)``: ``gkl_loss[triton]``'s host time per step over ``F.kl_div``'s, from the
    modelled step's JSON (``tools.h100_model.modelled_step``), and whether it is at most
    ``HOST_TARGET_RATIO``."""
    package, kl_div = step["steps"]
    ratio = package["host_seconds"] / kl_div["host_seconds"]
    return ratio, ratio <= HOST_TARGET_RATIO


def host_sentence(step):
    """The judged overhead goal as one sentence: both host times, their ratio (two decimals, as
    ``1.47x slower``: the goal's bar is 1.5x), the verdict."""
    package, kl_div = step["steps"]
    ratio, met = host_goal(step)
    compared = f"{ratio:.2f}x slower" if ratio >= 1 else f"{1 / ratio:.2f}x faster"
    return (f"host time of one step at B={step['host_batch']} C={step['host_classes']}, "
            f"measured on this CPU (median of {HOST_STEPS} steps; {package['provider']} with its "
            f"Triton launches stubbed and its value checks as on a GPU): {package['provider']} "
            f"{format_seconds(package['host_seconds'])} vs {kl_div['provider']} "
            f"{format_seconds(kl_div['host_seconds'])}, {compared} than {kl_div['provider']} "
            f"(goal: at most {HOST_TARGET_RATIO:g}x slower, as on a GPU a step takes at least its "
            f"host time unless the model's work hides it: {'met' if met else 'MISSED'})")
