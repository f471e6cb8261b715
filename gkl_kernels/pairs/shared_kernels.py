"""Triton kernels and launchers for the pairwise wMSE with one ``(C, C)`` matrix ``M`` shared by
every row: ``w[b, j, k] = M[j, k]``.

With ``d = t - s`` per row and ``S = M + M^T`` (symmetrised tile by tile as it is loaded, no copy),

    g_n    = sum_k S[k, n] (d_n - d_k) = d_n deg_n - (D S)_n,   deg = S^T 1
    wmse_b = sum_{j,k} M[j,k] (d_j - d_k)^2 = sum_n d_n g_n,     d wmse_b / d d_n = 2 g_n

so both passes are one tiled matrix product ``D @ S`` (``tl.dot``) fused with the row reduction
(forward) or with the gradient store (backward). ``d`` is taken relative to each row's first
element (``(t - t_0) - (s - s_0)``, an exact float32 shift), which keeps the loss invariant under
per-row offsets. Products accumulate in float32; ``dot_precision`` chooses the operands on the
matrix units: ``"ieee"`` (default, exact float32 products; on NVIDIA GPUs this runs on the FMA
units, not the tensor cores), ``"tf32x3"`` (three tf32 products per term, about float32 accuracy,
tensor cores), ``"tf32"`` (operands rounded to 10 mantissa bits: relative error of ``(D S)`` up to
about 2^-10 of ``sum_k S[k, n] |d_k|``, tensor cores).

Cost per pass at ``B`` rows, ``C`` classes, tiles of ``BB`` rows by ``BC`` classes: ``2 B C^2``
FLOPs in ``tl.dot`` plus ``2 C^2 B / BB`` additions for the symmetrisation and the degrees. Bytes
from DRAM: the logits ``s``, ``t`` once (``2 B C`` elements; the ``k`` tiles are re-read from L2
once per column tile), ``M`` once when it fits in L2 (``C^2`` elements; each row tile reads it
twice, as ``M`` and as ``M^T``), and forward ``4 B C / BC`` bytes of float32 partial sums, backward
the gradients (``B C`` elements each). At B = 256, C = 1000, float32: 0.51 GFLOP per pass, 6 MB
forward and 8 MB backward with both gradients (counted from the code, not measured). Nothing of
size ``B x C x C`` exists, and no ``B x C`` buffer besides the gradients.
"""

import torch
import triton
import triton.language as tl

from gkl_kernels.buffers import empty_gradients
from gkl_kernels.validation import MIN_DOT_BLOCK
MAX_BLOCK_ROWS = 64
MAX_BLOCK_CLASSES = 32


def pick_shared_blocks(batch, num_classes, block_c=None):
    """``(BLOCK_B, BLOCK_C)``: rows per tile (a power of two in ``[16, 64]``) and classes per tile,
    both the output columns ``n`` and the reduction step ``k`` (in ``[16, 32]``, or ``block_c``)."""
    block_b = min(max(triton.next_power_of_2(batch), MIN_DOT_BLOCK), MAX_BLOCK_ROWS)
    if block_c is None:
        block_c = min(max(triton.next_power_of_2(num_classes), MIN_DOT_BLOCK), MAX_BLOCK_CLASSES)
    return block_b, block_c


def shared_launch_options(block_b, block_c):
    """``num_warps`` and ``num_stages`` for a tile: 8 warps from 1024 elements per tile and no
    software pipelining at 64 x 32, the choices under which every tile compiles without register
    spills for sm_80 and sm_90a (``python -m bench.compile_report``)."""
    tile = block_b * block_c
    return dict(num_warps=8 if tile >= 1024 else 4, num_stages=1 if tile >= 2048 else 3)


@triton.jit
def _difference_tile(s_ptr, t_ptr, rows, row_mask, cols, C, s_stride_b, s_stride_c, t_stride_b,
                     t_stride_c, s_pivot, t_pivot):
    """``d = (t - t_0) - (s - s_0)`` on ``rows x cols`` (int64 indices) in float32, 0 outside the
    matrix, and the tile's mask."""
    mask = row_mask[:, None] & (cols[None, :] < C)
    s = tl.load(s_ptr + rows[:, None] * s_stride_b + cols[None, :] * s_stride_c, mask=mask,
                other=0.0).to(tl.float32)
    t = tl.load(t_ptr + rows[:, None] * t_stride_b + cols[None, :] * t_stride_c, mask=mask,
                other=0.0).to(tl.float32)
    return mask, tl.where(mask, (t - t_pivot[:, None]) - (s - s_pivot[:, None]), 0.0)


