"""What the pair-weight kernels need of the loss around the wMSE: the backward's ``PairLossTerms``
(to form the whole loss's gradient, the wMSE's and the cross-entropy's, ignored rows 0, rather
than the rows' wMSE gradient alone) and the kernel arguments made from it; the forward's
scalars."""

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from gkl_kernels.rank1.config import NUM_PART_PLANES, PART_WSUM, RowConfig
from gkl_kernels.rank1.kernels import float32_pair


@dataclass(frozen=True)
class PairLossTerms:
    """The rows' statistics ``(B, NUM_STATS)`` (cross-entropy, kept flags), the batch totals, the
    labels (None: every row kept) and the loss's options."""

    stats: Tensor
    totals: Tensor
    labels: Optional[Tensor]
    config: RowConfig


def loss_arguments(loss, like, grad):
    """Pointers ``(labels, stats, totals, grad)`` (``like`` where unused)."""
    if loss is None:
        return like, like, like, grad
    labels = like if loss.labels is None else loss.labels
    return labels, loss.stats, loss.totals, grad


def loss_scalars(loss):
    """``(ignore_index, 1 / T, mse_weight, ce_weight)``, the floats as ``float32_pair``s."""
    if loss is None:
        return -100, *float32_pair(1.0), *float32_pair(0.0), *float32_pair(0.0)
    config = loss.config
    return (config.ignore_index, *float32_pair(1.0 / config.temperature),
            *float32_pair(config.mse_weight), *float32_pair(config.ce_weight))


def loss_flags(loss):
    """The constexpr flags ``LOSS``, ``HAS_LABELS``, ``WITH_CE``, ``NORMALIZE_BATCH``,
    ``SYMMETRIC``."""
    if loss is None:
        return dict(LOSS=False, HAS_LABELS=False, WITH_CE=False, NORMALIZE_BATCH=False,
                    SYMMETRIC=True)
    config = loss.config
    return dict(LOSS=True, HAS_LABELS=loss.labels is not None, WITH_CE=config.with_ce,
                NORMALIZE_BATCH=config.normalize_batch, SYMMETRIC=config.symmetric)


def part_scalars(config, num_classes):
    """The forward kernels' ``(ignore_index, num_labels, 1 / T)`` (``config`` None: defaults),
    ``1 / T`` as a ``float32_pair``."""
    config = config or RowConfig()
    return (config.ignore_index, config.num_labels or num_classes,
            *float32_pair(1.0 / config.temperature))


def part_planes(config):
    """The planes of the forward kernels' parts: all of them for the loss (``config`` given), the
    wMSE and weight sums alone for ``pair_rows`` (the kernels' ``LOSS`` flag)."""
    return NUM_PART_PLANES if config is not None else PART_WSUM + 1
