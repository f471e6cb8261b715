"""``RowConfig``: every scalar option of the row ops in one frozen object (its float options packed
once for the kernels, ``RowConfig.kernel_options``), and the layout of the per-row statistics,
the pair kernels' column parts and the batch totals those ops exchange.

The custom ops take the config as two lists (``config.floats``, ``config.ints``), the form a
``torch.library`` schema accepts; ``RowConfig.unpack`` rebuilds it.
"""

import struct
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Literal, NamedTuple, get_args

import torch

DotPrecision = Literal["ieee", "tf32x3", "tf32"]  # tl.dot operands for shared (C, C) weights
DOT_PRECISIONS = get_args(DotPrecision)  # RowConfig.dot_precision is an index into it
MIN_DOT_BLOCK = 16  # tl.dot needs tiles of at least 16 when compiled

# weight sources
SOURCE_TEACHER = 0  # v = softmax(t / T2) ** gamma
SOURCE_PRIOR = 1  # v = prior[label] ** gamma
SOURCE_EXPLICIT = 2  # v given, (B, C)
SOURCE_NONE = 3  # no wMSE: the cross-entropy only
SOURCE_PAIRS = 4  # general pair weights (C, C) or (B, C, C): the wMSE from ``pairs``
SOURCE_JSD = 5  # no weights: the generalized JSD of ``jsd``, the row's divergence in STAT_A
WMSE_SOURCES = (SOURCE_TEACHER, SOURCE_PRIOR, SOURCE_EXPLICIT, SOURCE_PAIRS)

# the generalized JSD's three forms (``jsd_form``): beta = 0, beta = 1, between
JSD_FORWARD_KL, JSD_REVERSE_KL, JSD_MIXTURE = range(3)
# the rounds of its row op (``jsd_round``): whole rows; over vocabulary shards first the
# normalisers (merged like the GKL statistics), then the KL sums from the merged normalisers
JSD_WHOLE_ROWS, JSD_NORMALISERS, JSD_KL_SUMS = range(3)

# Per-row statistics, float32 (B, NUM_STATS), mergeable over any split of a row's columns
# (``merge_row_stats``). Softmaxes at T of raw logits: maxima ``m_s``, ``m_t`` of s and t, the
# normalisers ``z = sum exp((x - m) / T)`` as their rests ``z - 1`` (STAT_ZS, STAT_ZT; summed
# without one maximal term, which is 1, so exact near ``z = 1``; -1 for a row of -inf; PART_ZS,
# PART_ZT likewise), ``a = sum exp((t - m_t) / T) (m_s - s)``; teacher
# weights: ``z_w = sum exp((t - m_t) / T2)``. The factor is held as ``v' = v 2^-L`` (teacher:
# ``exp(gamma (t - m_t) / T2)``): the wMSE moments ``W' = sum v'``, the mean of ``d = t - s`` as
# a pivot ``ph + pl`` (the heaviest class's ``d``, an exact pair, on both backends) plus an
# offset ``dm``, and
# ``M2' = sum v' (d - mean)^2``. General pair weights (``SOURCE_PAIRS``) hold the row's pair-weight
# sum in ``W`` and its wMSE in ``M2`` (sums over column parts: they add). The generalized JSD
# (``SOURCE_JSD``) holds the row's divergence in ``a``, ``sum P log(P / M)`` in STAT_KL_P and
# ``sum Q log(Q / M)`` in two parts, over the student's maximal classes (STAT_KL_Q_TOP, the
# wMSE's M2 slot) and over the others (STAT_KL_Q), so that the gradient at a dominant class
# does not cancel (sums over column parts once every part has the whole row's normalisers).
(STAT_MS, STAT_ZS, STAT_MT, STAT_ZT, STAT_A, STAT_ZW, STAT_L, STAT_W, STAT_PH, STAT_PL, STAT_M2,
 STAT_KEPT, STAT_ERROR, STAT_DM, STAT_KL_P, STAT_KL_Q) = range(16)
STAT_KL_Q_TOP = STAT_M2
NUM_STATS = 16  # 64-byte rows
ERROR_LABEL = 1.0  # a label outside [0, C) that is not ignore_index
ERROR_WEIGHT = 2.0  # a weight (explicit factor or prior entry) negative, inf or NaN

