"""What the pair-weight kernels need of the loss around the wMSE: the backward's ``PairLossTerms``
(to form the whole loss's gradient, the wMSE's and the cross-entropy's, ignored rows 0, rather
than the rows' wMSE gradient alone) and the kernel arguments made from it; the forward's
scalars."""

from dataclasses import dataclass
from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from gkl_kernels.core.config import NUM_PART_PLANES, PART_WSUM, RowConfig

WMSE_ONLY = RowConfig(mse_weight=0.0, ce_weight=0.0)  # pair_rows: the rows' wMSE alone


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
    config = WMSE_ONLY if loss is None else loss.config
    options = config.kernel_options
    return (config.ignore_index, *options.inv_t, *options.mse_weight, *options.ce_weight)


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
    config = config or WMSE_ONLY
    return (config.ignore_index, config.num_labels or num_classes,
            *config.kernel_options.inv_t)


def part_planes(config):
    """The planes of the forward kernels' parts: all of them for the loss (``config`` given), the
    wMSE and weight sums alone for ``pair_rows`` (the kernels' ``LOSS`` flag)."""
    return NUM_PART_PLANES if config is not None else PART_WSUM + 1


@triton.jit
def pair_loss_coefficients(kept, totals_ptr, grad, mse_weight, ce_weight, inv_t,
                           NORMALIZE_BATCH: tl.constexpr):
    """``(coef_g, coef_ce)`` of rows under pair weights (``kept``: their flags): ``dL/dd =
    coef_g g`` (``2 mse_weight / 4N``) and the cross-entropy's ``dL/ds = coef_ce (q - p)``,
    scaled by the incoming ``grad``; 0 for rows not kept."""
    rows_kept = tl.maximum(tl.load(totals_ptr + 2), 1.0)
    if NORMALIZE_BATCH:
        norm = 1.0 / rows_kept
    else:
        den = tl.load(totals_ptr + 1)
        norm = tl.where(den != 0.0, 1.0 / tl.where(den != 0.0, den, 1.0), 0.0)
    live = kept > 0.0
    return (tl.where(live, grad * 0.5 * mse_weight * norm, 0.0),
            tl.where(live, grad * ce_weight * inv_t / rows_kept, 0.0))
