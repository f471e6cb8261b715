"""``python -m bench.fused_linear``: the loss of a language model's output layer fused with GKL
distillation, ``fused_linear_gkl``, against the unfused path and Liger-Kernel's fused linear JSD
loss, on CPU.

Every provider runs forward and backward of a distillation loss on the logits of two linear
heads, ``student_hidden (N, H) @ student_weight (V, H)^T`` and the same for the teacher (frozen,
no gradient), and returns the gradients of the student's hidden states and weight:

- ``unfused``: ``F.linear`` twice (the teacher's under ``torch.no_grad``), then
  ``gkl_loss(backend="torch")`` on the two ``(N, V)`` logit tensors;
- ``fused`` (default chunk size) and ``fused-chunk1024``: ``fused_linear_gkl(backend="torch")``,
  a chunk of rows at a time, so that no ``(N, V)`` tensor exists;
- ``liger-jsd`` and ``liger-jsd-eager``: ``LigerFusedLinearJSDLoss`` (a different loss, JSD with
  ``beta=0.5``, distillation term only: ``weight_hard_loss=0``, ``weight_soft_loss=1``) with its
  default ``compiled=True`` (``torch.compile`` of each chunk's loss and gradient; Dynamo's caches
  are cleared at each size, so the warm-up step compiles for that size) and with
  ``compiled=False``; 1024-row chunks (its default).

``--trainer`` compares the trainer-facing losses, hard cross-entropy plus distillation term with
Liger's default weights ``weight_hard_loss = weight_soft_loss = 0.5``, at ``TRAINER_SIZES``:
``trainer-gkl`` (``FusedLinearDistillationLoss``, GKL), ``trainer-jsd`` (the same with
``divergence="jsd"``, ``beta=0.5``, 1024-row chunks: ``FusedLinearJSDLoss``'s loss), both
``compiled=True``, and ``liger-trainer`` (``LigerFusedLinearJSDLoss`` compiled, the same
weights), judged against Liger's time and peak memory.

``--lm-cases`` reports (no goal) the language-model trainer's cases at ``GOAL_SIZE`` in float32
and bfloat16: ``soft-jsd`` (the trainer loss as TRL's divergence: JSD, ``beta=0.5``, no hard
term, compiled), ``soft-jsd-half-masked`` (the same with every other token masked: those rows are
never projected), ``trl-jsd-half-masked`` (TRL 1.16's ``_chunked_divergence_loss`` on the same
mask), ``trainer-gkl`` and ``trainer-gkl-top64`` (the same loss against the teacher's top-64
log-probabilities, cached at the first step).

All GKL providers use the loss's default options (weights from the teacher, ``gamma=1``,
``T=1``). Inputs are drawn once per size with ``torch.manual_seed``: hidden states ``N(0, 1)``,
weights ``N(0, 1/H)`` (logits of unit scale), labels uniform in ``[0, V)`` with about 10% set to
``ignore_index=-100`` (those rows drop out of every loss).

Per provider and size: one warm-up step; one step under
``gkl_kernels.testing.memory.measure_peak_memory`` (the peak of CPU tensor memory allocated during
the step: the inputs are not counted, the gradients and every intermediate are); then at least
``--repeats`` timed steps (``bench.devices.CpuMeter``: ``time.perf_counter``, median). FLOPs are
those of the four matmuls every provider does, ``8 N V H`` (student and teacher logits, the
student's gradients of hidden and weight); GFLOP/s is that over the median time. The floor is the
bytes any implementation keeps alive: both models' weights and hidden states and the student's
gradients of both (``3 (V + N) H`` elements); a step itself must allocate a third of it, the
gradients. A provider is skipped at a size where its estimate (the floor plus eight float32
``(rows, V)`` tensors, rows ``N`` unfused, one chunk fused) exceeds the available memory less a
margin.
"""

import os

# The memory meter starts the profiler once per measurement, and Kineto writes a line to stderr at
# each start and stop unless its log level is above them all (as in ``bench.__main__``).
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import report  # noqa: E402
from bench.devices import CpuMeter  # noqa: E402
from bench.measure import record_timing  # noqa: E402
from bench.providers import Passes  # noqa: E402
from bench.report import format_bytes, format_error, format_seconds  # noqa: E402
from gkl_kernels import (FusedLinearDistillationLoss, SparseTeacher, fused_linear_gkl,  # noqa: E402
                         gkl_loss)
from gkl_kernels.fused_linear import default_chunk_size  # noqa: E402
from gkl_kernels.testing.dispatch import DispatchCounter  # noqa: E402
from gkl_kernels.testing.memory import available_memory_bytes  # noqa: E402

