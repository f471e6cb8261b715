"""Running one case: the float64 oracle, then for each provider a warm-up pass, one pass under the
meter's peak-memory counter (its outputs are compared with the oracle), and the timed passes
(``bench.devices``: on CPU, or on a GPU with rotating inputs).

Quadratic providers (the pairwise reference) are not attempted where they would not fit in memory,
nor above a ``B * C^2`` cap that keeps the run short; their size and time are then predicted from
their own largest measured case, scaled by ``B * C^2`` (the reference's memory and work are
dominated by its ``B x C x C`` tensors).
"""

import dataclasses
import time
from typing import Optional

import torch

from bench.cases import PER_ROW, SHARED, make_inputs
from bench.providers import (KL_DIV, ORACLE, REFERENCE, REFERENCE_COMPILED, float64_copies,
                             make_passes, oracle_loss)
from bench.report import format_bytes, format_seconds
from gkl_kernels.testing.launches import count_step

MEMORY_FRACTION = 0.8  # attempt a quadratic run only if its predicted peak is under this share
# the plan of a run (bench.progress): seconds of one forward+backward step per B*C^2 (quadratic
# providers, the float64 oracle) or per B*C, as on the 2-core CPU of bench/results/cpu.json
SECONDS_PER_PAIR = {REFERENCE: 2.8e-8, REFERENCE_COMPILED: 8.5e-9, ORACLE: 1e-7}
SECONDS_PER_ELEMENT = {KL_DIV: 4e-9}
PACKAGE_SECONDS_PER_ELEMENT = 3e-8
MIN_STEP_SECONDS = 1e-3
COMPILE_SECONDS = 8.0  # torch.compile of the reference for one case, warm caches


@dataclasses.dataclass
class Settings:
    """``target_seconds``: time each provider for at least this long on CPU.
    ``max_reference_pairs``: largest ``B * C^2`` a quadratic provider is run at;
    ``max_oracle_pairs``: the float64 pairwise oracle (a second of CPU time per 2^24 pairs);
    above it the oracle is the reference's O(C) identity in float64."""

    target_seconds: float
    max_reference_pairs: int
    max_oracle_pairs: int = 2**26


@dataclasses.dataclass
class Result:
    """One provider on one case. Times are medians in seconds of the forward pass, the backward
    pass and forward+backward (``seconds``; ``seconds_min`` the fastest, ``repeats`` how many were
    timed on CPU); errors are the largest absolute differences from the float64 oracle (``None``:
    not comparable or not needed). ``skipped`` holds the reason a run was not attempted, with the
    predicted peak and time."""

    case: str
    batch: int
    classes: int
    provider: str
    dtype: str = "float32"
    seconds: Optional[float] = None
    forward_seconds: Optional[float] = None
    backward_seconds: Optional[float] = None
    seconds_min: Optional[float] = None
    repeats: int = 0
    peak_bytes: Optional[int] = None
    loss_error: Optional[float] = None
    student_grad_error: Optional[float] = None
    teacher_grad_error: Optional[float] = None
    skipped: Optional[str] = None
    predicted_bytes: Optional[int] = None
    predicted_seconds: Optional[float] = None
    floor_bandwidth: Optional[float] = None  # GPU: floor bytes / forward+backward seconds
    copy_fraction: Optional[float] = None  # GPU: floor_bandwidth / device-to-device copy's
    # kernel launches and host syncs (``.item()``) of one step, per pass and in all
    # (``gkl_kernels.testing.launches.StepLaunches.fields``), counted at B = ``counted_batch`` by
    # ``counted_with``; ``None``: not counted (a skipped run)
    forward_launches: Optional[int] = None
    backward_launches: Optional[int] = None
    launches: Optional[int] = None
    forward_host_syncs: Optional[int] = None
    backward_host_syncs: Optional[int] = None
    host_syncs: Optional[int] = None
    launch_kinds: Optional[dict] = None  # per pass: aten, triton and compiled kernels
    counted_batch: Optional[int] = None
    counted_with: Optional[str] = None


@dataclasses.dataclass
class Oracle:
    """The float64 loss and gradients of a case, how they were computed, and at what cost."""

    loss: object
    grads: tuple
    kind: str
    seconds: float
    peak_bytes: int


