"""Ahead-of-time compile report for the Triton kernels on sm_80 (A100) and sm_90a (H100).

No GPU is needed. Four kernel families, each a forward and a backward kernel with a launcher per
pass: ``rank1`` (``row_stats`` / ``loss_backward``, and the one-program ``finish_loss``),
``shared`` (pair weights, one ``(C, C)`` matrix, ``tl.dot``: ``shared_rows_forward`` /
``shared_rows_backward``), ``per_row`` (pair weights ``(B, C, C)``: ``per_row_rows_forward`` /
``per_row_rows_backward``) and ``jsd`` (the generalized JSD: ``jsd_row_stats`` / ``jsd_backward``).
The fused losses' counted products (``matmul``: ``counted_matmul_kernel``, one kernel; the
logits in the forward pass, ``dh = g W`` and ``dW += g^T h`` in the backward) are a fifth family.
Each configuration is a call of a launcher on ``meta`` tensors with the
Triton kernel swapped for a recorder, so the tiles, the warp count and every argument are the
launchers' own choices (``pick_block_c``, ``pick_num_warps``, ``pick_shared_blocks``,
``pick_per_row_blocks``). The recorded launch is specialised as the JIT specialises a launch on
contiguous torch tensors (pointers 16-byte aligned, integers equal to 1 become constants, integers
divisible by 16 get ``tt.divisibility``), compiled with ``triton.compile`` for each architecture,
re-assembled with ``ptxas -v`` and Triton's register-allocation options (registers, spills), and
disassembled with ``nvdisasm -c`` (instruction count, local-memory instructions, widths of global
loads, matrix-unit instructions: ``HMMA`` on sm_80, warpgroup ``HGMMA`` or ``HMMA`` on sm_90a). The
compiles run in a pool of forked processes; the ptxas / nvdisasm figures are cached in Triton's
cache, keyed by the kernel's hash and the measuring code.

Run from the repository root::

    python -m tools.compile_report [--arch 80 90] [--family rank1 shared per_row jsd matmul]
                                   [--sass FAMILY ...] [--workers 2] [--quick] [--json rows.json]

``--sass`` names the families whose SASS is read (default: all); ``nvdisasm`` is about a third
of a configuration's time. The other families' rows have no SASS columns, and their check takes
ptxas's stack frame for local memory (local-memory instructions need one; a frame may go
unused).

It prints one row per configuration and exits with status 1 when a configuration fails to
compile, spills registers (spill bytes from ptxas, or local-memory instructions in Triton's
SASS), or needs more shared memory than one block may have. It needs compiled
Triton: with ``TRITON_INTERPRET`` set it runs itself again in a subprocess without that variable.
"""

import argparse
import collections
import dataclasses
from dataclasses import replace
import functools
import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Callable
from unittest import mock

import torch
import triton
from triton.backends import compiler as backend_compiler
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia_compiler
from triton.compiler import ASTSource
from triton.runtime.cache import get_cache_manager

from gkl_kernels.core import config as core_config
from gkl_kernels.core import counted_matmul
from gkl_kernels.core import kernels as core_kernels
from gkl_kernels.core.config import NUM_STATS, NUM_TOTALS, RowConfig
from gkl_kernels.jsd import kernels as jsd_kernels
from gkl_kernels.pairs import per_row_kernels, shared_kernels
from gkl_kernels.pairs.loss_terms import PairLossTerms
from gkl_kernels.rank1 import kernels as rank1_kernels
from gkl_kernels.validation import DOT_PRECISIONS


@dataclasses.dataclass(frozen=True)
class Arch:
    """A GPU target: Triton's compute capability, ptxas' name for it, and the most shared memory
    one block may opt in to (bytes)."""

    capability: int
    gpu_name: str
    shared_limit: int


ARCHS = {80: Arch(80, "sm_80", 166912), 90: Arch(90, "sm_90a", 232448)}
LOGIT_DTYPE_PAIRS = (  # (student, teacher)
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float64, torch.float64),  # computed in float64 (narrower tiles)
)
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PASSES = ("forward", "backward")
RANK1_CLASSES = (2, 262144)  # the class counts the rank-one sweep considers (inclusive)
SHARED_BATCHES = (1, 256)  # the batches the shared sweep considers: BLOCK_B follows the batch
# Class counts of the pair-weight sweeps. CIFAR-10's and ImageNet's are not multiples of 16, so
# rows are not known to be 16-aligned (scalar loads, the most registers); they pick the shared
# kernels' BLOCK_C = 16 and 32. 1024 gives aligned rows (vector loads) and the widest tiles. The
# per-row sweep also has 2 (its smallest tile) and 17 (the smallest count of its 32 x 32 tile).
UNALIGNED_CLASSES = (10, 1000)
ALIGNED_CLASSES = 1024
PER_ROW_CLASSES = (2, 17, 1000)
TRITON_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16",
                torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32"}
INTERPRET_VARIABLE = "TRITON_INTERPRET"
MEASUREMENTS_FILE = "gkl_compile_report.json"