IGNORE_INDEX = -100
IGNORED_FRACTION = 0.1
MEMORY_MARGIN_BYTES = 2 * 2**30  # left to the rest of the machine when deciding to skip
WORKING_TENSORS = 8  # float32 (rows, V) tensors a step keeps alive at once, for the estimate
FUSED_CHUNK = 1024  # the explicit chunk size of the second fused provider
LIGER_CHUNK = 1024  # LigerFusedLinearJSDLoss's default chunk_size
TARGET_SECONDS = 2.0  # time each provider for at least this long (and at least --repeats steps)
UNFUSED, FUSED, FUSED_CHUNKED = "unfused", "fused", f"fused-chunk{FUSED_CHUNK}"
LIGER, LIGER_EAGER = "liger-jsd", "liger-jsd-eager"
TRAINER_GKL, TRAINER_JSD, LIGER_TRAINER = "trainer-gkl", "trainer-jsd", "liger-trainer"
# --lm-cases: the soft JSD alone (TRL's loss), with half the tokens masked, TRL's own on those,
# and GKL against a teacher cached as its top-k
SOFT_JSD, HALF_MASKED, TRL_HALF_MASKED = "soft-jsd", "soft-jsd-half-masked", "trl-jsd-half-masked"
TOP_K = 64
TRAINER_TOP_K = f"trainer-gkl-top{TOP_K}"
TRAINER_WEIGHTS = dict(weight_hard_loss=0.5, weight_soft_loss=0.5)  # Liger's defaults
DISTILLATION_ONLY = dict(weight_hard_loss=0.0, weight_soft_loss=1.0)  # liger-jsd's weights
GOAL_MEMORY_RATIO, GOAL_TIME_RATIO = 4.0, 1.5  # the issue's: fused peak / 4 or less, time x 1.5
# against Liger's fused linear JSD at GOAL_SIZE: time at most 1.0x, peak memory at most 0.6x
LIGER_TIME_RATIO, LIGER_MEMORY_RATIO = 1.0, 0.6


@dataclasses.dataclass(frozen=True)
class Size:
    """``tokens`` N rows, ``vocab`` V classes, ``hidden`` H the hidden size of both models."""

    tokens: int
    vocab: int
    hidden: int
    dtype: str = "float32"

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def element_bytes(self):
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def flops(self):
        """Of the four ``(N, H) x (H, V)``-sized matmuls: both models' logits, the student's
        gradients of hidden states and weight."""
        return 8 * self.tokens * self.vocab * self.hidden

    @property
    def floor_bytes(self):
        """Both models' weights and hidden states and the student's gradients of both."""
        return 3 * (self.vocab + self.tokens) * self.hidden * self.element_bytes

    @property
    def label(self):
        return f"N={self.tokens} V={self.vocab} H={self.hidden} {self.dtype}"


GOAL_SIZE = Size(8192, 32000, 512)
QUICK_SIZES = (Size(1024, 32000, 512), Size(4096, 32000, 512))
# The default: every N at (32000, 512), each larger V and H at N=4096, bfloat16 (about 20 minutes
# on 2 cores); --all-sizes: the whole grid N x V x H (about 5 hours on 2 cores).
DEFAULT_SIZES = (Size(1024, 32000, 512), Size(4096, 32000, 512), GOAL_SIZE,
                 Size(4096, 128256, 512), Size(4096, 32000, 2048),
                 Size(4096, 32000, 512, "bfloat16"))
TRAINER_SIZES = tuple(Size(n, v, 512, dtype) for n, v in ((8192, 32000), (4096, 128256))
                      for dtype in ("float32", "bfloat16"))
ALL_SIZES = (*(Size(n, v, h) for v in (32000, 128256) for h in (512, 2048)
               for n in (1024, 4096, 8192)),
             Size(4096, 32000, 512, "bfloat16"))


def parse_size(text):
    """``NxVxH`` or ``NxVxH:dtype`` (``float32``, ``bfloat16``, ``float16``) as a ``Size``."""
    shape, _, dtype = text.partition(":")
    try:
        tokens, vocab, hidden = (int(part) for part in shape.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not NxVxH[:dtype]: {text!r}") from None
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"unknown dtype {dtype!r} in {text!r}")
    return Size(tokens, vocab, hidden, dtype)


@dataclasses.dataclass
class Inputs:
    """The student's leaves (they get gradients), the frozen teacher's, and the labels."""

    student_hidden: torch.Tensor
    student_weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    labels: torch.Tensor


