"""The package's one ``torch.distributed`` helper: whether a process group is running, its size,
the collectives of the synced normaliser and the vocabulary shards (each the identity without an
initialised process group), and the gathering of sharded (``DTensor``) output layers."""

import sys

import torch
from torch import distributed

from gkl_kernels.core.config import (STAT_A, STAT_KL_P, STAT_KL_Q, STAT_KL_Q_TOP, STAT_ZS,
                                     STAT_ZT, TOTAL_CE, TOTAL_DEN, TOTAL_K, TOTAL_ROWS,
                                     TOTAL_WMSE)
from gkl_kernels.jsd.torch_impl import divergence
from gkl_kernels.rank1.torch_impl import merge_row_stats

KL_SUMS = [STAT_KL_P, STAT_KL_Q_TOP, STAT_KL_Q]


def running():
    """Whether a default process group is initialised."""
    return distributed.is_available() and distributed.is_initialized()


def whole(x, dtype):
    """A ``DTensor`` (an FSDP2-sharded head's weight or bias) as the whole tensor in ``dtype``,
    gathered (autograd returns its gradient to the shards); anything else as given."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # a DTensor exists only once it is
    return x.full_tensor().to(dtype) if dtensor and isinstance(x, dtensor.DTensor) else x


def world_size(group):
    """The processes of ``group`` (None: the default group); 1 without a process group."""
    return distributed.get_world_size(group) if running() else 1


def all_reduced(tensor, op, group):
    """``tensor`` reduced in place (``op``: ``"sum"`` or ``"max"``) over the processes of
    ``group``."""
    if running():
        reduce_op = distributed.ReduceOp.SUM if op == "sum" else distributed.ReduceOp.MAX
        distributed.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


def all_process_totals(totals, group):
    """The batch totals of every process's rows together: the largest scale exponent ``K``, then
    the sums (the normaliser mantissa and wMSE sum brought to that ``K``), two all-reduces."""
    if not running():
        return totals
    top = all_reduced(totals[TOTAL_K].clone(), "max", group)
    f = torch.exp2(totals[TOTAL_K] - top)
    sums = all_reduced(torch.stack([totals[TOTAL_DEN] * f * f, totals[TOTAL_ROWS],
                                    totals[TOTAL_WMSE] * f * f, totals[TOTAL_CE]]), "sum", group)
    merged = totals.clone()
    merged[TOTAL_K] = top
    merged[[TOTAL_DEN, TOTAL_ROWS, TOTAL_WMSE, TOTAL_CE]] = sums
    return merged


def merged_row_stats(stats, config, group):
    """The statistics of the whole vocabulary: every shard's ``(N, NUM_STATS)`` gathered (one
    all-gather) and merged in process order (``merge_row_stats``)."""
    if world_size(group) == 1:
        return stats
    parts = _gathered(stats, group)
    merged = parts[0]
    for part in parts[1:]:
        merged = merge_row_stats(merged, part, config)
    return merged


def summed_kl_stats(stats, config, group):
    """The generalized JSD's statistics of the whole vocabulary from every shard's, formed with
    the merged normalisers: the KL sums gathered (one all-gather of ``(N, 3)``) and added in
    process order, the divergence formed from them."""
    if world_size(group) == 1:
        return stats
    parts = _gathered(stats[:, KL_SUMS], group)
    sums = parts[0]
    for part in parts[1:]:
        sums = sums + part
    merged = stats.clone()
    merged[:, KL_SUMS] = sums
    merged[:, STAT_A] = divergence(*sums.unbind(1), config) + 0.0 * (
        merged[:, STAT_ZS] + merged[:, STAT_ZT])  # a NaN logit: NaN
    return merged


def _gathered(tensor, group):
    """Every process's ``tensor`` (one all-gather), in process order."""
    parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format)
             for _ in range(world_size(group))]
    distributed.all_gather(parts, tensor.contiguous(), group=group)
    return parts