@dataclasses.dataclass(frozen=True)
class LaunchCase:
    """One call of a launcher: the kernel family and pass, the input dtypes and shape, and the
    flags. A family ignores the fields it has no use for (they keep their defaults)."""

    family: str  # a key of FAMILIES
    kernel: str  # "forward" or "backward"
    student: torch.dtype
    teacher: torch.dtype
    num_classes: int
    batch: int = 2
    weights: torch.dtype = None  # rank1: the explicit factor or class prior; pairs: the weights
    source: int = core_config.SOURCE_TEACHER  # rank1
    with_ce: bool = True  # rank1
    symmetric: bool = True  # rank1, backward
    need_ds: bool = True  # backward
    need_dt: bool = True  # backward
    dot_precision: str = None  # shared, matmul (float32 heads): tl.dot's input_precision
    beta: float = 0.5  # jsd: 0 forward KL, 1 reverse KL, else the mixture
    jsd_round: int = core_config.JSD_WHOLE_ROWS  # jsd, forward
    product: str = None  # matmul: "logits", "logits_in_dtype" (no bias), "dh" or "dW"


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """Everything ``triton.compile`` needs for one kernel specialisation on one architecture, as
    plain data (it is sent to the worker processes)."""

    case: LaunchCase
    kernel_name: str
    arg_types: tuple  # per kernel argument: "*fp32", "i32", "fp32", ... or "constexpr"
    constants: tuple  # (argument index, value): constexpr arguments and integers equal to 1
    aligned: tuple  # indices of the arguments that are divisible by 16
    options: tuple  # (name, value): the launcher's options, num_stages as the JIT defaults it
    tile: tuple  # (name, value) of the BLOCK_* arguments, in the kernel's order
    arch: Arch
    disassemble: bool = True  # read the SASS (nvdisasm); else ptxas's figures alone


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` stores the bound
    arguments and the launch options instead of running anything."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.arguments = self.options = None

    def __getitem__(self, grid):
        return self.record

    def record(self, *args, **kwargs):
        """Split ``kwargs`` into kernel arguments and launch options (``num_warps``) and bind."""
        signature = inspect.signature(self.kernel.fn)
        self.options = {k: kwargs.pop(k) for k in list(kwargs) if k not in signature.parameters}
        self.arguments = signature.bind(*args, **kwargs).arguments


def count_range_per_tile(pick, counts):
    """``{tile: (smallest, largest) count}`` for which ``pick(count)`` gives ``tile``, over the
    inclusive range ``counts``: which class counts (or batch sizes) reach each tile a launcher
    can choose."""
    ranges = {}
    for count in range(counts[0], counts[1] + 1):
        tile = pick(count)
        ranges[tile] = (ranges.get(tile, (count,))[0], count)
    return ranges


def largest_count_per_tile(pick, counts):
    """``{tile: largest count}`` for ``count_range_per_tile``: from 16 on a multiple of 16 when
    the tiles are powers of two, so rows are known to be aligned."""
    return {tile: largest for tile, (_, largest) in count_range_per_tile(pick, counts).items()}


def meta_tensor(*shape, dtype=torch.float32):
    """An empty tensor on the ``meta`` device: a shape and a dtype, no memory."""
    return torch.empty(shape, dtype=dtype, device="meta")


def meta_logits(case):
    """The case's student and teacher logits, ``(batch, num_classes)`` ``meta`` tensors."""
    return (meta_tensor(case.batch, case.num_classes, dtype=case.student),
            meta_tensor(case.batch, case.num_classes, dtype=case.teacher))


def gradient_flags(case):
    """``DS`` / ``DT`` for the gradients a backward case computes; none for a forward case."""
    if case.kernel != "backward":
        return []
    return [name for name, needed in (("DS", case.need_ds), ("DT", case.need_dt)) if needed]


# ---- the rank-one family -------------------------------------------------------------------

def rank1_cases():
    """The rank-one launch cases.

    1. Every tile width the launcher picks, at the largest class count it picks it for (a
       multiple of 16 from tile 16 on, so rows are known to be aligned), for each logits dtype
       pair and both passes, with the heaviest flags: teacher weights, cross-entropy, symmetric,
       both gradients.
    2. At the widest tile and the largest class count: every weight source with its factor in each
       dtype, then every other flag value (float32 logits, teacher weights).
    3. At the widest tile and the smallest class count, which is not a multiple of 16 (so rows are
       not known to be aligned, as for C = 100, 1000, 21841): each dtype pair, heaviest flags.
    """
    counts = count_range_per_tile(rank1_kernels.pick_block_c, RANK1_CLASSES)
    fewest, most = counts[max(counts)]
    case = functools.partial(LaunchCase, "rank1")
    cases = [case(kernel, student, teacher, largest)
             for _, largest in counts.values()
             for student, teacher in LOGIT_DTYPE_PAIRS
             for kernel in PASSES]
    cases += [case(kernel, torch.float32, torch.float32, most, source=source, weights=weights)
              for source in (core_config.SOURCE_PRIOR, core_config.SOURCE_EXPLICIT)
              for weights in WEIGHT_DTYPES
              for kernel in PASSES]
    cases.append(case("forward", torch.float32, torch.float32, most, with_ce=False))
    cases += [case("backward", torch.float32, torch.float32, most, with_ce=with_ce,
                   symmetric=symmetric, need_ds=need_ds, need_dt=need_dt)
              for with_ce, symmetric, need_ds, need_dt in itertools.product((True, False), repeat=4)
              if (need_ds or need_dt) and not (with_ce and symmetric and need_ds and need_dt)]
    cases += [case(kernel, student, teacher, fewest)
              for student, teacher in LOGIT_DTYPE_PAIRS
              for kernel in PASSES]
    cases += [case("finish", torch.float32, torch.float32, most, source=source, with_ce=with_ce,
                   symmetric=normalize_batch)
              for source in (core_config.SOURCE_TEACHER, core_config.SOURCE_PRIOR,
                             core_config.SOURCE_NONE)
              for with_ce in (True, False)
              for normalize_batch in (True, False)
              if with_ce or source != core_config.SOURCE_NONE]
    return cases


def launch_rank1(case):
    """Call the rank-one launcher of the case's pass on ``meta`` tensors (a finishing case's
    ``symmetric`` stands for ``normalize="batch"``)."""
    student, teacher = meta_logits(case)
    factor = labels = None
    if case.source == core_config.SOURCE_PRIOR:
        factor = meta_tensor(case.num_classes, case.num_classes, dtype=case.weights)
        labels = meta_tensor(case.batch, dtype=torch.int64)
    elif case.source == core_config.SOURCE_EXPLICIT:
        factor = meta_tensor(case.batch, case.num_classes, dtype=case.weights)
    config = RowConfig(source=case.source, gamma=0.6, ce_weight=1.0 if case.with_ce else 0.0,
                       symmetric=case.symmetric, has_labels=labels is not None)
    stats = meta_tensor(case.batch, NUM_STATS)
    if case.kernel == "forward":
        rank1_kernels.row_stats(student, teacher, factor, labels, config)
    elif case.kernel == "finish":
        core_kernels.finish_loss(stats, replace(config, normalize_batch=case.symmetric))
    else:
        rank1_kernels.loss_backward(meta_tensor(), student, teacher, factor, labels, stats,
                                    meta_tensor(NUM_TOTALS), config, case.need_ds, case.need_dt)


def rank1_flags(case):
    """The rank-one flags of a case, as printed: weight source, cross-entropy, symmetric, grads."""
    flags = [f"SOURCE={case.source}", "CE" if case.with_ce else "noCE"]
    if case.kernel == "backward":
        flags.append("SYM" if case.symmetric else "noSYM")
    return flags + gradient_flags(case)


# ---- the generalized JSD -------------------------------------------------------------------

def jsd_cases():
    """The JSD launch cases, at the widest tile and its largest class count (aligned rows) where
    not said otherwise, both passes: every logits dtype pair with the mixture; forward and
    reverse KL (float32); the smallest class count of that tile, not aligned (float32, bfloat16);
    the forward's two vocabulary-shard rounds (float32)."""
    counts = count_range_per_tile(rank1_kernels.pick_block_c, RANK1_CLASSES)
    fewest, most = counts[max(counts)]
    case = functools.partial(LaunchCase, "jsd", need_dt=False)
    cases = [case(kernel, student, teacher, most)
             for student, teacher in LOGIT_DTYPE_PAIRS for kernel in PASSES]
    cases += [case(kernel, torch.float32, torch.float32, most, beta=beta)
              for beta in (0.0, 1.0) for kernel in PASSES]
    cases += [case(kernel, dtype, dtype, fewest)
              for dtype in (torch.float32, torch.bfloat16) for kernel in PASSES]
    cases += [case("forward", torch.float32, torch.float32, most, jsd_round=jsd_round)
              for jsd_round in (core_config.JSD_NORMALISERS, core_config.JSD_KL_SUMS)]
    return cases


def launch_jsd(case):
    """Call the JSD launcher of the case's pass on ``meta`` tensors (labels given)."""
    student, teacher = meta_logits(case)
    labels = meta_tensor(case.batch, dtype=torch.int64)
    config = RowConfig(source=core_config.SOURCE_JSD, beta=case.beta, jsd_round=case.jsd_round,
                       mse_weight=0.0, has_labels=True)
    stats = meta_tensor(case.batch, NUM_STATS)
    if case.kernel == "forward":
        given = stats if case.jsd_round == core_config.JSD_KL_SUMS else None
        jsd_kernels.jsd_row_stats(student, teacher, labels, config, given)
    else:
        jsd_kernels.jsd_backward(meta_tensor(), student, teacher, stats, meta_tensor(NUM_TOTALS),
                                 config, True)


def jsd_flags(case):
    """The JSD flags of a case, as printed: beta, the forward's round, the gradient."""
    flags = [f"beta={case.beta:g}"]
    if case.kernel == "forward":
        flags.append(f"ROUND={case.jsd_round}")
    return flags + gradient_flags(case)


# ---- the counted products of the fused losses ---------------------------------------------

MATMUL_SHAPE = (512, 32000, 4096)  # (chunk rows, V, H): a 32k vocabulary, an 8B model's width
MATMUL_PRODUCTS = {  # (head dtype, float32's tl.dot precision): the products compiled
    (torch.float32, "ieee"): ("logits", "dh", "dW"),
    (torch.float32, "tf32"): ("logits", "dW"),  # dh: the logits' code with another operand
    (torch.bfloat16, None): ("logits", "dh", "dW"),
    (torch.float16, None): ("logits",),
}


def matmul_cases():
    """The counted products' launch cases, at ``MATMUL_SHAPE``: ``MATMUL_PRODUCTS`` (the logits
    with a bias, float32 out; ``dh``; ``dW``), and bfloat16's logits written in bfloat16 without
    a bias (the trainer's)."""
    rows, vocabulary, _ = MATMUL_SHAPE
    case = functools.partial(LaunchCase, "matmul", batch=rows, num_classes=vocabulary)
    cases = [case("forward" if product == "logits" else "backward", dtype, dtype,
                  dot_precision=precision, product=product)
             for (dtype, precision), products in MATMUL_PRODUCTS.items() for product in products]
    cases.append(case("forward", torch.bfloat16, torch.bfloat16, product="logits_in_dtype"))
    return cases


def launch_matmul(case):
    """Call ``counted_matmul`` for the case's product on ``meta`` tensors (a chunk at row 512,
    float32 precision as the case says)."""
    rows, vocabulary, hidden_size = MATMUL_SHAPE
    hidden = meta_tensor(rows, hidden_size, dtype=case.student)
    weight = meta_tensor(vocabulary, hidden_size, dtype=case.student)
    grad = meta_tensor(rows, vocabulary, dtype=case.student)
    count = meta_tensor(dtype=torch.int64)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.dot_precision == "tf32"
    try:
        if case.product == "logits":
            counted_matmul.counted_matmul(hidden, weight.t(), meta_tensor(rows, vocabulary),
                                          count, rows, "rows", meta_tensor(vocabulary,
                                                                           dtype=case.student))
        elif case.product == "logits_in_dtype":
            counted_matmul.counted_matmul(hidden, weight.t(), grad, count, rows, "rows")
        elif case.product == "dh":
            counted_matmul.counted_matmul(grad, weight, hidden, count, rows, "rows")
        else:
            counted_matmul.counted_matmul(grad.t(), hidden, meta_tensor(vocabulary, hidden_size),
                                          count, rows, "reduction", accumulate=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul_flags(case):
    """The product a case computes, as printed."""
    return [case.product]


# ---- the pair-weight families ------------------------------------------------------------

def shared_cases():
    """The launch cases of the shared ``(C, C)`` kernels: float32 inputs, both gradients and
    ``ieee`` (the direct sums, the default) where not said otherwise.

    1. Every ``(BLOCK_B, BLOCK_C)`` tile the launcher picks, both passes, at the largest batch
       that picks ``BLOCK_B`` and the class count of ``UNALIGNED_CLASSES`` that picks
       ``BLOCK_C`` (rows not known to be 16-aligned: scalar loads, more registers than aligned
       rows).
    2. At the widest tile, the other dot precisions, both passes.
    3. At the widest tile with ``ALIGNED_CLASSES`` (vector loads): ``dtype_and_gradient_cases``.
    4. float64 logits and weights: every tile the launcher picks for float64, both passes.
    """
    batches = largest_count_per_tile(
        lambda batch: shared_kernels.pick_shared_blocks(batch, ALIGNED_CLASSES)[0], SHARED_BATCHES)
    classes = {shared_kernels.pick_shared_blocks(1, num_classes)[1]: num_classes
               for num_classes in UNALIGNED_CLASSES}
    case = functools.partial(LaunchCase, "shared", weights=torch.float32, dot_precision="ieee")
    cases = [case(kernel, torch.float32, torch.float32, num_classes, batch)
             for batch in batches.values() for num_classes in classes.values()
             for kernel in PASSES]
    widest = functools.partial(case, batch=batches[max(batches)])
    cases += [widest(kernel, torch.float32, torch.float32, classes[max(classes)],
                     dot_precision=dot_precision)
              for dot_precision in DOT_PRECISIONS if dot_precision != "ieee"
              for kernel in PASSES]
    float64_batches = largest_count_per_tile(
        lambda batch: shared_kernels.pick_shared_blocks(batch, ALIGNED_CLASSES,
                                                        dtype=torch.float64)[0], SHARED_BATCHES)
    cases += dtype_and_gradient_cases(widest, ALIGNED_CLASSES)
    return cases + [case(kernel, torch.float64, torch.float64, num_classes, batch,
                         weights=torch.float64)
                    for batch in float64_batches.values() for num_classes in classes.values()
                    for kernel in PASSES]


def per_row_cases():
    """The launch cases of the per-row ``(B, C, C)`` kernels (float32 and float64 inputs, both
    gradients): each class count of ``PER_ROW_CLASSES``, both passes, then
    ``dtype_and_gradient_cases`` at ``ALIGNED_CLASSES`` (the widest tile, aligned rows)."""
    case = functools.partial(LaunchCase, "per_row")
    cases = [case(kernel, dtype, dtype, num_classes, weights=dtype)
             for dtype in (torch.float32, torch.float64)
             for num_classes in PER_ROW_CLASSES for kernel in PASSES]
    return cases + dtype_and_gradient_cases(case, ALIGNED_CLASSES)


def dtype_and_gradient_cases(case, num_classes):
    """Cases of a pair-weight family at one class count (``case`` makes a ``LaunchCase`` of the
    family): each logits dtype pair with weights in the student's dtype, both passes, then the
    backward pass with each gradient alone (float32)."""
    cases = [case(kernel, student, teacher, num_classes, weights=student)
             for student, teacher in LOGIT_DTYPE_PAIRS for kernel in PASSES]
    return cases + [case("backward", torch.float32, torch.float32, num_classes, need_ds=need_ds,
                         need_dt=not need_ds)
                    for need_ds in (True, False)]


def pair_loss(case):
    """The loss's terms for a pair-weight case's launch (``gkl_loss``'s variants: the
    cross-entropy fused in, every part plane written; ``pairwise_wmse``'s wMSE-only variants
    keep a subset of their values)."""
    config = RowConfig(source=core_config.SOURCE_PAIRS, per_row=case.family == "per_row")
    return config, PairLossTerms(meta_tensor(case.batch, NUM_STATS), meta_tensor(NUM_TOTALS),
                                 None, config)


def launch_shared(case):
    """Call the shared-weights launcher of the case's pass on ``meta`` tensors."""
    student, teacher = meta_logits(case)
    weights = meta_tensor(case.num_classes, case.num_classes, dtype=case.weights)
    config, loss = pair_loss(case)
    if case.kernel == "forward":
        shared_kernels.shared_rows_forward(student, teacher, weights, case.dot_precision,
                                           config=config)
    else:
        shared_kernels.shared_rows_backward(meta_tensor(), student, teacher, weights,
                                            case.need_ds, case.need_dt, case.dot_precision,
                                            loss=loss)


def launch_per_row(case):
    """Call the per-row-weights launcher of the case's pass on ``meta`` tensors."""
    student, teacher = meta_logits(case)
    weights = meta_tensor(case.batch, case.num_classes, case.num_classes, dtype=case.weights)
    config, loss = pair_loss(case)
    if case.kernel == "forward":
        per_row_kernels.per_row_rows_forward(student, teacher, weights, config=config)
    else:
        per_row_kernels.per_row_rows_backward(meta_tensor(), student, teacher, weights,
                                              case.need_ds, case.need_dt, loss=loss)


# ---- the families, and recording a launch ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
    """A family of kernels: the module of its kernels and launchers, the kernel each pass
    launches, how to call the pass's launcher for a case, the case's flags as printed, and the
    family's launch cases."""

    module: ModuleType
    kernel_names: dict  # pass -> name of the @triton.jit kernel in module (or in the core's)
    launch: Callable  # (LaunchCase) -> None, calls the launcher on meta tensors
    flags: Callable  # (LaunchCase) -> list of str
    cases: Callable  # () -> list of LaunchCase


FAMILIES = {
    "rank1": Family(rank1_kernels, {"forward": "row_stats_kernel",
                                    "backward": "loss_backward_kernel",
                                    "finish": "finish_loss_kernel"},
                    launch_rank1, rank1_flags, rank1_cases),
    "shared": Family(shared_kernels, {"forward": "wmse_shared_fwd_kernel",
                                      "backward": "wmse_shared_bwd_kernel"},
                     launch_shared, gradient_flags, shared_cases),
    "per_row": Family(per_row_kernels, {"forward": "wmse_per_row_fwd_kernel",
                                        "backward": "wmse_per_row_bwd_kernel"},
                      launch_per_row, gradient_flags, per_row_cases),
    "jsd": Family(jsd_kernels, {"forward": "jsd_row_stats_kernel",
                                "backward": "jsd_backward_kernel"},
                  launch_jsd, jsd_flags, jsd_cases),
    "matmul": Family(counted_matmul, {"forward": "counted_matmul_kernel",
                                      "backward": "counted_matmul_kernel"},
                     launch_matmul, matmul_flags, matmul_cases),
}


def sweep_cases(families=tuple(FAMILIES), quick=False):
    """The report's launch cases: each family's own, in the order of ``families``; ``quick``:
    only each family's first case of each pass."""
    cases = [case for family in families for case in FAMILIES[family].cases()]
    if quick:
        cases = list({(case.family, case.kernel): case for case in reversed(cases)}.values())[::-1]
    return cases


def kernel_module(family, kernel_name):
    """The module that holds a family's kernel ``kernel_name``: the family's, or the core's
    (the finishing kernel)."""
    module = FAMILIES[family].module
    return module if hasattr(module, kernel_name) else core_kernels


def jit_kernel(family, kernel_name):
    """The ``@triton.jit`` kernel ``kernel_name`` of a family."""
    return getattr(kernel_module(family, kernel_name), kernel_name)


def record_launch(case):
    """Call the case's launcher on ``meta`` tensors with its kernel swapped for a recorder;
    returns the kernel, its arguments by name and the launch options, as the launcher passed
    them."""
    family = FAMILIES[case.family]
    name = family.kernel_names[case.kernel]
    recorder = LaunchRecorder(jit_kernel(case.family, name))
    with mock.patch.object(kernel_module(case.family, name), name, recorder):
        family.launch(case)
    return recorder.kernel, recorder.arguments, recorder.options


def specialise(value):
    """``(type, divisible by 16, constant)`` of a runtime argument as the JIT sees it: tensors are
    pointers (torch allocations are 16-byte aligned), integers equal to 1 become constants."""
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype], True, False
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0, value == 1
    return "fp32", False, False


def compile_job(case, arch, disassemble=True):
    """The compile job of one launch case on one architecture; ``disassemble``: read its SASS."""
    kernel, arguments, launch_options = record_launch(case)
    arg_types, constants, aligned = [], [], []
    for index, (param, value) in enumerate(zip(kernel.params, arguments.values())):
        if param.is_constexpr:
            arg_types.append("constexpr")
            constants.append((index, value))
            continue
        arg_type, divisible, constant = specialise(value)
        arg_types.append(arg_type)
        if constant:
            constants.append((index, value))
        elif divisible:
            aligned.append(index)
    options = {"num_stages": nvidia_compiler.CUDAOptions.num_stages, **launch_options}
    # device assertions compiled in, as the JIT does for @triton.jit(debug=True) (triton 3.2
    # keeps no such flag on the function: its kernels compile without them)
    if getattr(kernel, "debug", False):
        options["debug"] = True
    tile = tuple((name, value) for name, value in arguments.items() if name.startswith("BLOCK_"))
    return CompileJob(case, kernel.__name__, tuple(arg_types), tuple(constants), tuple(aligned),
                      tuple(sorted(options.items())), tile, arch, disassemble)


def ast_source(job):
    """``ASTSource`` of the job in the installed Triton's format. triton >= 3.3: every argument in
    the signature, ``constexprs`` keyed by argument index, attributes as lists; triton 3.2: only
    runtime arguments, ``constants`` keyed by name, an ``AttrsDescriptor`` built from hints."""
    kernel = jit_kernel(job.case.family, job.kernel_name)
    names = kernel.arg_names
    if "constexprs" in inspect.signature(ASTSource).parameters:
        signature = dict(zip(names, job.arg_types))
        constexprs = {(index,): value for index, value in job.constants}
        attrs = {(index,): [["tt.divisibility", 16]] for index in job.aligned}
        return ASTSource(kernel, signature, constexprs, attrs)
    signature = {name: arg_type for name, arg_type in zip(names, job.arg_types)
                 if arg_type != "constexpr"}
    constants = {names[index]: value for index, value in job.constants}
    hints = {index: 16 for index in job.aligned}
    hints.update({index: 1 for index, _ in job.constants if job.arg_types[index] != "constexpr"})
    return ASTSource(kernel, signature, constants,
                     backend_compiler.AttrsDescriptor.from_hints(hints))


# ---- measuring a compiled kernel ---------------------------------------------------------

def ptxas_path(arch):
    """The ptxas Triton runs for ``arch``: ``get_ptxas(arch)`` (an object with ``.path`` from
    triton 3.4, a ``(path, version)`` pair in 3.3), or triton 3.2's single ``_path_to_binary``."""
    if hasattr(nvidia_compiler, "get_ptxas"):
        tool = nvidia_compiler.get_ptxas(arch.capability)
    else:
        tool = nvidia_compiler._path_to_binary("ptxas")
    return tool.path if hasattr(tool, "path") else tool[0]


@functools.cache
def triton_allocation_options():
    """The ptxas options of Triton's own PTX-to-cubin step that change register allocation, so
    that the re-assembly allocates as Triton's cubin does: triton 3.9 passes
    ``--regAllocOptLevel=2`` (without it ptxas reports no spills for kernels whose cubin spills),
    triton 3.2 nothing. Read from the source of Triton's ``make_cubin``."""
    source = inspect.getsource(nvidia_compiler.CUDABackend.make_cubin)
    return tuple(option for option in ("--regAllocOptLevel=2",) if option in source)


def ptxas_usage(ptx, arch, workdir):
    """Registers, stack frame and spill bytes reported by ``ptxas -v`` for the PTX, with Triton's
    allocation options."""
    ptx_file = Path(workdir, "kernel.ptx")
    ptx_file.write_text(ptx)
    log = subprocess.run([ptxas_path(arch), "-v", *triton_allocation_options(),
                          f"--gpu-name={arch.gpu_name}", str(ptx_file),
                          "-o", str(Path(workdir, "reassembled.cubin"))],
                         capture_output=True, text=True, check=True).stderr
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "stack_frame": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3))}


def global_load_bits(opcode):
    """Bits one ``LDG`` reads, from its modifiers: ``LDG.E.128`` 128, ``LDG.E.U16`` 16, ``LDG.E``
    32."""
    modifiers = opcode.split(".")
    for modifier in modifiers[1:]:
        if modifier in ("128", "64"):
            return int(modifier)
        if modifier in ("U16", "S16", "U8", "S8"):
            return int(modifier[1:])
    return 32


def matrix_unit_counts(opcodes):
    """``{mnemonic: count}`` of the matrix-unit (tensor core) instructions among the SASS
    opcodes: ``HMMA`` (warp-level, sm_80 and sm_90a), ``HGMMA`` (warpgroup, sm_90a), and any
    other ``*MMA`` (``IMMA``, ``DMMA``, ...)."""
    mnemonics = (opcode.split(".")[0] for opcode in opcodes)
    return dict(sorted(collections.Counter(m for m in mnemonics if m.endswith("MMA")).items()))


def sass_summary(cubin, arch, workdir):
    """From ``nvdisasm -c`` on Triton's cubin: the instruction count (NOP padding left out), the
    local-memory accesses (``LDL``/``STL``), the widths of the global loads and whether any of
    them is a 64- or 128-bit (vector) load, and the matrix-unit instructions."""
    cubin_file = Path(workdir, "kernel.cubin")
    cubin_file.write_bytes(cubin)
    nvdisasm = Path(ptxas_path(arch)).with_name("nvdisasm")
    # -ndf: no dataflow annotations (the same instructions, a third less time on sm_90a)
    sass = subprocess.run([str(nvdisasm), "-c", "-ndf", str(cubin_file)], capture_output=True,
                          text=True, check=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    load_bits = sorted({global_load_bits(op) for op in opcodes if op.startswith("LDG")},
                       reverse=True)
    return {"sass_instructions": sum(op != "NOP" for op in opcodes),
            "local_accesses": sum(op.startswith(("LDL", "STL")) for op in opcodes),
            "ldg_bits": load_bits, "vectorised": any(bits >= 64 for bits in load_bits),
            "mma": matrix_unit_counts(opcodes)}


@functools.cache
def measuring_code_hash():
    """Hash of the functions that measure a kernel: a change to them invalidates cached results."""
    source = "".join(inspect.getsource(f) for f in (
        triton_allocation_options, ptxas_usage, global_load_bits, matrix_unit_counts,
        sass_summary))
    return hashlib.sha256(source.encode()).hexdigest()


def measurements(compiled, arch, disassemble):
    """``ptxas_usage`` and, when ``disassemble``, ``sass_summary`` of a compiled kernel, cached in
    Triton's cache under the kernel's hash and ``measuring_code_hash``."""
    key = hashlib.sha256(f"{compiled.hash}-{disassemble}-{measuring_code_hash()}".encode())
    key = key.hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file(MEASUREMENTS_FILE)
    if cached:
        return json.loads(Path(cached).read_text())
    with tempfile.TemporaryDirectory() as workdir:
        found = ptxas_usage(compiled.asm["ptx"], arch, workdir)
        if disassemble:
            found.update(sass_summary(compiled.asm["cubin"], arch, workdir))
    cache.put(json.dumps(found), MEASUREMENTS_FILE, binary=False)
    return found


# ---- the report --------------------------------------------------------------------------

def dtype_name(dtype):
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def describe(job):
    """The identifying columns of a report row."""
    case = job.case
    options = dict(job.options)
    return {"family": case.family, "kernel": job.kernel_name, "arch": job.arch.gpu_name,
            "student": dtype_name(case.student), "teacher": dtype_name(case.teacher),
            "weights": dtype_name(case.weights) if case.weights else "-",
            "flags": " ".join(FAMILIES[case.family].flags(case)),
            "dot_precision": case.dot_precision, "B": case.batch, "C": case.num_classes,
            "tile": dict(job.tile), "num_warps": options["num_warps"],
            "num_stages": options["num_stages"]}


def run_job(job):
    """Compile and measure one job; a failure is kept in the row's ``error``."""
    row = describe(job)
    try:
        compiled = triton.compile(ast_source(job),
                                  target=GPUTarget("cuda", job.arch.capability, 32),
                                  options=dict(job.options))
        row.update(measurements(compiled, job.arch, job.disassemble),
                   shared=compiled.metadata.shared,
                   shared_limit=job.arch.shared_limit, error=None)
    except Exception as error:  # one failing configuration must not hide the others
        row["error"] = f"{type(error).__name__}: {error}".strip()[:2000]
    return row


def local_memory(row):
    """Local memory of a compiled row: its SASS's local-memory instructions where the SASS was
    read, else ptxas's stack frame in bytes (an upper bound: local memory needs a frame, but a
    frame may go unused)."""
    return row["local_accesses"] if "local_accesses" in row else row["stack_frame"]


def problems(row):
    """Why a row fails the check; empty when it passes."""
    if row["error"]:
        return ["compile error"]
    found = []
    if row["spill_stores"] or row["spill_loads"] or local_memory(row):
        found.append("spills")
    if row["shared"] > row["shared_limit"]:
        found.append("shared memory over the limit")
    return found


def check_compiled_triton():
    """Raise when the kernels are interpreted (``TRITON_INTERPRET`` was set at import)."""
    if not all(isinstance(jit_kernel(name, kernel), triton.runtime.JITFunction)
               for name, family in FAMILIES.items() for kernel in family.kernel_names.values()):
        raise RuntimeError(f"the kernels are interpreted: unset {INTERPRET_VARIABLE} to compile")


def compile_report(capabilities=tuple(ARCHS), workers=2, families=tuple(FAMILIES), quick=False,
                   progress=lambda done, total: None, disassembled=tuple(FAMILIES)):
    """Compile every case of ``sweep_cases(families, quick)`` for each architecture in
    ``capabilities`` on ``workers`` forked processes, reading the SASS of the ``disassembled``
    families; returns the rows (dicts), in sweep order. ``progress(rows done, rows in all)``
    before the first compile and after each row."""
    check_compiled_triton()
    cases = sweep_cases(families, quick)
    jobs = [compile_job(case, ARCHS[capability], case.family in disassembled)
            for capability in capabilities for case in cases]
    progress(0, len(jobs))
    rows = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for row in pool.map(run_job, jobs):
            rows.append(row)
            progress(len(rows), len(jobs))
    return rows


def print_progress(start):
    """A ``progress`` for ``compile_report``: the count at the start, then about every 5% the
    configurations done, the time elapsed since ``start`` and an estimate of the time left."""
    def progress(done, total):
        elapsed = time.perf_counter() - start
        if not done:
            print(f"compiling {total} configurations", flush=True)
        elif done == total or done % max(1, total // 20) == 0:
            print(f"  {done}/{total} compiled, {elapsed:.0f} s elapsed, about "
                  f"{elapsed / done * (total - done):.0f} s left", flush=True)
    return progress


COLUMNS = {"kernel": "kernel", "arch": "arch", "student": "student", "teacher": "teacher",
           "weights": "weights", "flags": "flags", "dot_precision": "dot", "B": "B", "C": "C",
           "tile": "tile", "num_warps": "warps", "num_stages": "stages", "registers": "regs",
           "stack_frame": "stack", "spill_stores": "spill_st", "spill_loads": "spill_ld",
           "shared": "smem",
           "sass_instructions": "sass", "local_accesses": "lmem_ops", "ldg_bits": "ldg_bits",
           "vectorised": "vec", "mma": "mma"}  # row key: header


def table_cell(row, key):
    """One cell of the printed table. ``tile`` is the BLOCK_* sizes in the kernel's order (rank1:
    BLOCK_C; shared: BLOCK_B x BLOCK_C; per_row: BLOCK_J x BLOCK_K); ``mma`` the matrix-unit
    instructions by mnemonic, 0 when there are none."""
    value = row.get(key)
    if value is None:
        return "-"
    if key == "tile":
        return "x".join(map(str, value.values()))
    if key == "ldg_bits":
        return "/".join(map(str, value)) or "-"
    if key == "vectorised":
        return "yes" if value else "no"
    if key == "mma":
        return ",".join(f"{mnemonic}:{count}" for mnemonic, count in value.items()) or "0"
    return str(value)


def row_label(row):
    """A configuration in one line, for the list of compile errors."""
    return " ".join(f"{header}={table_cell(row, key)}" for key, header in COLUMNS.items()
                    if key in ("kernel", "arch", "student", "teacher", "weights", "flags",
                               "dot_precision", "B", "C", "tile"))


def format_table(rows):
    """The rows as text in aligned columns with a check column, then the compile errors."""
    lines = [[*COLUMNS.values(), "check"]]
    lines += [[table_cell(row, key) for key in COLUMNS] + [", ".join(problems(row)) or "ok"]
              for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip()
            for line in lines]
    text += [f"{row_label(row)}: {row['error']}" for row in rows if row["error"]]
    return "\n".join(text)


def rerun_without_interpreter():
    """Run this module again with ``TRITON_INTERPRET`` removed; returns its exit status."""
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_VARIABLE}
    return subprocess.call([sys.executable, "-m", __spec__.name, *sys.argv[1:]], env=env)


def parse_args():
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS),
                        default=sorted(ARCHS), help="compute capabilities (default: 80 90)")
    parser.add_argument("--family", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                        help="kernel families (default: all)")
    parser.add_argument("--sass", nargs="+", choices=list(FAMILIES), default=list(FAMILIES),
                        help="families whose SASS is read with nvdisasm (default: all)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default: 2)")
    parser.add_argument("--quick", action="store_true",
                        help="only the first configuration of each family and pass")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    return parser.parse_args()


def main():
    """Print the report; exit status 1 when a configuration fails the check."""
    if INTERPRET_VARIABLE in os.environ:
        return rerun_without_interpreter()
    args = parse_args()
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    start = time.perf_counter()
    rows = compile_report(tuple(args.arch), args.workers, tuple(args.family), args.quick,
                          print_progress(start), tuple(args.sass))
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    failing = [row for row in rows if problems(row)]
    archs = ", ".join(ARCHS[capability].gpu_name for capability in args.arch)
    print(f"\n{len(rows)} configurations for {archs} in {elapsed:.1f} s with {args.workers} "
          f"workers (triton {triton.__version__}); {len(failing)} failing the check")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
