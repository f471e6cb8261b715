"""Plain-PyTorch paths for general pair weights, the same row outputs as the Triton kernels.

A class is present in a row when neither logit is ``-inf`` (``in_j``); absent classes drop out of
every pair (``w[j, k] in_j in_k``). On the present classes ``d = t - s`` is formed in float64
(exact for float32 logits) and centred on its row mean (an exact identity: the pairwise sum ignores
per-row offsets). With ``S = M + M^T`` (shared) or ``w + w^T`` (per row) on the present pairs:

    g_n = sum_k S[n, k] (d_n - d_k) = deg_n d_n - (S d)_n,   deg = S in
    wmse = sum_n d_n g_n = sum_{j,k} w[j, k] (d_j - d_k)^2,   d wmse / d d = 2 g

The expansion cancels when a cluster of weighted classes sits at an offset ``c`` from the row mean
(its relative error is about ``eps c / spread``); in float64 that stays below float32 rounding for
offsets to 1e6, where a float32 product loses everything. Shared ``(C, C)`` weights cost one
float64 ``(B, C) @ (C, C)`` product (``2 B C^2`` FLOPs; twice that on CUDA, and on CPU when a
class is absent somewhere, for the degree rows ``in @ S``), taken in row blocks of ``S`` so
that no float64 copy of ``M`` exists; per-row ``(B, C, C)`` weights two batched matrix-vector
products per chunk of rows (at most ``CHUNK_ELEMENTS`` weights), each converted to float64 once.
No ``B x C x C`` temporary exists. The forward also returns ``g``
(float32), so that the backward is one product.
"""

import torch

from gkl_kernels.core.config import STAT_ERROR, STAT_KEPT, STAT_M2, STAT_W
from gkl_kernels.core.config import compute_dtype
from gkl_kernels.rank1.torch_impl import row_stats_torch

CHUNK_ELEMENTS = 1 << 18  # float64 elements of one per-row weight chunk (2 MiB)
SHARED_BLOCK_ELEMENTS = 1 << 17  # float64 elements of one row block of S (1 MiB)
NEG_INF = float("-inf")


def _present_differences(student, teacher, live_rows):
    """``(d, present)``: ``d = t - s`` in float64, 0 on absent classes and centred on the present
    ones' row mean, (B, C); ``present`` the float64 mask ``in``, or None when every class of every
    row is present (known for free on CPU; on CUDA it is never assumed). Rows where ``live_rows``
    (B,) is False have no class present."""
    d = teacher.to(torch.float64, copy=True).sub_(student)  # never the caller's tensor
    present = (student != NEG_INF) & (teacher != NEG_INF)
    if live_rows is not None:
        present &= live_rows[:, None]
    if d.device.type == "cpu" and bool(present.all()):
        return d.sub_(d.mean(dim=1, keepdim=True)), None
    d.masked_fill_(~present, 0.0)
    count = present.sum(dim=1, keepdim=True).clamp_min(1)
    d.sub_(d.sum(dim=1, keepdim=True) / count).masked_fill_(~present, 0.0)
    return d, present.double()


def _shared_terms(d, present, weights):
    """``(g (B, C), weight_sum (B,))`` in float64 for shared ``(C, C)`` weights (``present``
    None: every class present, one set of degrees for all rows)."""
    batch, num_classes = d.shape
    operand = d if present is None else torch.cat([d, present])
    product = torch.zeros_like(operand)
    degree = d.new_empty(num_classes)  # S 1 (S is symmetric)
    block = max(1, SHARED_BLOCK_ELEMENTS // num_classes)
    for start in range(0, num_classes, block):
        rows = slice(start, start + block)
        pair = weights[rows].to(torch.float64, copy=True)
        pair += weights[:, rows].T  # S[rows, :]
        product.addmm_(operand[:, rows], pair)
        if present is None:
            degree[rows] = pair.sum(dim=1)
    if present is None:
        return product.neg_().addcmul_(d, degree), (0.5 * degree.sum()).expand(batch)
    degree, g = product[batch:], product[:batch]
    weight_sum = 0.5 * torch.linalg.vecdot(present, degree)
    return g.neg_().addcmul_(degree, d).mul_(present), weight_sum


def _per_row_terms(d, present, weights):
    """``(g (B, C), weight_sum (B,))`` in float64 for per-row ``(B, C, C)`` weights (``present``
    None: every class present): per chunk of rows, ``w [in, d]`` gives the present row sums and
    ``w d``, ``[in, d]^T w`` the column sums and ``w^T d``."""
    batch, num_classes = d.shape
    present = torch.ones_like(d) if present is None else present
    g = torch.empty_like(d)
    weight_sum = d.new_empty(batch)
    chunk = max(1, CHUNK_ELEMENTS // (num_classes * num_classes))
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        w = weights[rows].double()  # one float64 chunk alive at a time
        operand = torch.stack([present[rows], d[rows]], dim=2)  # (b, C, 2)
        by_rows = torch.bmm(w, operand)  # r, w d
        by_cols = torch.bmm(operand.transpose(1, 2), w)  # c, w^T d
        degree = by_rows[:, :, 0] + by_cols[:, 0, :]
        g[rows] = present[rows] * (degree * d[rows] - by_rows[:, :, 1] - by_cols[:, 1, :])
        weight_sum[rows] = torch.linalg.vecdot(present[rows], by_rows[:, :, 0])
    return g, weight_sum


def pair_rows_forward_torch(student, teacher, weights, per_row, live_rows=None):
    """``(wmse (B,), weight_sum (B,), g (B, C))`` in ``compute_dtype``, the first two as the Triton
    launchers; ``g`` for ``pair_rows_backward_torch``. Rows where ``live_rows`` is False give
    zeros."""
    d, present = _present_differences(student, teacher, live_rows)
    g, weight_sum = (_per_row_terms if per_row else _shared_terms)(d, present, weights)
    dtype = compute_dtype(student, teacher)
    return torch.linalg.vecdot(d, g).to(dtype), weight_sum.to(dtype), g.to(dtype)


def pair_loss_stats_torch(student, teacher, weights, labels, config, keep_directions):
    """``(stats, softmax_difference, g)`` of the loss with pair weights (``SOURCE_PAIRS``): the
    rank-one path's cross-entropy statistics with the rows' wMSE and pair-weight sums in ``M2``
    and ``W`` (0 on rows not kept); the last two as ``row_stats_torch``'s directions."""
    stats, softmax_difference, _ = row_stats_torch(student, teacher, None, labels, config,
                                                   keep_directions)
    live = None if labels is None else (stats[:, STAT_KEPT] > 0) & (stats[:, STAT_ERROR] == 0)
    wmse, weight_sum, g = pair_rows_forward_torch(student, teacher, weights, config.per_row, live)
    stats[:, STAT_M2], stats[:, STAT_W] = wmse, weight_sum
    return stats, softmax_difference, g if keep_directions else g.new_empty(0)


def pair_rows_backward_torch(grad_wmse, student, teacher, g, need_ds, need_dt):
    """``(grad_student, grad_teacher)``: ``dt = 2 g_wmse g``, ``ds = -dt`` (empty when not
    needed)."""
    g_d = g * (2.0 * grad_wmse.to(g.dtype))[:, None]
    ds = (-g_d).to(student.dtype) if need_ds else student.new_empty(0)
    dt = g_d.to(teacher.dtype) if need_dt else teacher.new_empty(0)
    return ds, dt