def make_inputs(size, seed=0):
    """Fresh random inputs of ``size`` (see the module docstring)."""
    torch.manual_seed(seed)
    n, v, h, dtype = size.tokens, size.vocab, size.hidden, size.torch_dtype
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < IGNORED_FRACTION] = IGNORE_INDEX
    return Inputs(torch.randn(n, h, dtype=dtype).requires_grad_(),
                  (torch.randn(v, h) / math.sqrt(h)).to(dtype).requires_grad_(),
                  torch.randn(n, h, dtype=dtype),
                  (torch.randn(v, h) / math.sqrt(h)).to(dtype),
                  labels)


@dataclasses.dataclass(frozen=True)
class Provider:
    """``build()`` returns a loss function ``fn(inputs) -> 0-dim loss``; it is called once per
    size (Liger's imports Liger-Kernel there: an ``ImportError`` says why it cannot run).
    ``working_rows(size)``: the rows of the provider's largest ``(rows, V)`` tensors.
    ``computes_gkl``: the GKL loss, compared with ``unfused``. ``eager``: runs aten ops one by
    one, so that ``DispatchCounter`` sees its traffic (compiled code is opaque to it)."""

    name: str
    build: Callable
    working_rows: Callable
    computes_gkl: bool = True
    eager: bool = True


def _unfused():
    def unfused_loss(inputs):
        student_logits = F.linear(inputs.student_hidden, inputs.student_weight)
        with torch.no_grad():
            teacher_logits = F.linear(inputs.teacher_hidden, inputs.teacher_weight)
        return gkl_loss(student_logits, teacher_logits, labels=inputs.labels, backend="torch")
    return unfused_loss


def _fused(chunk_size):
    def build():
        def fused_loss(inputs):
            return fused_linear_gkl(inputs.student_hidden, inputs.student_weight,
                                    inputs.teacher_hidden, inputs.teacher_weight,
                                    labels=inputs.labels, chunk_size=chunk_size,
                                    ignore_index=IGNORE_INDEX, backend="torch")
        return fused_loss
    return build


def _fused_default_rows(size):
    """``fused_linear_gkl``'s default chunk (fewer rows when N is smaller)."""
    return min(size.tokens, default_chunk_size(size.vocab, "cpu", size.dtype == "float32"))


def _module_loss(module):
    """A loss function calling ``module`` as Liger's fused linear losses are called."""
    def module_loss(inputs):
        return module(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden,
                      inputs.teacher_weight, inputs.labels)
    return module_loss


def _liger(compiled, weights=DISTILLATION_ONLY):
    """Liger's loss; Dynamo's caches cleared first, so that the warm-up step compiles for this
    size and no size meets the recompile limit (past it Dynamo quietly runs eager)."""
    def build():
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        torch._dynamo.reset()
        return _module_loss(LigerFusedLinearJSDLoss(**weights, beta=0.5,
                                                    ignore_index=IGNORE_INDEX,
                                                    compiled=compiled, chunk_size=LIGER_CHUNK))
    return build


def _trainer(divergence):
    """``FusedLinearDistillationLoss`` with ``TRAINER_WEIGHTS``: GKL, or JSD as
    ``FusedLinearJSDLoss`` (``beta=0.5``, Liger's chunk size), on the plain-PyTorch rows,
    ``compiled=True`` as Liger's."""
    def build():
        jsd = dict(divergence="jsd", beta=0.5, chunk_size=LIGER_CHUNK) if divergence == "jsd" \
            else {}
        torch._dynamo.reset()  # as Liger's: the warm-up step compiles for this size
        return _module_loss(FusedLinearDistillationLoss(**TRAINER_WEIGHTS, **jsd,
                                                        ignore_index=IGNORE_INDEX,
                                                        backend="torch", compiled=True))
    return build


def _soft_jsd(half_masked):
    """``FusedLinearDistillationLoss`` as TRL's divergence (JSD at ``beta=0.5``, no hard term,
    compiled), on the drawn labels or with every other token masked as well."""
    def build():
        torch._dynamo.reset()
        module = FusedLinearDistillationLoss(**DISTILLATION_ONLY, divergence="jsd", beta=0.5,
                                             ignore_index=IGNORE_INDEX, backend="torch",
                                             compiled=True)

        def soft_loss(inputs):
            labels = _half_masked(inputs.labels) if half_masked else inputs.labels
            return module(inputs.student_hidden, inputs.student_weight, inputs.teacher_hidden,
                          inputs.teacher_weight, labels)
        return soft_loss
    return build


def _half_masked(labels):
    """The labels with every other token masked as well (about half of them left)."""
    labels = labels.clone()
    labels[::2] = IGNORE_INDEX
    return labels