class QuadraticScaling:
    """For each quadratic provider, the peak bytes and seconds measured at its largest ``B * C^2``
    so far; predictions scale both linearly in ``B * C^2``."""

    def __init__(self):
        self._largest = {}

    def record(self, name, pairs, peak_bytes, seconds):
        if pairs >= self._largest.get(name, (0,))[0]:
            self._largest[name] = (pairs, peak_bytes, seconds)

    def predict(self, name, pairs):
        """``(bytes, seconds)`` predicted at ``pairs``, or ``None`` before any measurement."""
        if name not in self._largest:
            return None
        measured_pairs, peak_bytes, seconds = self._largest[name]
        scale = pairs / measured_pairs
        return round(peak_bytes * scale), seconds * scale


def skip_reason(name, case, scaling, settings, available):
    """Why a quadratic run of ``name`` on ``case`` is not attempted (``None``: run it), and the
    predicted ``(bytes, seconds)`` (``None`` before any measurement: then it is run).
    ``available``: the bytes the device can still allocate (``None``: unknown)."""
    predicted = scaling.predict(name, case.pairs)
    if predicted is None:
        return None, None
    need, seconds = predicted
    if available is not None and need > MEMORY_FRACTION * available:
        return (f"would not fit: needs ~{format_bytes(need)} (predicted), "
                f"{format_bytes(available)} available"), predicted
    if case.pairs > settings.max_reference_pairs:
        reason = (f"B*C^2 = {case.pairs:.2g} over the cap {settings.max_reference_pairs:.2g}: "
                  f"~{format_bytes(need)}, ~{format_seconds(seconds)} per pass (predicted)")
        return reason, predicted
    return None, predicted


def inputs_on(device, case, seed=0):
    """``make_inputs(case, seed)`` on ``device``: leaf logits with the same ``requires_grad``,
    the tensor options moved along."""
    student, teacher, loss_kwargs = make_inputs(case, seed)
    student, teacher = (x.detach().to(device).requires_grad_(x.requires_grad)
                        for x in (student, teacher))
    kwargs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in loss_kwargs.items()}
    return student, teacher, kwargs


def compute_oracle(case, inputs, scaling, settings, meter):
    """Float64 loss and gradients of ``inputs``: the pairwise reference where it fits under the
    same rules as a quadratic provider, else the reference's O(C) identity
    (``pairwise=False``)."""
    reason, _ = skip_reason(ORACLE, case, scaling, settings, meter.available_bytes())
    pairwise = reason is None and case.pairs <= settings.max_oracle_pairs
    step = make_passes(oracle_loss(pairwise), *float64_copies(*inputs)).step
    start = time.perf_counter()
    peak, (loss, grads) = meter.peak_memory(step)
    seconds = time.perf_counter() - start
    if pairwise:
        scaling.record(ORACLE, case.pairs, peak, seconds)
    kind = "float64 pairwise reference" if pairwise else "float64 O(C) identity of the reference"
    return Oracle(loss, grads, kind, seconds, peak)


def run_provider(provider, case, input_sets, oracle, scaling, settings, meter):
    """Warm-up (compiles, for a compiled provider), a metered pass on the first input set, then
    the timed passes over all of them."""
    result = Result(case.name, case.batch, case.classes, provider.name, case.dtype)
    if provider.quadratic:
        result.skipped, predicted = skip_reason(provider.name, case, scaling, settings,
                                                meter.available_bytes())
        if result.skipped:
            result.predicted_bytes, result.predicted_seconds = predicted
            return result
    loss_fn = provider.build()
    passes = [make_passes(loss_fn, *inputs) for inputs in input_sets]
    passes[0].step()
    result.peak_bytes, (loss, grads) = meter.peak_memory(passes[0].step)
    if provider.exact:
        result.loss_error = abs(float(loss.double() - oracle.loss))
        errors = [float((g.double() - g64).abs().max()) for g, g64 in zip(grads, oracle.grads)]
        result.student_grad_error = errors[0]
        result.teacher_grad_error = errors[1] if len(errors) > 1 else None
    del loss, grads
    retained = [make_passes(loss_fn, *inputs, retain_graph=True) for inputs in input_sets]
    record_timing(result, meter.time(passes, retained))
    if provider.quadratic:
        scaling.record(provider.name, case.pairs, result.peak_bytes, result.seconds)
    if not provider.interpreted_counts:
        fields = count_step(passes[0].forward, passes[0].backward).fields()
        record_launches(result, fields, case.batch, COUNTED_HERE)
    return result


