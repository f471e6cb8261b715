"""Triton kernels and launchers for the GKL loss with rank-one pair weights ``w[b,j,k] = v_j v_k``.

Per row ``b`` (SPEC.md, exact O(C) form, centred): with ``d = t - s``, ``W = sum_j v_j``,
``mu = sum_j v_j d_j / W``,

    wmse_b = 2 W sum_j v_j (d_j - mu)^2          d wmse_b / d d_j = 4 W v_j (d_j - mu)
    ce_b   = lse(s / T) - sum_j softmax(t / T)_j s_j / T

The forward kernel makes one pass over a row (tile by tile, online softmaxes, Chan's merge of the
weighted mean and variance between tiles) and writes ``wmse_b``, ``ce_b`` and five float32
statistics per row: ``W``, ``mu``, ``lse(s/T)``, ``lse(t/T)``, ``lse(t/T2)``. The backward kernel
makes one more pass and rebuilds every per-element quantity from those statistics. All values are
taken relative to the row's first element (``s - s_0``, ``t - t_0``): an exact float32 shift that
keeps the loss invariant under per-row offsets of 1e4 and more.

Byte budget on a GPU, in ``B x C`` transfers (one transfer = one read or write of a ``B x C``
tensor in its dtype): the floor is 3 (read s, read t, write grad s). Forward: read s, read t = 2.
Backward: read s, read t, write grad s = 3 (+1 write of grad t when the teacher needs it). Total
5 (6 with the teacher's gradient); an explicit ``(B, C)`` weight tensor adds 1 read per pass
(7 or 8). The class prior adds ``B x C`` gathered reads of ``(C, C)`` rows per pass in the same way.
Per-row extra traffic is O(1): 7 float32 values written forward, 7 read backward. No ``B x C``
buffer exists beyond the returned gradients.
"""

import torch
import triton
import triton.language as tl

from gkl_kernels.buffers import empty_gradients

# weight sources (``SOURCE`` constexpr)
SOURCE_TEACHER = 0  # v = softmax(t / T2) ** gamma
SOURCE_PRIOR = 1  # v = prior[label] ** gamma
SOURCE_EXPLICIT = 2  # v given, (B, C)
SOURCE_NONE = 3  # no rank-one wMSE: the cross-entropy and its statistics only (wmse_b = 0)

NUM_STATS = 5  # W, mu, lse(s/T), lse(t/T), lse(t/T2); all relative to the row pivots
MAX_BLOCK_C = 4096
LOG2E = tl.constexpr(1.4426950408889634)


def pick_block_c(num_classes, block_c=None):
    """Columns per tile: the whole row up to ``MAX_BLOCK_C`` (a power of two), else tiles of it."""
    if block_c is not None:
        return block_c
    return min(triton.next_power_of_2(num_classes), MAX_BLOCK_C)