def _trl_half_masked():
    """TRL's ``_chunked_divergence_loss`` (``DistillationTrainer``'s, JSD at ``beta=0.5``) with
    the completion mask of ``_half_masked``: on CPU it projects every token and masks after."""
    def build():
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def trl_loss(inputs):
            mask = _half_masked(inputs.labels) != IGNORE_INDEX
            return _chunked_divergence_loss(inputs.student_hidden, inputs.teacher_hidden,
                                            inputs.student_weight, inputs.teacher_weight, mask,
                                            0.5)[0]
        return trl_loss
    return build


def _trainer_top_k():
    """``trainer-gkl`` against the teacher's top-``TOP_K`` log-probabilities (``SparseTeacher``,
    ``rest="rest"``), cached at the first step of a size (the offline teacher pass is not
    timed)."""
    def build():
        module = FusedLinearDistillationLoss(**TRAINER_WEIGHTS, ignore_index=IGNORE_INDEX,
                                             backend="torch")
        cached = {}

        def top_k_loss(inputs):
            if id(inputs) not in cached:
                with torch.no_grad():
                    logits = F.linear(inputs.teacher_hidden, inputs.teacher_weight).float()
                    values, indices = logits.log_softmax(dim=-1).topk(TOP_K, dim=-1)
                cached.clear()
                cached[id(inputs)] = SparseTeacher(indices, values, rest="rest")
            return module(inputs.student_hidden, inputs.student_weight, cached[id(inputs)],
                          None, inputs.labels)
        return top_k_loss
    return build