@triton.jit
def _shared_pair_gradient_tile(
    s_ptr, t_ptr, m_ptr, B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, m_stride_j,
    m_stride_k, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """This program's tile (rows ``BLOCK_B * pid0 ..``, output classes ``n = BLOCK_C * pid1 ..``):
    its row indices and mask, its mask, ``d_n`` and ``g_n = sum_k S[k, n] (d_n - d_k)``, float32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    s_pivot = tl.load(s_ptr + rows * s_stride_b, mask=row_mask, other=0.0).to(tl.float32)
    t_pivot = tl.load(t_ptr + rows * t_stride_b, mask=row_mask, other=0.0).to(tl.float32)
    n_cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask, d_n = _difference_tile(s_ptr, t_ptr, rows, row_mask, n_cols, C, s_stride_b, s_stride_c,
                                 t_stride_b, t_stride_c, s_pivot, t_pivot)
    n_in = n_cols < C
    product = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)  # (D S)[b, n]
    degree = tl.zeros((BLOCK_C,), dtype=tl.float32)  # sum_k S[k, n]
    for k0 in range(0, C, BLOCK_C):
        k_cols = k0 + tl.arange(0, BLOCK_C).to(tl.int64)
        _, d_k = _difference_tile(s_ptr, t_ptr, rows, row_mask, k_cols, C, s_stride_b, s_stride_c,
                                  t_stride_b, t_stride_c, s_pivot, t_pivot)
        m_mask = (k_cols[:, None] < C) & n_in[None, :]
        m_kn = tl.load(m_ptr + k_cols[:, None] * m_stride_j + n_cols[None, :] * m_stride_k,
                       mask=m_mask, other=0.0).to(tl.float32)
        m_nk = tl.load(m_ptr + n_cols[None, :] * m_stride_j + k_cols[:, None] * m_stride_k,
                       mask=m_mask, other=0.0).to(tl.float32)
        pair = m_kn + m_nk
        degree += tl.sum(pair, axis=0)
        product = tl.dot(d_k, pair, product, input_precision=DOT_PRECISION)
    return rows, row_mask, n_cols, mask, d_n, d_n * degree[None, :] - product


@triton.jit
def wmse_shared_fwd_kernel(
    s_ptr, t_ptr, m_ptr, partial_ptr,
    B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, m_stride_j, m_stride_k,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(cdiv(B, BLOCK_B), cdiv(C, BLOCK_C))``: ``partial[pid1, b] = sum_{n in tile} d_n g_n``
    (float32 ``(cdiv(C, BLOCK_C), B)``; its column sums are ``wmse_b``)."""
    rows, row_mask, n_cols, mask, d_n, g = _shared_pair_gradient_tile(
        s_ptr, t_ptr, m_ptr, B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, m_stride_j,
        m_stride_k, BLOCK_B, BLOCK_C, DOT_PRECISION)
    tl.store(partial_ptr + tl.program_id(1).to(tl.int64) * B + rows, tl.sum(d_n * g, axis=1),
             mask=row_mask)


@triton.jit
def wmse_shared_bwd_kernel(
    s_ptr, t_ptr, m_ptr, grad_wmse_ptr, ds_ptr, dt_ptr,
    B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, m_stride_j, m_stride_k,
    NEED_DS: tl.constexpr, NEED_DT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Same grid: ``dt = 2 g_wmse g``, ``ds = -dt`` on the tile (contiguous ``(B, C)`` outputs in
    the inputs' dtypes); ``g_wmse`` is the (B,) gradient of ``wmse``."""
    rows, row_mask, n_cols, mask, d_n, g = _shared_pair_gradient_tile(
        s_ptr, t_ptr, m_ptr, B, C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, m_stride_j,
        m_stride_k, BLOCK_B, BLOCK_C, DOT_PRECISION)
    coef = 2.0 * tl.load(grad_wmse_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    g_d = coef[:, None] * g
    offsets = rows[:, None] * C + n_cols[None, :]
    if NEED_DS:
        tl.store(ds_ptr + offsets, (-g_d).to(ds_ptr.dtype.element_ty), mask=mask)
    if NEED_DT:
        tl.store(dt_ptr + offsets, g_d.to(dt_ptr.dtype.element_ty), mask=mask)


def _launch_args(student, teacher, weights):
    batch, num_classes = student.shape
    return (batch, num_classes, student.stride(0), student.stride(1), teacher.stride(0),
            teacher.stride(1), weights.stride(0), weights.stride(1))


def shared_rows_forward(student, teacher, weights, dot_precision="ieee", block_c=None):
    """``wmse`` (B,) float32 for shared ``(C, C)`` pair weights."""
    batch, num_classes = student.shape
    block_b, block = pick_shared_blocks(batch, num_classes, block_c)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(num_classes, block))
    partial = torch.empty(grid[1], batch, dtype=torch.float32, device=student.device)
    wmse_shared_fwd_kernel[grid](
        student, teacher, weights, partial, *_launch_args(student, teacher, weights),
        BLOCK_B=block_b, BLOCK_C=block, DOT_PRECISION=dot_precision,
        **shared_launch_options(block_b, block))
    return partial.sum(dim=0)


def shared_rows_backward(grad_wmse, student, teacher, weights, need_ds, need_dt,
                         dot_precision="ieee", block_c=None):
    """``(grad_student, grad_teacher)`` of ``shared_rows_forward``, each ``(B, C)`` in its input's
    dtype or an empty tensor when not needed."""
    batch, num_classes = student.shape
    ds, dt = empty_gradients(student, teacher, need_ds, need_dt)
    block_b, block = pick_shared_blocks(batch, num_classes, block_c)
    grid = (triton.cdiv(batch, block_b), triton.cdiv(num_classes, block))
    wmse_shared_bwd_kernel[grid](
        student, teacher, weights, grad_wmse, ds if need_ds else student,
        dt if need_dt else teacher, *_launch_args(student, teacher, weights),
        NEED_DS=need_ds, NEED_DT=need_dt, BLOCK_B=block_b, BLOCK_C=block,
        DOT_PRECISION=dot_precision, **shared_launch_options(block_b, block))
    return ds, dt