COUNTED_HERE = "this process, one more step after the timed ones"
COUNTED_INTERPRETED = "Triton's interpreter (python -m bench.traffic --steps), CPU tensors"


def record_launches(result, fields, batch, how):
    """Copy a step's launch and host-sync counts (``StepLaunches.fields()``) into ``result``,
    counted at B = ``batch`` by ``how``."""
    for name, value in fields.items():
        setattr(result, name, value)
    result.counted_batch, result.counted_with = batch, how


def record_interpreted_launches(results, rows):
    """Copy the rows of ``python -m bench.traffic --steps`` (``case``, ``provider``, ``batch``
    and the ``StepLaunches.fields()``) into the results of the same case and provider."""
    by_key = {(row["case"], row["provider"]): row for row in rows}
    for result in results:
        row = by_key.get((result.case, result.provider))
        if row:
            fields = {key: value for key, value in row.items()
                      if key not in ("case", "provider", "batch", "seconds")}
            record_launches(result, fields, row["batch"], COUNTED_INTERPRETED)


def record_timing(result, timing):
    """Copy a meter's ``Timing`` into a result's ``seconds`` (forward+backward median),
    ``seconds_min``, ``repeats``, ``forward_seconds`` and ``backward_seconds``."""
    result.seconds, result.seconds_min, result.repeats = timing.total, timing.total_min, \
        timing.repeats
    result.forward_seconds, result.backward_seconds = timing.forward, timing.backward


def untimed(provider, case, meter):
    """The result of a provider timed on a GPU only, on CPU: not timed (its launches are counted
    all the same, under Triton's interpreter)."""
    return Result(case.name, case.batch, case.classes, provider.name, case.dtype,
                  skipped=f"not timed on {meter.device} (Triton's interpreter)")


def timed_here(provider, meter):
    """Whether ``meter`` times ``provider``: providers timed on a GPU only are not timed on CPU
    (except in the GPU path's dry run)."""
    return meter.device != "cpu" or not provider.gpu_only or meter.dry_run


def planned_seconds(provider, case, settings, meter):
    """The plan's seconds for ``provider`` on ``case``: a warm-up, a metered and a counted step
    and the timed ones (at least ``target_seconds``, at least three steps); nothing where it is
    not run (over the cap, or not timed on this device)."""
    if not timed_here(provider, meter) or (provider.quadratic
                                           and case.pairs > settings.max_reference_pairs):
        return 0.0
    if provider.quadratic:
        step = SECONDS_PER_PAIR[provider.name] * case.pairs
    else:
        step = SECONDS_PER_ELEMENT.get(provider.name, PACKAGE_SECONDS_PER_ELEMENT) * case.elements
    step = max(step, MIN_STEP_SECONDS)
    compile_seconds = COMPILE_SECONDS if provider.name == REFERENCE_COMPILED else 0.0
    return compile_seconds + 3 * step + max(3 * step, settings.target_seconds)


def planned_oracle_seconds(case, settings):
    """The plan's seconds for the float64 oracle of ``case`` (pair weights' O(C) identity still
    builds ``B x C x C`` terms)."""
    pairwise = case.pairs <= settings.max_oracle_pairs or case.weights in (SHARED, PER_ROW)
    return SECONDS_PER_PAIR[ORACLE] * (case.pairs if pairwise else case.elements)


def run_case(case, providers, scaling, settings, meter, progress=None):
    """All providers on one case: ``(results, oracle)``. Providers timed on a GPU only are not
    timed on CPU: their results say so (``untimed``). ``progress(name, result)`` after the
    oracle (``name`` ``ORACLE``, the ``Oracle``) and after each provider (its ``Result``)."""
    report = progress or (lambda name, result: None)
    input_sets = [inputs_on(meter.device, case, seed) for seed in range(meter.input_sets(case))]
    oracle = compute_oracle(case, input_sets[0], scaling, settings, meter)
    report(ORACLE, oracle)
    results = []
    for p in providers:
        results.append(run_provider(p, case, input_sets, oracle, scaling, settings, meter)
                       if timed_here(p, meter) else untimed(p, case, meter))
        report(p.name, results[-1])
    return results, oracle