def _liger_rows(size):
    """Liger splits the rows into ``max(1, N // chunk_size)`` chunks with ``torch.chunk``."""
    return math.ceil(size.tokens / max(1, size.tokens // LIGER_CHUNK))


PROVIDERS = (
    Provider(UNFUSED, _unfused, lambda size: size.tokens),
    Provider(FUSED, _fused(None), _fused_default_rows),
    Provider(FUSED_CHUNKED, _fused(FUSED_CHUNK), lambda size: min(size.tokens, FUSED_CHUNK)),
    Provider(LIGER, _liger(True), _liger_rows, computes_gkl=False, eager=False),
    Provider(LIGER_EAGER, _liger(False), _liger_rows, computes_gkl=False),
    Provider(TRAINER_GKL, _trainer("gkl"), _fused_default_rows, computes_gkl=False,
             eager=False),
    Provider(TRAINER_JSD, _trainer("jsd"), lambda size: min(size.tokens, LIGER_CHUNK),
             computes_gkl=False, eager=False),
    Provider(LIGER_TRAINER, _liger(True, TRAINER_WEIGHTS), _liger_rows, computes_gkl=False,
             eager=False),
    Provider(SOFT_JSD, _soft_jsd(False), _fused_default_rows, computes_gkl=False, eager=False),
    Provider(HALF_MASKED, _soft_jsd(True), _fused_default_rows, computes_gkl=False,
             eager=False),
    Provider(TRL_HALF_MASKED, _trl_half_masked(), lambda size: min(size.tokens, LIGER_CHUNK),
             computes_gkl=False),
    Provider(TRAINER_TOP_K, _trainer_top_k(), lambda size: size.tokens, computes_gkl=False),
)
QUICK_PROVIDERS = (UNFUSED, FUSED, LIGER)
DEFAULT_PROVIDERS = (UNFUSED, FUSED, FUSED_CHUNKED, LIGER)
TRAINER_PROVIDERS = (TRAINER_GKL, TRAINER_JSD, LIGER_TRAINER)
LM_PROVIDERS = (SOFT_JSD, HALF_MASKED, TRL_HALF_MASKED, TRAINER_GKL, TRAINER_TOP_K)
LM_SIZES = (GOAL_SIZE, Size(8192, 32000, 512, "bfloat16"))


@dataclasses.dataclass
class Result:
    """One provider at one size: median forward+backward ``seconds`` (its forward and backward
    parts, the fastest, how many were timed), ``peak_bytes`` of one step, and against
    ``unfused``: the loss's absolute difference and the gradients' largest absolute difference
    relative to the largest unfused gradient. Counted in one more step (eager providers):
    ``bytes_moved`` (read + written by every kernel), ``launches``, ``host_syncs``. ``skipped``:
    why there is no number."""

    tokens: int
    vocab: int
    hidden: int
    dtype: str
    provider: str
    seconds: Optional[float] = None
    forward_seconds: Optional[float] = None
    backward_seconds: Optional[float] = None
    seconds_min: Optional[float] = None
    repeats: int = 0
    peak_bytes: Optional[int] = None
    loss: Optional[float] = None
    loss_error: Optional[float] = None
    grad_error: Optional[float] = None
    bytes_moved: Optional[int] = None
    launches: Optional[int] = None
    host_syncs: Optional[int] = None
    skipped: Optional[str] = None


def estimated_bytes(provider, size):
    """The floor plus ``WORKING_TENSORS`` float32 ``(rows, V)`` tensors."""
    return size.floor_bytes + WORKING_TENSORS * provider.working_rows(size) * size.vocab * 4


def memory_skip_reason(provider, size, available):
    """Why ``provider`` is not attempted at ``size`` (``None``: run it)."""
    need = estimated_bytes(provider, size)
    if available is not None and need > available - MEMORY_MARGIN_BYTES:
        return (f"skipped: would not fit, needs ~{format_bytes(need)} (estimated), "
                f"{format_bytes(available)} available")
    return None


def make_passes(loss_fn, inputs):
    """``Passes`` of one step: the loss, then ``torch.autograd.grad`` to the student's leaves."""
    leaves = [inputs.student_hidden, inputs.student_weight]
    return Passes(lambda: loss_fn(inputs), lambda loss: torch.autograd.grad(loss, leaves))


def compare(result, reference, loss, grads):
    """Fill ``result``'s differences from ``reference = (loss, grads)`` of ``unfused``."""
    reference_loss, reference_grads = reference
    result.loss_error = abs(float(loss) - float(reference_loss))
    result.grad_error = max(float((g.float() - r.float()).abs().max() / r.float().abs().max())
                            for g, r in zip(grads, reference_grads))


def failure_reason(error):
    """An exception as one line: its type and the first line of its message."""
    message = str(error).splitlines()
    return f"{type(error).__name__}: {message[0] if message else ''}"


def count_traffic(result, passes):
    """Run one more step under ``DispatchCounter``: the bytes every kernel it launches reads and
    writes (tensor sizes, at the aten dispatch level), the launches and the host syncs."""
    with DispatchCounter() as counter:
        passes.step()
    result.bytes_moved = counter.bytes_read + counter.bytes_written
    result.launches, result.host_syncs = counter.launches, counter.host_syncs


def run_provider(provider, size, inputs, meter, reference):
    """Warm-up, the metered step, the timed steps; ``(result, (loss, grads) of the metered
    step)``. A provider that cannot run here, or fails, has the reason in ``result.skipped``."""
    result = Result(size.tokens, size.vocab, size.hidden, size.dtype, provider.name)
    try:
        passes = make_passes(provider.build(), inputs)
        passes.step()
        result.peak_bytes, (loss, grads) = meter.peak_memory(passes.step)
        timing = meter.time([passes], None)
        if provider.eager:
            count_traffic(result, passes)
    except Exception as error:  # one line in the table instead of a number; the run goes on
        result.skipped = f"cannot run: {failure_reason(error)}"
        return result, None
    record_timing(result, timing)
    result.loss = float(loss)
    if provider.computes_gkl and reference is not None:
        compare(result, reference, loss, grads)
    return result, (loss, grads)


def run_size(size, providers, meter):
    """Every provider at ``size`` on one set of inputs (``unfused`` first: the reference)."""
    available = available_memory_bytes()
    skips = {p.name: memory_skip_reason(p, size, available) for p in providers}
    inputs = make_inputs(size)
    results, reference = [], None
    for provider in providers:
        if skips[provider.name]:
            results.append(Result(size.tokens, size.vocab, size.hidden, size.dtype,
                                  provider.name, skipped=skips[provider.name]))
            continue
        result, outputs = run_provider(provider, size, inputs, meter, reference)
        if provider.name == UNFUSED:
            reference = outputs
        results.append(result)
    return results


def find(results, size, provider):
    """The result of ``provider`` at ``size`` that has numbers, or ``None``."""
    for r in results:
        if ((r.tokens, r.vocab, r.hidden, r.dtype) == dataclasses.astuple(size)
                and r.provider == provider and not r.skipped):
            return r
    return None


def ratios(result, unfused):
    """``(time ratio, peak memory ratio)`` of ``result`` over ``unfused`` (``None`` each when
    either has no number)."""
    if result.skipped or unfused is None:
        return None, None
    return result.seconds / unfused.seconds, result.peak_bytes / unfused.peak_bytes


def size_of(result):
    return Size(result.tokens, result.vocab, result.hidden, result.dtype)


TABLE_LEGEND = (
    "GFLOP: 8 N V H per step (four matmuls); GFLOP/s: that over the median fwd+bwd time.",
    "floor: weights and hidden states of both models and the student's gradients, 3 (V + N) H "
    "elements. peak mem: what one step allocates (not the inputs); its floor is a third of "
    "floor, the gradients.",
    "moved, launches, syncs: bytes every kernel of one more step reads and writes, its kernels "
    "and host syncs, counted at the aten dispatch level (gkl_kernels.testing DispatchCounter; "
    "compiled code such as liger-jsd's is not countable); a step must move at least about "
    "floor (the weights and hidden states read once, the gradients written once).",
    "|d loss|, d grad: against unfused (d grad: largest difference / largest unfused gradient); "
    "liger-jsd computes another loss (JSD).",
)
COLUMNS = ("N", "V", "H", "dtype", "provider", "GFLOP", "floor", "fwd+bwd", "GFLOP/s",
           "peak mem", "t/unfused", "mem/unfused", "moved", "launches", "syncs", "|d loss|",
           "d grad", "note")


def _giga(value):
    """``value / 1e9`` to three significant digits, without an exponent."""
    value /= 1e9
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def _count(value, format_value):
    return "-" if value is None else format_value(value)


def table_row(result, results):
    """The cells of one result (ratios against ``unfused`` at the same size)."""
    size = size_of(result)
    head = (str(size.tokens), str(size.vocab), str(size.hidden), size.dtype, result.provider,
            _giga(size.flops), format_bytes(size.floor_bytes))
    if result.skipped:
        return head + ("-",) * 10 + (result.skipped,)
    time_ratio, memory_ratio = ratios(result, find(results, size, UNFUSED))
    return head + (format_seconds(result.seconds), _giga(size.flops / result.seconds),
                   format_bytes(result.peak_bytes), _ratio(time_ratio), _ratio(memory_ratio),
                   _count(result.bytes_moved, format_bytes), _count(result.launches, str),
                   _count(result.host_syncs, str), format_error(result.loss_error),
                   format_error(result.grad_error),
                   f"median of {result.repeats}, min {format_seconds(result.seconds_min)}")


def format_table(results):
    """The results as an aligned text table, with a legend of its columns."""
    rows = [COLUMNS] + [table_row(r, results) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + list(TABLE_LEGEND))


@dataclasses.dataclass
class Goal:
    """The issue's goal at ``GOAL_SIZE``: fused peak memory at least ``GOAL_MEMORY_RATIO`` x
    below unfused, with time within ``GOAL_TIME_RATIO`` x. ``memory_factor`` (unfused peak /
    fused peak), ``time_ratio`` (fused / unfused) and ``met`` are ``None`` where either was not
    measured; ``line`` says it all in words."""

    line: str
    memory_factor: Optional[float] = None
    time_ratio: Optional[float] = None
    met: Optional[bool] = None


def check_goal(results):
    """The ``Goal`` of these results."""
    goal = (f"Goal at {GOAL_SIZE.label}: fused peak memory >= {GOAL_MEMORY_RATIO:g}x below "
            f"unfused, time <= {GOAL_TIME_RATIO:g}x unfused:")
    fused, unfused = find(results, GOAL_SIZE, FUSED), find(results, GOAL_SIZE, UNFUSED)
    if fused is None or unfused is None:
        return Goal(f"{goal} n/a (fused or unfused not measured at that size; run without "
                    f"--quick or with --sizes 8192x32000x512)")
    time_ratio, memory_ratio = ratios(fused, unfused)
    memory_factor = 1 / memory_ratio
    met = memory_factor >= GOAL_MEMORY_RATIO and time_ratio <= GOAL_TIME_RATIO
    line = (f"{goal} {'met' if met else 'MISSED'}: peak {format_bytes(fused.peak_bytes)} vs "
            f"{format_bytes(unfused.peak_bytes)} ({memory_factor:.2f}x below), time "
            f"{format_seconds(fused.seconds)} vs {format_seconds(unfused.seconds)} "
            f"({time_ratio:.2f}x)")
    return Goal(line, memory_factor, time_ratio, met)


def check_liger_goal(results):
    """The ``Goal`` against ``liger-jsd`` at ``GOAL_SIZE`` (``memory_factor``: Liger's peak /
    fused peak, ``time_ratio``: fused / Liger), with the same ratios at every other size
    where both ran (a larger V among them) in ``line``."""
    goal = (f"Goal against {LIGER} at {GOAL_SIZE.label}: fused time <= {LIGER_TIME_RATIO:g}x, "
            f"peak memory <= {LIGER_MEMORY_RATIO:g}x {LIGER}'s:")
    pairs = [(size_of(r), r, find(results, size_of(r), LIGER)) for r in results
             if r.provider == FUSED and not r.skipped]
    pairs = [(size, fused, liger) for size, fused, liger in pairs if liger is not None]
    others = "; ".join(f"at {size.label} {_liger_ratios(fused, liger)}"
                       for size, fused, liger in pairs if size != GOAL_SIZE)
    others = f" ({others})" if others else ""
    at_goal = [(fused, liger) for size, fused, liger in pairs if size == GOAL_SIZE]
    if not at_goal:
        return Goal(f"{goal} n/a (fused or {LIGER} not measured at that size){others}")
    fused, liger = at_goal[0]
    time_ratio, memory_ratio = fused.seconds / liger.seconds, fused.peak_bytes / liger.peak_bytes
    met = time_ratio <= LIGER_TIME_RATIO and memory_ratio <= LIGER_MEMORY_RATIO
    return Goal(f"{goal} {'met' if met else 'MISSED'}: {_liger_ratios(fused, liger)}{others}",
                1 / memory_ratio, time_ratio, met)


def check_trainer_goal(results):
    """The ``Goal`` of the trainer-facing losses against ``liger-trainer`` at every size where
    both ran (``time_ratio``, ``memory_factor``: the worst of them)."""
    goal = (f"Goal of {TRAINER_GKL} and {TRAINER_JSD} against {LIGER_TRAINER}: time <= "
            f"{LIGER_TIME_RATIO:g}x, peak memory <= {LIGER_MEMORY_RATIO:g}x its:")
    pairs = [(size_of(r), r, find(results, size_of(r), LIGER_TRAINER)) for r in results
             if r.provider in (TRAINER_GKL, TRAINER_JSD) and not r.skipped]
    pairs = [(size, ours, liger) for size, ours, liger in pairs if liger is not None]
    if not pairs:
        return Goal(f"{goal} n/a (not measured; run with --trainer)")
    time_ratio = max(ours.seconds / liger.seconds for _, ours, liger in pairs)
    memory_ratio = max(ours.peak_bytes / liger.peak_bytes for _, ours, liger in pairs)
    met = time_ratio <= LIGER_TIME_RATIO and memory_ratio <= LIGER_MEMORY_RATIO
    lines = "; ".join(f"{ours.provider} at {size.label} {_liger_ratios(ours, liger)}"
                      for size, ours, liger in pairs)
    return Goal(f"{goal} {'met' if met else 'MISSED'}: {lines}", 1 / memory_ratio, time_ratio,
                met)


def lm_case_lines(results):
    """``--lm-cases``, reported (no goal): per size the half-masked soft JSD's time against the
    unmasked one and against TRL's on the same tokens, and the top-k teacher's step against the
    dense one."""
    lines = []
    for size in dict.fromkeys(size_of(r) for r in results):
        pairs = ((HALF_MASKED, SOFT_JSD, "half the tokens masked against all"),
                 (HALF_MASKED, TRL_HALF_MASKED, "half masked against TRL's chunked JSD"),
                 (TRAINER_TOP_K, TRAINER_GKL, f"top-{TOP_K} teacher against the dense"))
        for ours, other, what in pairs:
            a, b = find(results, size, ours), find(results, size, other)
            if a is not None and b is not None:
                lines.append(f"{size.label}: {what}: {ours} {_liger_ratios(a, b)}")
    return lines


def _liger_ratios(fused, liger):
    return (f"time {format_seconds(fused.seconds)} vs {format_seconds(liger.seconds)} "
            f"({fused.seconds / liger.seconds:.2f}x), peak {format_bytes(fused.peak_bytes)} vs "
            f"{format_bytes(liger.peak_bytes)} ({fused.peak_bytes / liger.peak_bytes:.2f}x)")


def size_line(index, total, size, results, elapsed):
    """One progress line per finished size."""
    parts = [f"{r.provider} {'skipped' if r.skipped else format_seconds(r.seconds)}"
             for r in results]
    return (f"[{index}/{total}] {size.label}: " + ", ".join(parts)
            + f" [{format_seconds(elapsed)} elapsed]")


def liger_version():
    try:
        return importlib.metadata.version("liger_kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def write_json(path, info, sizes, results, goals, wall_seconds):
    """Machine, sizes, every result and the goals (against unfused, against Liger) as JSON."""
    payload = {
        "machine": info,
        "sizes": [dict(dataclasses.asdict(s), flops=s.flops, floor_bytes=s.floor_bytes)
                  for s in sizes],
        "results": [dataclasses.asdict(r) for r in results],
        "goal": dataclasses.asdict(goals[0]),
        "liger_goal": dataclasses.asdict(goals[1]),
        "trainer_goal": dataclasses.asdict(goals[2]),
        "wall_seconds": wall_seconds,
    }
    with open(path, "w", encoding="utf-8") as out:
        json.dump(payload, out, indent=2)


def write_plot(path, results, meter):
    """PNG: median forward+backward time and peak memory against N, log scales, one row of
    panels per H (float32 sizes), one line per provider (colour) and V (line style)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    measured = [r for r in results if not r.skipped and r.dtype == "float32"]
    hiddens = sorted({r.hidden for r in measured}) or [None]
    vocabs = sorted({r.vocab for r in measured})
    figure, axes = pyplot.subplots(len(hiddens), 2, figsize=(11, 4.2 * len(hiddens)),
                                   squeeze=False)
    for (time_axis, memory_axis), hidden in zip(axes, hiddens):
        for colour, provider in enumerate(p.name for p in PROVIDERS):
            for (style, marker), vocab in zip((("-", "o"), ("--", "s"), (":", "^")), vocabs):
                points = sorted((r.tokens, r.seconds, r.peak_bytes / 2**20) for r in measured
                                if (r.provider, r.vocab, r.hidden) == (provider, vocab, hidden))
                if not points:
                    continue
                tokens, seconds, mebibytes = zip(*points)
                line = dict(marker=marker, linestyle=style, color=f"C{colour}",
                            label=f"{provider}, V={vocab}")
                time_axis.plot(tokens, seconds, **line)
                memory_axis.plot(tokens, mebibytes, **line)
        for axis, ylabel in ((time_axis, "forward+backward time, median (s)"),
                             (memory_axis, "peak memory (MiB)")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("tokens N")
            axis.set_ylabel(ylabel)
            axis.set_title(f"H={hidden}, float32", fontsize=9)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(f"Fused linear + distillation loss, forward+backward; {meter.label}\n"
                    f"(missing points: skipped, see the table)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.fused_linear",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"N=1024 and 4096 at V=32000, H=512 only, providers "
                        f"{', '.join(QUICK_PROVIDERS)} (two minutes or so)")
    parser.add_argument("--all-sizes", action="store_true",
                        help="the whole grid N in {1024, 4096, 8192}, V in {32000, 128256}, H in "
                        "{512, 2048} (hours on a small CPU)")
    parser.add_argument("--trainer", action="store_true",
                        help=f"the trainer-facing losses against Liger's at their sizes: "
                        f"providers {', '.join(TRAINER_PROVIDERS)} (about 15 minutes)")
    parser.add_argument("--lm-cases", action="store_true",
                        help=f"the language-model trainer cases at {GOAL_SIZE.label} float32 and "
                        f"bfloat16: providers {', '.join(LM_PROVIDERS)} (about 10 minutes)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, metavar="NxVxH[:dtype]",
                        help="run these sizes instead, e.g. 8192x32000x512 "
                        "4096x32000x512:bfloat16")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        choices=[p.name for p in PROVIDERS],
                        help=f"run only these providers (default: {', '.join(DEFAULT_PROVIDERS)};"
                        f" --quick: {', '.join(QUICK_PROVIDERS)})")
    parser.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="time at least N steps per provider and size (default 3)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch.set_num_threads(N) first (default: torch's own choice)")
    parser.add_argument("--json", metavar="PATH", help="write all results and the machine to PATH")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of time and memory against N")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    sizes = args.sizes or (QUICK_SIZES if args.quick else ALL_SIZES if args.all_sizes
                           else TRAINER_SIZES if args.trainer else LM_SIZES if args.lm_cases
                           else DEFAULT_SIZES)
    names = args.providers or (QUICK_PROVIDERS if args.quick else TRAINER_PROVIDERS
                               if args.trainer else LM_PROVIDERS if args.lm_cases
                               else DEFAULT_PROVIDERS)
    providers = [p for p in PROVIDERS if p.name in names]
    meter = CpuMeter(TARGET_SECONDS, min_repeats=args.repeats)
    info = dict(report.machine_info(meter), liger_kernel=liger_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"{report.describe_machine(info)}; liger-kernel {info['liger_kernel']}", flush=True)
    warning = report.busy_warning(info["cpu_busy_before_start"])
    if warning:
        print(warning, flush=True)
    print(f"forward+backward: {meter.label}", flush=True)
    results = []
    for index, size in enumerate(sizes, 1):
        size_results = run_size(size, providers, meter)
        results.extend(size_results)
        print(size_line(index, len(sizes), size, size_results, time.perf_counter() - started),
              flush=True)
    print()
    print(format_table(results))
    goals = check_goal(results), check_liger_goal(results), check_trainer_goal(results)
    print()
    for goal in goals:
        print(goal.line)
    for line in lm_case_lines(results):
        print(line)
    wall_seconds = time.perf_counter() - started
    info["load_average_at_end"] = report.load_average()
    print(f"load average at the end: {info['load_average_at_end'][0]:.2f} (1 min)")
    if args.json:
        write_json(args.json, info, sizes, results, goals, wall_seconds)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(args.plot, results, meter)
        print(f"wrote {args.plot}")
    print(f"wall time {format_seconds(wall_seconds)}")


if __name__ == "__main__":
    sys.exit(main())
