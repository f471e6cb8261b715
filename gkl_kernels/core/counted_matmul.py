"""The fused losses' matrix products over the rows they read, the row count kept on the device.

The rows a fused loss reads (labels not ``ignore_index``) come first (``projected_rows``); their
count ``R`` is a 0-dim device tensor, never read on the host. A chunk of ``c`` rows starting at
``start`` reads ``r = clamp(R - start, 0, c)`` of them, and each product of the chunk loop skips
the others in the kernel:

- ``rows`` counted, ``C = A B (+ bias)`` for ``A`` ``(c, K)``: rows ``>= r`` of ``C`` are 0,
  their tiles are neither loaded nor multiplied (the logits ``h W^T + b``; ``dh = g W``);
- ``reduction`` counted, ``C += A B`` for ``A`` ``(M, c)``, ``B`` ``(c, N)``: the sum runs over
  the first ``r`` of the ``c`` terms, a tile with ``r = 0`` is not touched (``dW += g^T h``).

``A`` and ``B`` have one dtype (a float32 logit gradient is rounded to a bfloat16 head's dtype
first, as for the eager products), multiplied on the matrix units with float32 sums; float32 heads
take ``tl.dot``'s ``input_precision`` from torch's ``allow_tf32`` (torch's default: ``"ieee"``,
full float32 as cuBLAS). One program per ``BLOCK_M x BLOCK_N`` tile of ``C``, in groups of
``GROUP_M`` tile rows (the operand tiles a group reads stay in L2); each output tile has one
writer, so the sums are deterministic.
"""

import torch
import triton
import triton.language as tl

COUNT_ROWS, COUNT_REDUCTION = 0, 1
COUNTED = {"rows": COUNT_ROWS, "reduction": COUNT_REDUCTION}
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) per operand kind: half-precision
# and tf32 operands on the matrix units, full float32 on the FMA units (smaller tiles).
TILES = {"half": (128, 128, 64, 8, 8, 3), "tf32": (128, 128, 32, 8, 8, 3),
         "ieee": (64, 64, 32, 8, 4, 3)}


@triton.jit
def counted_matmul_kernel(
        a_ptr, b_ptr, c_ptr, bias_ptr, count_ptr, row_offset, M, N, K,
        a_stride_m, a_stride_k, b_stride_k, b_stride_n, c_stride_m, c_stride_n,
        COUNTED: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One ``BLOCK_M x BLOCK_N`` tile of ``C (+)= A B (+ bias)`` over the rows read:
    ``r = clamp(count - row_offset)`` rows of ``A`` and ``C`` (``COUNTED == COUNT_ROWS``) or
    terms of the sum (``COUNT_REDUCTION``)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % group) % group_rows
    tile_n = (pid % group) // group_rows
    read = tl.maximum(tl.load(count_ptr).to(tl.int64) - row_offset, 0)
    rows = M
    depth = K
    if COUNTED == 0:
        rows = tl.minimum(read, M)
    else:
        depth = tl.minimum(read, K)
    offs_m = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    live_m = offs_m < rows
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if (tile_m * BLOCK_M < rows) & (depth > 0):
        a_ptrs = a_ptr + offs_m[:, None] * a_stride_m + offs_k[None, :] * a_stride_k
        b_ptrs = b_ptr + offs_k[:, None] * b_stride_k + offs_n[None, :] * b_stride_n
        for start in range(0, depth, BLOCK_K):
            in_k = offs_k < depth - start
            a = tl.load(a_ptrs, mask=live_m[:, None] & in_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
            if INTERPRETED:  # the interpreter multiplies half precision as raw bits
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * a_stride_k
            b_ptrs += BLOCK_K * b_stride_k
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)
        acc = tl.where(live_m[:, None], acc + bias[None, :], 0.0)
    c_ptrs = c_ptr + offs_m[:, None] * c_stride_m + offs_n[None, :] * c_stride_n
    c_rows = M
    if ACCUMULATE:  # an unread chunk leaves C as it is: no row loaded or stored
        c_rows = M * tl.minimum(depth, 1)
    c_mask = (offs_m < c_rows)[:, None] & in_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    if INTERPRETED:
        acc = rounded_for(acc, c_ptr.dtype.element_ty)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def rounded_for(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded to nearest even at bfloat16's precision for a ``DTYPE`` store (the
    interpreter's conversion truncates; a GPU's rounds); other dtypes: ``x``."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


# Triton's interpreter made the kernels (TRITON_INTERPRET set when triton was imported)
KERNELS_INTERPRETED = not isinstance(counted_matmul_kernel, triton.runtime.JITFunction)


def operand_kind(dtype):
    """The ``TILES`` key and ``tl.dot`` input precision of operands of ``dtype``: half precision,
    or float32 as torch multiplies it now (``torch.backends.cuda.matmul.allow_tf32``)."""
    if dtype != torch.float32:
        return "half", "ieee"
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32", "tf32"
    return "ieee", "ieee"


def counted_matmul(a, b, out, count, row_offset, counted, bias=None, accumulate=False):
    """``out (+)= a b (+ bias)`` over the rows read (module docstring): ``a`` ``(M, K)``, ``b``
    ``(K, N)`` (one dtype, any strides), ``out`` ``(M, N)`` written or, with
    ``accumulate``, added to; ``count`` a 0-dim integer tensor of the rows read from row
    ``row_offset`` on (an ``int``), ``counted`` ``"rows"`` or ``"reduction"``; ``bias`` ``(N,)``.
    Returns ``out``."""
    (m, k), n = a.shape, b.shape[1]
    kind, precision = operand_kind(b.dtype)
    block_m, block_n, block_k, group_m, num_warps, num_stages = TILES[kind]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    counted_matmul_kernel[grid](
        a, b, out, out if bias is None else bias, count, row_offset, m, n, k, *a.stride(),
        *b.stride(), *out.stride(), COUNTED=COUNTED[counted], ACCUMULATE=accumulate,
        HAS_BIAS=bias is not None, DOT_PRECISION=precision,
        INTERPRETED=KERNELS_INTERPRETED, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages)
    return out
