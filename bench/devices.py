"""Where the benchmark runs: the CPU meter, the GPU meter, and the GPU meter's dry run on CPU.

A meter times the three passes of a loss (``bench.providers.Passes``), measures the peak memory of
one pass and the memory available, and says what it measured with:

- ``CpuMeter``: ``time.perf_counter`` around each pass, one pass after the other (CPU work is
  synchronous, so the forward and backward times of one step add up to its time); peak memory
  from the allocator's events (``gkl_kernels.testing.memory``).
- ``GpuMeter``: each pass timed on its own by ``triton.testing.do_bench`` (CUDA events, warm-up,
  the median; ``do_bench`` also overwrites the L2 cache before each call), each call on the next of
  several input sets whose total size exceeds the L2 cache, so no call finds its inputs cached;
  peak memory by ``torch.cuda.max_memory_allocated`` above what was allocated before.
- ``GpuMeter.dry_run_on_cpu()``: the same code on CPU tensors with CPU stand-ins for the three
  CUDA calls (``do_bench``, the peak-memory counters, the free-memory query), so that the GPU path
  is tested on machines without a GPU. Its figures are CPU figures and are labelled as a dry
  run.
"""

import dataclasses
import math
import statistics
import time
from typing import Callable

import torch

from gkl_kernels.testing.memory import available_memory_bytes, measure_peak_memory

L2_BYTES_FALLBACK = 50 * 2**20  # H100's L2, for devices that do not report theirs
MAX_INPUT_SETS = 8
COPY_BYTES = 2**30  # the device-to-device copy that measures the achievable bandwidth


@dataclasses.dataclass
class Timing:
    """Median seconds of the forward pass, the backward pass and the two together, the fastest
    forward+backward, and how many forward+backward passes were timed."""

    forward: float
    backward: float
    total: float
    total_min: float
    repeats: int


class CpuMeter:
    """Times passes on CPU tensors, one set of inputs (see the module docstring)."""

    device = "cpu"
    label = "CPU, time.perf_counter, median"
    dry_run = False

    def __init__(self, target_seconds, min_repeats=3, max_repeats=200):
        self.target_seconds = target_seconds
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats

    def input_sets(self, case):
        """How many input sets to rotate through: one (a CPU has no cache worth defeating at
        these sizes, and rotating would only add allocation)."""
        return 1

    def time(self, passes, _backward_passes):
        """``Timing`` of ``passes[0]``: forward and backward timed within each step, at least
        ``min_repeats`` steps and ``target_seconds`` in all, at most ``max_repeats``."""
        forward, backward = [], []
        while len(forward) < self.max_repeats and (
                len(forward) < self.min_repeats
                or sum(forward) + sum(backward) < self.target_seconds):
            start = time.perf_counter()
            loss = passes[0].forward()
            middle = time.perf_counter()
            passes[0].backward(loss)
            forward.append(middle - start)
            backward.append(time.perf_counter() - middle)
        totals = [f + b for f, b in zip(forward, backward)]
        return Timing(statistics.median(forward), statistics.median(backward),
                      statistics.median(totals), min(totals), len(totals))

    def peak_memory(self, fn):
        """``(peak bytes allocated during fn(), its result)``."""
        return measure_peak_memory(fn)

    def available_bytes(self):
        return available_memory_bytes()


@dataclasses.dataclass
class CudaCalls:
    """The CUDA calls of ``GpuMeter``: ``bench(fn) -> median milliseconds``, ``peak_memory(fn) ->
    (bytes, result)``, ``available_bytes() -> bytes``, ``l2_bytes``."""

    bench: Callable
    peak_memory: Callable
    available_bytes: Callable
    l2_bytes: int


def cuda_calls():
    """The real ones, on the current CUDA device."""
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def peak_memory(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, result

    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2_bytes = getattr(properties, "L2_cache_size", 0) or L2_BYTES_FALLBACK
    return CudaCalls(bench, peak_memory, lambda: torch.cuda.mem_get_info()[0], l2_bytes)


def cpu_stand_in_calls(repeats=3):
    """CPU stand-ins for the dry run: the median of ``repeats`` timed calls after one warm-up
    call (milliseconds, as ``do_bench``), the CPU allocator's peak, the machine's free memory,
    and a small "L2" so that the dry run rotates several input sets."""
    def bench(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)
    return CudaCalls(bench, measure_peak_memory, available_memory_bytes, l2_bytes=2**16)


class GpuMeter:
    """Times passes on a GPU (see the module docstring); ``dry_run_on_cpu()`` makes one that runs
    the same code on CPU tensors with ``cpu_stand_in_calls``."""

    dry_run = False

    def __init__(self, calls=None, device="cuda"):
        self.calls = calls or cuda_calls()
        self.device = device
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU stand-ins"
        self.label = f"{name}, triton.testing.do_bench (CUDA events), median"

    @classmethod
    def dry_run_on_cpu(cls):
        meter = cls(cpu_stand_in_calls(), device="cpu")
        meter.dry_run = True
        meter.label = ("DRY RUN of the GPU path on CPU (CPU stand-ins for do_bench and the CUDA "
                       "memory counters): not GPU figures")
        return meter

    def input_sets(self, case):
        """Enough input sets that together they are twice the L2 cache (at least 2, at most
        ``MAX_INPUT_SETS``), so that consecutive calls never find their inputs in L2."""
        set_bytes = 2 * case.elements * torch.empty(0, dtype=case.torch_dtype).element_size()
        return max(2, min(MAX_INPUT_SETS, math.ceil(2 * self.calls.l2_bytes / set_bytes)))

    def time(self, passes, backward_passes):
        """``Timing`` with each pass timed on its own, rotating through the input sets:
        ``passes`` for the forward and forward+backward timings, ``backward_passes`` (their
        graphs retained) for the backward alone."""
        rotation = Rotation(len(passes))
        forward = self._seconds(lambda: passes[rotation.next()].forward())
        losses = [p.forward() for p in backward_passes]

        def backward():
            index = rotation.next()
            return backward_passes[index].backward(losses[index])

        backward = self._seconds(backward)
        losses.clear()  # frees the retained graphs
        total = self._seconds(lambda: passes[rotation.next()].step())
        return Timing(forward, backward, total, total, repeats=0)

    def _seconds(self, fn):
        return self.calls.bench(fn) / 1e3

    def peak_memory(self, fn):
        return self.calls.peak_memory(fn)

    def available_bytes(self):
        return self.calls.available_bytes()

    def copy_bandwidth(self, nbytes=COPY_BYTES):
        """Bytes per second of a device-to-device copy of ``nbytes`` (read plus write), the
        bandwidth a memory-bound kernel can reach on this device; ``nbytes`` shrinks to a quarter
        of the free memory where needed."""
        nbytes = min(nbytes, self.available_bytes() // 4)
        source = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        target = torch.empty_like(source)
        seconds = self._seconds(lambda: target.copy_(source))
        return 2 * nbytes / seconds


class Rotation:
    """Cycles through ``count`` indices."""

    def __init__(self, count):
        self.count = count
        self.index = count - 1

    def next(self):
        self.index = (self.index + 1) % self.count
        return self.index


def pick_meter(target_seconds, gpu_dry_run=False):
    """The GPU meter where CUDA is available, its dry run when asked, else the CPU meter."""
    if gpu_dry_run:
        return GpuMeter.dry_run_on_cpu()
    if torch.cuda.is_available():
        return GpuMeter()
    return CpuMeter(target_seconds)