def pick_num_warps(block_c):
    """Warps per program, at most 8: 8 elements per thread and tile up to 2048 columns, 16 at
    4096 (16 warps there spill 16 bytes on sm_90a with triton 3.2)."""
    return max(1, min(8, block_c // 256))


@triton.jit
def _row_bases(s_ptr, t_ptr, v_ptr, labels_ptr, row, s_stride_b, t_stride_b, v_stride_b,
               SOURCE: tl.constexpr):
    """Start pointers of row ``row`` of s, t and of the factor (for the prior, the row of the
    row's label), and the pivots ``s_0``, ``t_0`` in float32."""
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    if SOURCE == 1:
        v_row = v_ptr + tl.load(labels_ptr + row).to(tl.int64) * v_stride_b
    else:
        v_row = v_ptr + row * v_stride_b
    return s_row, t_row, v_row, tl.load(s_row).to(tl.float32), tl.load(t_row).to(tl.float32)


@triton.jit
def relative_row_tiles(s_row, t_row, c0, C, s_stride_c, t_stride_c, s_pivot, t_pivot,
                    BLOCK_C: tl.constexpr):
    """Columns ``c0 .. c0 + BLOCK_C`` (int64) of s and t, their mask, and both tiles in float32
    relative to the row pivots (0 in masked-off lanes)."""
    cols64 = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = cols64 < C
    s = tl.load(s_row + cols64 * s_stride_c, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_row + cols64 * t_stride_c, mask=mask, other=0.0).to(tl.float32)
    return cols64, mask, tl.where(mask, s - s_pivot, 0.0), tl.where(mask, t - t_pivot, 0.0)


@triton.jit
def _rank1_factor_tile(t_rel, v_row, y_cols, mask, gamma, inv_t2, m2, SOURCE: tl.constexpr):
    """The rank-one factor on one tile: ``exp(gamma (t/T2 - m2))`` for the teacher source (scaled
    by the running maximum ``m2``), ``p ** gamma`` for a prior row, ``v`` for explicit weights."""
    if SOURCE == 0:
        v = tl.exp2((t_rel * inv_t2 - m2) * (gamma * LOG2E))
    elif SOURCE == 1:
        p = tl.load(v_row + y_cols, mask=mask, other=1.0).to(tl.float32)
        v = tl.where(p > 0.0, tl.exp2(gamma * tl.log2(p)), tl.where(gamma == 0.0, 1.0, 0.0))
    else:
        v = tl.load(v_row + y_cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, v, 0.0)


@triton.jit
def gkl_rank1_fwd_kernel(
    s_ptr, t_ptr, v_ptr, labels_ptr, wmse_ptr, ce_ptr, stats_ptr,
    C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, v_stride_b, v_stride_c,
    gamma, inv_t, inv_t2,
    SOURCE: tl.constexpr, WITH_CE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per row: ``wmse_ptr[b]``, ``ce_ptr[b]`` (float32, (B,)) and the row statistics
    ``stats_ptr[b, :5]``. Inputs ``s``, ``t`` (B, C) of any float dtype; ``v_ptr`` is the explicit
    (B, C) factor, the (C, C) prior (rows picked by ``labels_ptr``), or unused."""
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row, v_row, s_pivot, t_pivot = _row_bases(
        s_ptr, t_ptr, v_ptr, labels_ptr, row, s_stride_b, t_stride_b, v_stride_b, SOURCE)

    zero = tl.sum(tl.zeros([BLOCK_C], dtype=tl.float32), axis=0)
    # weighted mean / M2 of d (Chan's merge); u-scale running max for the teacher source
    w_sum = zero
    mean = zero
    m2_sum = zero
    m_w = zero - float("inf")
    z_w = zero
    # online softmaxes at T: student lse, teacher normaliser, sum_j e_t (s_j - s_0) / T
    m_s = zero - float("inf")
    z_s = zero
    m_t = zero - float("inf")
    z_t = zero
    e_t_dot_s = zero
    for c0 in range(0, C, BLOCK_C):
        cols64, mask, s_rel, t_rel = relative_row_tiles(
            s_row, t_row, c0, C, s_stride_c, t_stride_c, s_pivot, t_pivot, BLOCK_C)

        if SOURCE == 0:  # (the teacher source)
            m_w_new = tl.maximum(m_w, tl.max(tl.where(mask, t_rel * inv_t2, -float("inf")), axis=0))
            rescale_z = tl.exp(m_w - m_w_new)
            z_w = z_w * rescale_z + tl.sum(tl.where(mask, tl.exp(t_rel * inv_t2 - m_w_new), 0.0), axis=0)
            # the first tile has nothing to rescale (and -inf * gamma is NaN at gamma = 0)
            shift = tl.where(m_w > -float("inf"), m_w - m_w_new, 0.0)
            rescale_w = tl.exp2(shift * (gamma * LOG2E))
            w_sum = w_sum * rescale_w
            m2_sum = m2_sum * rescale_w
            m_w = m_w_new
        if SOURCE != 3:
            v = _rank1_factor_tile(t_rel, v_row, cols64 * v_stride_c, mask, gamma, inv_t2, m_w,
                                   SOURCE)
            d = t_rel - s_rel
            w_tile = tl.sum(v, axis=0)
            mean_tile = tl.sum(v * d, axis=0) / tl.where(w_tile > 0.0, w_tile, 1.0)
            dev = tl.where(mask, d - mean_tile, 0.0)
            m2_tile = tl.sum(v * dev * dev, axis=0)
            w_new = w_sum + w_tile
            frac = tl.where(w_new > 0.0, w_tile / tl.where(w_new > 0.0, w_new, 1.0), 0.0)
            delta = mean_tile - mean
            mean = mean + delta * frac
            m2_sum = m2_sum + m2_tile + delta * delta * w_sum * frac
            w_sum = w_new

        if WITH_CE:
            s_t = tl.where(mask, s_rel * inv_t, -float("inf"))
            m_s_new = tl.maximum(m_s, tl.max(s_t, axis=0))
            z_s = z_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s_t - m_s_new), axis=0)
            m_s = m_s_new
            t_t = tl.where(mask, t_rel * inv_t, -float("inf"))
            m_t_new = tl.maximum(m_t, tl.max(t_t, axis=0))
            rescale_t = tl.exp(m_t - m_t_new)
            e_t = tl.exp(t_t - m_t_new)
            z_t = z_t * rescale_t + tl.sum(e_t, axis=0)
            e_t_dot_s = e_t_dot_s * rescale_t + tl.sum(e_t * (s_rel * inv_t), axis=0)
            m_t = m_t_new

    lse_w = m_w + tl.log(z_w)
    if SOURCE == 0:
        # v = u * Z2^-gamma: rescale W and M2 from the running-max scale to the true softmax ** gamma
        unscale = tl.exp2(-gamma * tl.log2(z_w))
        w_sum = w_sum * unscale
        m2_sum = m2_sum * unscale
    tl.store(wmse_ptr + row, 2.0 * w_sum * m2_sum)
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)
    if WITH_CE:
        tl.store(ce_ptr + row, lse_s - e_t_dot_s / z_t)
    else:
        tl.store(ce_ptr + row, zero)
    stats_row = stats_ptr + row * 5
    tl.store(stats_row + 0, w_sum)
    tl.store(stats_row + 1, mean)
    tl.store(stats_row + 2, lse_s)
    tl.store(stats_row + 3, lse_t)
    tl.store(stats_row + 4, lse_w)


@triton.jit
def gkl_rank1_bwd_kernel(
    s_ptr, t_ptr, v_ptr, labels_ptr, stats_ptr, grad_wmse_ptr, grad_ce_ptr, ds_ptr, dt_ptr,
    C, s_stride_b, s_stride_c, t_stride_b, t_stride_c, v_stride_b, v_stride_c,
    gamma, inv_t, inv_t2,
    SOURCE: tl.constexpr, WITH_CE: tl.constexpr, SYMMETRIC: tl.constexpr,
    NEED_DS: tl.constexpr, NEED_DT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One program per row: ``ds = g_ce (q - p) / T - [SYMMETRIC] g_d``, ``dt = g_d`` with
    ``g_d = 4 g_wmse W v (d - mu)``, ``q = softmax(s/T)``, ``p = softmax(t/T)``; ``g_wmse``, ``g_ce``
    are the (B,) gradients of the row outputs. ``ds``/``dt`` are contiguous (B, C) in the inputs'
    dtypes."""
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row, v_row, s_pivot, t_pivot = _row_bases(
        s_ptr, t_ptr, v_ptr, labels_ptr, row, s_stride_b, t_stride_b, v_stride_b, SOURCE)
    stats_row = stats_ptr + row * 5
    w_sum = tl.load(stats_row + 0)
    mean = tl.load(stats_row + 1)
    lse_s = tl.load(stats_row + 2)
    lse_t = tl.load(stats_row + 3)
    lse_w = tl.load(stats_row + 4)
    coef_d = 4.0 * tl.load(grad_wmse_ptr + row).to(tl.float32) * w_sum
    coef_ce = tl.load(grad_ce_ptr + row).to(tl.float32) * inv_t
    for c0 in range(0, C, BLOCK_C):
        cols64, mask, s_rel, t_rel = relative_row_tiles(
            s_row, t_row, c0, C, s_stride_c, t_stride_c, s_pivot, t_pivot, BLOCK_C)
        g_d = tl.zeros([BLOCK_C], dtype=tl.float32)
        if SOURCE != 3:
            v = _rank1_factor_tile(t_rel, v_row, cols64 * v_stride_c, mask, gamma, inv_t2, lse_w,
                                   SOURCE)
            g_d = coef_d * v * ((t_rel - s_rel) - mean)
        if NEED_DS:
            ds = tl.zeros([BLOCK_C], dtype=tl.float32)
            if WITH_CE:
                q = tl.exp(s_rel * inv_t - lse_s)
                p = tl.exp(t_rel * inv_t - lse_t)
                ds = coef_ce * (q - p)
            if SYMMETRIC:
                ds = ds - g_d
            tl.store(ds_ptr + row * C + cols64, ds.to(ds_ptr.dtype.element_ty), mask=mask)
        if NEED_DT:
            tl.store(dt_ptr + row * C + cols64, g_d.to(dt_ptr.dtype.element_ty), mask=mask)


def _factor_args(source, factor, labels, like):
    """Pointer, strides and labels for the factor operand; the teacher and no-weight sources pass
    ``like``."""
    if source in (SOURCE_TEACHER, SOURCE_NONE):
        return like, 0, 0, like
    return factor, factor.stride(0), factor.stride(1), labels if labels is not None else factor


def rank1_rows_forward(student, teacher, factor, labels, source, gamma, temperature,
                       weight_temperature, with_ce, block_c=None):
    """Launch the forward kernel: returns ``(wmse (B,), ce (B,), stats (B, 5))`` in float32."""
    batch, num_classes = student.shape
    wmse = torch.empty(batch, dtype=torch.float32, device=student.device)
    ce = torch.empty(batch, dtype=torch.float32, device=student.device)
    stats = torch.empty(batch, NUM_STATS, dtype=torch.float32, device=student.device)
    v_ptr, v_sb, v_sc, labels_ptr = _factor_args(source, factor, labels, student)
    block = pick_block_c(num_classes, block_c)
    gkl_rank1_fwd_kernel[(batch,)](
        student, teacher, v_ptr, labels_ptr, wmse, ce, stats,
        num_classes, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        v_sb, v_sc, float(gamma), 1.0 / temperature, 1.0 / weight_temperature,
        SOURCE=source, WITH_CE=with_ce, BLOCK_C=block, num_warps=pick_num_warps(block),
    )
    return wmse, ce, stats


def rank1_rows_backward(grad_wmse, grad_ce, student, teacher, factor, labels, stats, source, gamma,
                        temperature, weight_temperature, with_ce, symmetric, need_ds, need_dt,
                        block_c=None):
    """Launch the backward kernel: returns ``(grad_student, grad_teacher)``, each ``(B, C)`` in its
    input's dtype or an empty tensor when not needed."""
    batch, num_classes = student.shape
    ds, dt = empty_gradients(student, teacher, need_ds, need_dt)
    v_ptr, v_sb, v_sc, labels_ptr = _factor_args(source, factor, labels, student)
    block = pick_block_c(num_classes, block_c)
    gkl_rank1_bwd_kernel[(batch,)](
        student, teacher, v_ptr, labels_ptr, stats, grad_wmse, grad_ce,
        ds if need_ds else student, dt if need_dt else teacher,
        num_classes, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        v_sb, v_sc, float(gamma), 1.0 / temperature, 1.0 / weight_temperature,
        SOURCE=source, WITH_CE=with_ce, SYMMETRIC=symmetric, NEED_DS=need_ds, NEED_DT=need_dt,
        BLOCK_C=block, num_warps=pick_num_warps(block),
    )
    return ds, dt
