"""Plain-PyTorch paths for general pair weights, the same row outputs as the Triton kernels.

With ``d = t - s`` centred per row (an exact identity: the pairwise sum ignores per-row offsets),
``g_n = sum_k (w[n,k] + w[k,n]) (d_n - d_k) = (r_n + c_n) d_n - (W d)_n - (W^T d)_n`` with row
sums ``r`` and column sums ``c``; ``wmse = sum_n d_n g_n`` and ``d wmse / d d = 2 g``. Shared
``(C, C)`` weights cost one ``(B, C) @ (C, C)`` product and ``C x C`` temporaries; per-row
``(B, C, C)`` weights two batched matrix-vector products; half-precision weights go in chunks of at
most an eighth of the rows and ``CHUNK_ELEMENTS`` weights, so that their float32 copy stays small.
No ``B x C x C`` temporary exists.
"""

import torch

CHUNK_ELEMENTS = 1 << 22


def relative_logits(student, teacher):
    """``(s - s_0, t - t_0)`` in float32, the pivot being each row's first element."""
    s = student.float()
    t = teacher.float()
    return s - s[:, :1], t - t[:, :1]


def _centred_differences(student, teacher):
    """``d = t - s`` in float32 minus its row mean, (B, C)."""
    s_rel, t_rel = relative_logits(student, teacher)
    d = t_rel.sub_(s_rel)
    return d.sub_(d.mean(dim=1, keepdim=True))


def _shared_gradient(d, weights):
    """``g = deg * d - d @ S`` with ``S = M + M^T`` and ``deg = S 1``, (B, C) float32."""
    pair = weights.float()
    pair = pair + pair.T
    return torch.addmm(d * pair.sum(dim=0), d, pair, alpha=-1.0)


def _per_row_chunk_gradient(w, d):
    """``g`` and the row weight sums for a chunk of rows: ``w`` float32 ``(b, C, C)``, ``d``
    ``(b, C)``. Two passes over ``w``: ``w [1, d]`` gives the row sums and ``W d``, ``[1, d]^T w``
    the column sums and ``W^T d``."""
    ones_and_d = torch.stack([torch.ones_like(d), d], dim=2)  # (b, C, 2)
    rows = torch.bmm(w, ones_and_d)  # (b, C, 2): r, W d
    cols = torch.bmm(ones_and_d.transpose(1, 2), w)  # (b, 2, C): c, W^T d
    degree = rows[:, :, 0] + cols[:, 0, :]
    return degree.mul_(d).sub_(rows[:, :, 1]).sub_(cols[:, 1, :]), rows[:, :, 0].sum(dim=1)


def _per_row_gradient(d, weights):
    """``g`` (B, C) and the row weight sums ``sum_{j,k} w[b,j,k]`` (B,), both float32."""
    batch, num_classes = d.shape
    g = torch.empty_like(d)
    weight_sum = d.new_empty(batch)
    chunk = batch  # float32 weights are used in place
    if weights.dtype != torch.float32:
        chunk = max(1, min(CHUNK_ELEMENTS // (num_classes * num_classes), -(-batch // 8)))
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        # one float32 chunk alive at a time: it is freed when the helper returns
        g[rows], weight_sum[rows] = _per_row_chunk_gradient(weights[rows].float(), d[rows])
    return g, weight_sum


def shared_weight_sums(weights, batch):
    """``sum_{j,k} M[j,k]`` for each of the ``batch`` rows, (B,) float32."""
    return weights.sum(dtype=torch.float32).expand(batch).clone()


def pair_rows_forward_torch(student, teacher, weights, per_row):
    """``(wmse (B,), weight_sum (B,))`` in float32, as the Triton launchers."""
    d = _centred_differences(student, teacher)
    if per_row:
        g, weight_sum = _per_row_gradient(d, weights)
    else:
        g = _shared_gradient(d, weights)
        weight_sum = shared_weight_sums(weights, d.shape[0])
    return torch.linalg.vecdot(d, g), weight_sum


def pair_rows_backward_torch(grad_wmse, student, teacher, weights, per_row, need_ds, need_dt):
    """``(grad_student, grad_teacher)``: ``dt = 2 g_wmse g``, ``ds = -dt`` (empty when not
    needed)."""
    d = _centred_differences(student, teacher)
    g = _per_row_gradient(d, weights)[0] if per_row else _shared_gradient(d, weights)
    g_d = g.mul_((2.0 * grad_wmse.float())[:, None])
    ds = (-g_d).to(student.dtype) if need_ds else student.new_empty(0)
    dt = g_d.to(teacher.dtype) if need_dt else teacher.new_empty(0)
    return ds, dt