# Column parts of pair-weight rows, float32 (NUM_PART_PLANES, P, B): the pair kernels' forward
# writes, for each of the P column tiles of each row, the tile's wMSE and pair-weight sums, a flag
# for an invalid weight read there, the cross-entropy statistics of the tile's columns (as above),
# and the row's kept and label-error flags; the finishing kernel merges them into the statistics.
(PART_WMSE, PART_WSUM, PART_INVALID, PART_MS, PART_ZS, PART_MT, PART_ZT, PART_A, PART_KEPT,
 PART_LABEL_ERROR) = range(10)
NUM_PART_PLANES = 10

# Batch totals, float32 (NUM_TOTALS,): the normaliser ``N = DEN 2^(2K)`` kept as an exponent
# ``K`` (the largest row scale) and a mantissa, so that no weight scale overflows or underflows.
(TOTAL_K, TOTAL_DEN, TOTAL_ROWS, TOTAL_WMSE, TOTAL_CE, TOTAL_ERROR) = range(6)
NUM_TOTALS = 8


def compute_dtype(student, teacher):
    """float64 when either logit tensor is float64, else float32: the dtype of the arithmetic,
    the statistics, the totals and the loss on both backends."""
    return torch.promote_types(torch.float32, torch.promote_types(student.dtype, teacher.dtype))


def float32_pair(x):
    """A float option as the float32 pair ``(hi, lo)`` with ``hi + lo = x`` to about 2^-48
    (``option`` in the kernels): Triton passes Python floats as float32, and the float64
    kernels need the option to float64 precision."""
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond float32: as float32 gives it
        return float("inf") if x > 0 else float("-inf"), 0.0
    return hi, x - hi


class KernelOptions(NamedTuple):
    """The float options as the kernels take them, each a ``float32_pair`` ``(hi, lo)``."""

    gamma: tuple[float, float]
    inv_t: tuple[float, float]  # 1 / temperature
    inv_t2: tuple[float, float]  # 1 / weight_temperature
    mse_weight: tuple[float, float]
    ce_weight: tuple[float, float]
    beta: tuple[float, float]


@dataclass(frozen=True)
class RowConfig:
    """The options of one rank-one loss evaluation (see ``gkl_loss``). ``block_c = 0``: the
    launcher picks the tile width."""

    source: int = SOURCE_TEACHER
    gamma: float = 1.0
    temperature: float = 1.0
    weight_temperature: float = 1.0
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    normalize_batch: bool = False
    symmetric: bool = True
    has_labels: bool = False
    ignore_index: int = -100
    num_labels: int = 0  # labels index [0, num_labels); 0: the columns C
    use_triton: bool = False
    block_c: int = 0
    per_row: bool = False  # SOURCE_PAIRS: (B, C, C) weights, else (C, C)
    dot_precision: int = 0  # SOURCE_PAIRS, (C, C) under Triton: index in DOT_PRECISIONS
    beta: float = 0.5  # SOURCE_JSD: the teacher's share of the mixture
    jsd_round: int = JSD_WHOLE_ROWS  # SOURCE_JSD: what the row op forms (see JSD_WHOLE_ROWS)

    @property
    def with_ce(self):
        return self.ce_weight != 0

    @property
    def with_wmse(self):
        return self.source in WMSE_SOURCES and self.mse_weight != 0

    @property
    def jsd_form(self):
        """``JSD_FORWARD_KL`` (beta = 0), ``JSD_REVERSE_KL`` (beta = 1) or ``JSD_MIXTURE``."""
        return JSD_FORWARD_KL if self.beta == 0 else \
            JSD_REVERSE_KL if self.beta == 1 else JSD_MIXTURE

    @cached_property
    def kernel_options(self) -> KernelOptions:
        """The float options packed for the kernels, once per config."""
        return KernelOptions(float32_pair(self.gamma), float32_pair(1.0 / self.temperature),
                             float32_pair(1.0 / self.weight_temperature),
                             float32_pair(self.mse_weight), float32_pair(self.ce_weight),
                             float32_pair(self.beta))

    @property
    def floats(self):
        return [float(getattr(self, f.name)) for f in fields(self) if f.type is float]

    @property
    def ints(self):
        return [int(getattr(self, f.name)) for f in fields(self) if f.type is not float]

    @classmethod
    def unpack(cls, floats, ints):
        values = iter(floats), iter(ints)
        return cls(**{f.name: (float(next(values[0])) if f.type is float
                               else f.type(next(values[1]))) for f in fields(cls)})
