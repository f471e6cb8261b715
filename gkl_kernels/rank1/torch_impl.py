"""Plain-PyTorch rank-one path: the statistics, loss and gradients of ``kernels.py`` (see there for
the math), in float32 (float64 for float64 logits: ``compute_dtype``); and ``merge_row_stats``,
the rule that combines the statistics of two column parts of the same rows (vocabulary shards).

Used for CPU tensors and with ``backend="torch"``. Rows go in blocks of at most
``BLOCK_ELEMENTS`` logits, as a kernel's tiles: a block's temporaries stay in cache (a whole
``(256, 32000)`` chunk at once ran 2.8 times slower on 2 CPU cores, from page faults and memory
traffic), into ``Scratch`` tensors reused from block to block (on CPU from call to call), with
float masks (0, 1) where a mask multiplies, as boolean ``(R, C)`` tensors cost more than the
arithmetic on CPU. ``d = t - s`` is held as the
exact pair ``hi + lo`` and its mean as the heaviest class's ``d`` (``STAT_PH + STAT_PL``) plus a
corrected offset ``STAT_DM``, as in the kernels. When a backward pass will follow, the forward
keeps the two ``(B, C)`` gradient directions (``softmax(s/T) -
softmax(t/T)`` and ``v' (d - mu)``), so that the backward is two products: the memory of two
``B x C`` float32 tensors (as ``F.kl_div``'s saved log-probabilities) traded for recomputation.
"""

import math
import threading

import torch

from gkl_kernels import validation as check
from gkl_kernels.core.config import (NUM_STATS, NUM_TOTALS, SOURCE_EXPLICIT, SOURCE_JSD,
                                     SOURCE_NONE, SOURCE_PAIRS, SOURCE_PRIOR, SOURCE_TEACHER,
                                     STAT_A, STAT_DM, STAT_ERROR, STAT_KEPT, STAT_L, STAT_M2,
                                     STAT_MS, STAT_MT, STAT_PH, STAT_PL, STAT_W, STAT_ZS, STAT_ZT,
                                     STAT_ZW, TOTAL_DEN, TOTAL_K, TOTAL_ROWS, compute_dtype)

INF = float("inf")
BLOCK_ELEMENTS = 2**18  # logits in one row block: 1 MiB of float32 (8 rows at V = 32000)
LOG2E = math.log2(math.e)
SHORT_ROW = 256  # columns up to which ``row_max`` takes ``max(dim=1)``
SUM_PART = 128  # columns ``row_sum`` adds first under torch.compile


def block_rows(classes):
    """Rows of a full row block: ``max(1, BLOCK_ELEMENTS // classes)``."""
    return max(1, BLOCK_ELEMENTS // max(classes, 1))


def row_blocks(rows, classes):
    """Slices of at most ``block_rows(classes)`` rows covering ``range(rows)``."""
    step = block_rows(classes)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def row_sum(x, ignore_nan=False):
    """``sum_j x_j`` per row of ``x`` (R, C) (``ignore_nan``: NaN terms as 0, as ``nansum``).
    Under ``torch.compile`` in parts of ``SUM_PART`` columns, then the parts: inductor's CPU
    reductions add each SIMD lane's terms in one sequence (about ``sqrt(C / 16)`` roundings of
    the sum, against eager PyTorch's cascade)."""
    rows, columns = x.shape
    if not (torch.compiler.is_compiling() and isinstance(columns, int)):  # (or symbolic sizes)
        return x.nansum(dim=1) if ignore_nan else x.sum(dim=1)
    if ignore_nan:
        x = torch.where(torch.isnan(x), 0.0, x)
    if columns % SUM_PART == 0:
        return x.view(rows, -1, SUM_PART).sum(dim=2).sum(dim=1)
    cut = columns - columns % SUM_PART
    parts = x[:, :cut].reshape(rows, -1, SUM_PART).sum(dim=2)
    return parts.sum(dim=1) + x[:, cut:].sum(dim=1)


def finite_ref(m):
    """``m``, 0 where it is ``-inf`` (NaN and ``+inf`` kept)."""
    return m.nan_to_num(float("nan"), INF, 0.0)


def _scaled(x, factor):
    """``x * factor``, in place (``x`` is a temporary), skipped for a factor of 1."""
    return x if factor == 1.0 else x.mul_(factor)


def _teacher_weights(t, ref_t, config, out):
    """``v = exp(gamma (t - m_t) / T2)`` into ``out``, as the kernels, ``2^((t - m_t) gamma log2(e)
    / T2)`` (on CPU ``exp2`` takes half the time of ``exp``); 1 for ``gamma = 0``."""
    if config.gamma == 0.0:  # exp(0 x (-inf)) would be NaN
        return out.fill_(1.0)
    return torch.sub(t, ref_t, out=out).mul_(config.gamma / config.weight_temperature *
                                             LOG2E).exp2_()


def _rescale(m_part, m, inv_temperature):
    return torch.where(m_part != -INF, ((m_part - m) * inv_temperature).exp(), 0.0)


def _merged_rest(rest_a, r_a, rest_b, r_b):
    """The normaliser rest ``z - 1`` of two parts rescaled by ``r_a``, ``r_b`` (one of them 1, or
    both 0 for two empty parts), with no ``1 + x`` formed: ``rest_a r_a + rest_b r_b + min(r_a,
    r_b) + (max(r_a, r_b) - 1)``."""
    return rest_a * r_a + rest_b * r_b + (torch.minimum(r_a, r_b) +
                                          (torch.maximum(r_a, r_b) - 1.0))


def row_max(x, below=None):
    """``(maxima (R,), the first column where each is (R, 1))`` of the rows of ``x``: beyond
    ``SHORT_ROW`` columns the column as the least ``j + C [x_j < m]`` (the last column in a row
    holding NaN), ``below`` an ``(R, C)`` float scratch tensor: float comparisons and reductions
    only (on CPU ``max(dim=1)`` over long rows and boolean temporaries are slow)."""
    rows, classes = x.shape
    if classes <= SHORT_ROW:
        top, column = x.max(dim=1, keepdim=True)
        return top[:, 0], column
    top = x.amax(dim=1)
    below = torch.ne(x, top[:, None], out=x.new_empty(x.shape) if below is None else below)
    columns = torch.arange(classes, dtype=x.dtype, device=x.device)
    column = torch.add(columns, below, alpha=classes, out=below).amin(dim=1)
    return top, column.clamp_max_(classes - 1).long()[:, None]


def lowered_rest(e, top):
    """``sum_j e_j - 1`` per row (R,), ``e = exp((x - m) / T)`` being 1 at the maximal columns
    ``top`` (R, 1) (0 in a row of ``-inf``: rest -1): ``e`` there lowered by 1, in place, then
    summed, so that ``1 + x`` is never rounded (the caller raises it again where it needs it)."""
    return row_sum(e.scatter_(1, top, -1.0, reduce="add"))


def difference_at(e_s, e_t, rest_s, rest_t, z_s, z_t):
    """``q - p = e_s / z_s - e_t / z_t`` (R, 1) at one column per row, from ``e`` there (R, 1),
    the rests ``z - 1`` and ``z`` (R,; an empty row's as 0 and 1: its ``e`` are 0) as ``((e_s -
    e_t) + e_s rest_t - e_t rest_s) / (z_s z_t)``: where both logits are maximal (``e_s = e_t =
    1``) the ones cancel exactly, ``(rest_t - rest_s) / (z_s z_t)``."""
    numerator = torch.addcmul(e_s - e_t, e_s, rest_t[:, None]).addcmul_(e_t, rest_s[:, None],
                                                                        value=-1.0)
    return numerator.div_((z_s * z_t)[:, None])


class Scratch:
    """Block-sized scratch tensors of one call, made at first use and reused by every row block:
    ``floats(name, rows)`` in the compute dtype, ``(rows, C)`` views. On CPU their storage is
    kept for the thread's next call (a fresh block-sized temporary costs its page faults each
    time); a call that starts while another holds it makes its own. ``pool`` names the
    storage, so that a caller of the row ops keeps its own beside theirs. On a GPU the caching
    allocator keeps them."""

    _idle = threading.local()  # the thread's storage between calls, per pool: {pool: {(name,
    # dtype): flat tensor}}

    def __init__(self, like, block_rows, dtype, pool="rows"):
        self._like, self._classes, self.dtype = like, like.shape[1], dtype
        self._size = block_rows * like.shape[1]
        self._pool = pool if like.device.type == "cpu" and not torch.compiler.is_compiling() \
            else None
        self._storage = {} if self._pool is None else self._idle.__dict__.pop(pool, {})
        self._views = {}

    def __del__(self):
        if getattr(self, "_pool", None) is not None:  # (an object __init__ did not finish)
            self._idle.__dict__.setdefault(self._pool, self._storage)

    @classmethod
    def release_idle(cls):
        """Drop the storage the calling thread keeps between calls, every pool's."""
        cls._idle.__dict__.clear()

    def floats(self, name, rows):
        view = self._views.get((name, rows))
        if view is None:
            key = (name, self.dtype)
            stored = self._storage.get(key)
            if stored is None or stored.numel() < self._size:
                stored = self._storage[key] = self._like.new_empty(self._size, dtype=self.dtype)
            view = self._views[name, rows] = stored[:rows * self._classes].view(rows,
                                                                                 self._classes)
        return view


def scratch_and_blocks(student, dtype, pool="rows"):
    """``(Scratch, row blocks)`` of one call over the rows of ``student``."""
    blocks = row_blocks(*student.shape)
    rows = blocks[0].stop - blocks[0].start if blocks else 0
    return Scratch(student, rows, dtype, pool), blocks


def _dot(x, y, scratch):
    """``sum_j x_j y_j`` per row, the product in ``scratch``."""
    return row_sum(torch.mul(x, y, out=scratch.floats("product", x.shape[0])))


def given_factor(factor, labels, config, out):
    """The given weights ``(R, C)`` written into ``out`` (its dtype): ``prior[labels] ** gamma``
    (``0 ** 0 = 1``) or the explicit factor."""
    if config.source != SOURCE_PRIOR:
        return out.copy_(factor)
    if config.gamma == 0.0:
        return out.fill_(1.0)
    if factor.dtype == out.dtype:
        torch.index_select(factor, 0, labels, out=out)
    else:
        out.copy_(factor.index_select(0, labels))
    # exp(gamma log p), 0 for p = 0: about 4 times faster than a fractional pow on CPU
    return out if config.gamma == 1.0 else out.log2_().mul_(config.gamma).exp2_()


def kept_logits(student, teacher, labels, config, scratch):
    """s, t in ``compute_dtype``, ``-inf`` on rows not read (ignored, or with a bad label); the
    kept mask and the bad-label mask (R,), None without labels."""
    rows = student.shape[0]
    s, t = ((x if x.dtype == scratch.dtype else scratch.floats(name, rows).copy_(x))
            for name, x in (("s", student), ("t", teacher)))
    if not config.has_labels:
        return s, t, None, None
    kept = labels != config.ignore_index
    bad = kept & ((labels < 0) | (labels >= (config.num_labels or s.shape[1])))
    live = (kept & ~bad)[:, None]
    if check.host_reads_free(s.device) and bool(live.all()):  # nothing to mask
        return s, t, kept, bad
    masked = s.new_full((), -INF)
    return (torch.where(live, s, masked, out=scratch.floats("s", rows)),
            torch.where(live, t, masked, out=scratch.floats("t", rows)), kept, bad)


def _usable_labels(labels, kept, bad):
    """Labels to gather prior rows with: 0 where a row is not read."""
    return labels if kept is None else torch.where(kept & ~bad, labels, 0)


def _block_inputs(block, student, teacher, factor, labels, config):
    """``(s, t, factor, labels)`` of the rows ``block`` (the prior is every row's)."""
    explicit = config.source == SOURCE_EXPLICIT
    return (student[block], teacher[block], factor[block] if explicit else factor,
            None if labels is None else labels[block])


def _factor_exponent(top):
    """``L = floor(log2(top))`` of the rows' largest weights, ``-inf`` for a row of zeros:
    ``v' = v 2^-L``."""
    return torch.where(top > 0, torch.floor(torch.log2(top)), -INF)


def _exact_difference(t, s, scratch):
    """``(hi, lo)`` (R, C) in ``scratch`` with ``hi + lo == t - s`` exactly (TwoSum: ``hi`` the
    rounded difference, ``lo`` its rounding error), a ``-inf`` logit taken as 0 (its class is
    excluded: finite values to multiply by 0; NaN stays)."""
    rows = t.shape[0]
    t, s = (torch.nan_to_num(x, float("nan"), INF, 0.0, out=scratch.floats(name, rows))
            for name, x in (("t_finite", t), ("s_finite", s)))
    hi = torch.sub(t, s, out=scratch.floats("d", rows))
    back = torch.sub(hi, t, out=scratch.floats("back", rows))  # hi - t, the part of -s in hi
    lo = torch.sub(hi, back, out=scratch.floats("lo", rows))
    lo = torch.sub(t, lo, out=lo).sub_(back.add_(s))  # (t - (hi - back)) - (s + back)
    return hi, lo


def _weights(s, t, factor, labels, kept, bad, ref_t, config, scratch, e_t=None):
    """``(v, inside)``: the factor (0 on excluded classes: ``-inf`` in either logit) and the
    float mask of the other classes (1; NaN counts as inside). Teacher weights ``v = exp(gamma (t
    - m_t) / T2)`` (``ref_t`` the teacher's row maxima ``finite_ref(m_t)``, (R, 1); ``e_t =
    exp((t - m_t) / T)`` of the cross-entropy taken, and overwritten, when ``gamma / T2 = 1 /
    T``); a given factor as given (unscaled: ``v' = v 2^-L``)."""
    rows = s.shape[0]
    inside = torch.ne(s, -INF, out=scratch.floats("inside", rows)).mul_(
        torch.ne(t, -INF, out=scratch.floats("teacher_inside", rows)))
    if config.source != SOURCE_TEACHER:
        v = given_factor(factor, _usable_labels(labels, kept, bad), config,
                         scratch.floats("v", rows))
    elif e_t is not None and config.gamma / config.weight_temperature == 1.0 / config.temperature:
        v = e_t
    else:
        v = _teacher_weights(t, ref_t, config, scratch.floats("v", rows))
    return v.mul_(inside), inside


def _block_stats(student, teacher, factor, labels, config, scratch, stats, softmax_difference,
                 weighted_deviation):
    """Write the statistics of a block of rows into ``stats`` (R, NUM_STATS) and, where given
    (else None), ``q - p`` into ``softmax_difference`` and ``v' (d - mu)`` into
    ``weighted_deviation`` (R, C)."""
    s, t, kept, bad = kept_logits(student, teacher, labels, config, scratch)
    rows = s.shape[0]
    zeros = s.new_zeros(rows)
    columns = [zeros] * NUM_STATS
    columns[STAT_KEPT] = zeros + 1.0 if kept is None else kept.to(s.dtype)
    if bad is not None:
        columns[STAT_ERROR] = bad.to(s.dtype)
    columns[STAT_MS] = columns[STAT_L] = zeros - INF
    columns[STAT_ZS] = columns[STAT_ZT] = zeros - 1.0  # the rests of empty normalisers
    if config.with_ce:
        (ms, top_s), (mt, top_t) = (row_max(x, scratch.floats("below", rows)) for x in (s, t))
        columns[STAT_MS] = ms
    else:
        mt = t.amax(dim=1)
    columns[STAT_MT] = mt
    ref_t = finite_ref(mt)[:, None]
    inv_t = 1.0 / config.temperature
    e_t = None
    if config.with_ce:
        ref_s = finite_ref(ms)[:, None]
        e_s = _scaled(torch.sub(s, ref_s, out=scratch.floats("e_s", rows)), inv_t).exp_()
        e_t = _scaled(torch.sub(t, ref_t, out=scratch.floats("e_t", rows)), inv_t).exp_()
        peak_s = e_s.gather(1, top_s)  # 1, or 0 in a row of -inf
        rest_s = columns[STAT_ZS] = lowered_rest(e_s, top_s)  # e_s there: rewritten below
        rest_t = columns[STAT_ZT] = lowered_rest(e_t, top_t)
        e_t.scatter_(1, top_t, 1.0, reduce="add")
        # e_t (m_s - s): 0 x inf (s = -inf, e_t = 0) adds 0; a NaN logit stays in zs, zt
        columns[STAT_A] = row_sum(torch.sub(ref_s, s, out=scratch.floats("d", rows)).mul_(e_t),
                                  ignore_nan=True)
        if softmax_difference is not None:
            rest_s, rest_t = rest_s.clamp_min(0.0), rest_t.clamp_min(0.0)  # empty rows: 0
            z_s, z_t = rest_s + 1.0, rest_t + 1.0
            torch.div(e_s, z_s[:, None], out=softmax_difference)
            softmax_difference.addcdiv_(e_t, z_t[:, None], value=-1.0)
            softmax_difference.scatter_(1, top_s, difference_at(
                peak_s, e_t.gather(1, top_s), rest_s, rest_t, z_s, z_t))
    if config.source >= SOURCE_NONE:
        return torch.stack(columns, dim=1, out=stats)
    if config.source == SOURCE_TEACHER:
        columns[STAT_ZW] = columns[STAT_ZT] + 1.0 if (
            e_t is not None and config.weight_temperature == config.temperature) else \
            row_sum(_scaled(torch.sub(t, ref_t, out=scratch.floats("d", rows)),
                            1.0 / config.weight_temperature).exp_())
    v, inside = _weights(s, t, factor, labels, kept, bad, ref_t, config, scratch, e_t)
    if config.source == SOURCE_TEACHER and config.with_ce:
        heaviest = top_t  # exp(gamma (t - m_t) / T2) is largest where t is (gamma >= 0)
    else:
        top, heaviest = row_max(v, scratch.floats("below", rows))
    if config.source != SOURCE_TEACHER:
        columns[STAT_L] = _factor_exponent(top)
        v.mul_(torch.exp2(-finite_ref(columns[STAT_L]))[:, None])
    weight = columns[STAT_W] = row_sum(v)
    # d = t - s as the exact pair hi + lo, its deviations from the heaviest class's exact d (the
    # pivot ph + pl: exact differences near it, under per-row offsets), then from their weighted
    # mean dm (excluded classes: 0, weighing nothing): accurate when one weight dominates
    hi, lo = _exact_difference(t, s, scratch)
    ph, pl = (torch.where(torch.isfinite(x), x, 0.0)  # an excluded pivot (a row without
              for x in (hi.gather(1, heaviest), lo.gather(1, heaviest)))  # weight): 0
    dev = hi.sub_(ph).add_(lo.sub_(pl)).mul_(inside)
    residual = _dot(v, dev, scratch) / torch.where(weight != 0, weight, 1.0)
    dev.sub_(residual[:, None])
    columns[STAT_PH], columns[STAT_PL], columns[STAT_DM] = ph[:, 0], pl[:, 0], residual
    weighted = v.mul_(dev) if weighted_deviation is None else \
        torch.mul(v, dev, out=weighted_deviation)
    columns[STAT_M2] = _dot(weighted, dev, scratch)
    return torch.stack(columns, dim=1, out=stats)


def _direction(student, dtype, wanted):
    """An uninitialised ``(B, C)`` direction in ``dtype`` when ``wanted``, else an empty one."""
    return student.new_empty(student.shape if wanted else (0,), dtype=dtype)


def row_stats_torch(student, teacher, factor, labels, config, keep_directions):
    """``(stats (B, NUM_STATS), softmax_difference, weighted_deviation)``: the kernels' statistics
    and, when ``keep_directions``, ``q - p`` and ``v' (d - mu)`` (else empty), block by block."""
    dtype = compute_dtype(student, teacher)
    stats = student.new_empty(student.shape[0], NUM_STATS, dtype=dtype)
    softmax_difference = _direction(student, dtype, keep_directions and config.with_ce)
    weighted_deviation = _direction(student, dtype,
                                    keep_directions and config.source < SOURCE_NONE)
    scratch, blocks = scratch_and_blocks(student, dtype)
    for block in blocks:
        _block_stats(*_block_inputs(block, student, teacher, factor, labels, config), config,
                     scratch, stats[block], _rows_of(softmax_difference, block),
                     _rows_of(weighted_deviation, block))
    return stats, softmax_difference, weighted_deviation


def _rows_of(direction, block):
    """The rows ``block`` of a kept direction, None for an empty one."""
    return direction[block] if direction.numel() else None


def _row_exponent(stats, config):
    """``E`` per row (B,): the wMSE's weights are ``2^E`` times the statistics' ``v'``."""
    if config.source == SOURCE_TEACHER:
        z_w = stats[:, STAT_ZW]
        return -config.gamma * torch.log2(torch.where(z_w != 0, z_w, 1.0))
    if config.source == SOURCE_PAIRS:  # the wMSE itself, weights unscaled
        return torch.zeros_like(stats[:, STAT_W])
    return stats[:, STAT_L]


def finish_rows_torch(stats, config):
    """``(E, wmse', ce)`` per row (B,), as ``kernels.finish_row``."""
    exponent = _row_exponent(stats, config)
    wmse = stats[:, STAT_M2] if config.source == SOURCE_PAIRS else \
        2.0 * stats[:, STAT_W] * stats[:, STAT_M2]
    zt, a = stats[:, STAT_ZT] + 1.0, stats[:, STAT_A]
    ce = a if config.source == SOURCE_JSD else torch.where(
        a != INF, a / (config.temperature * torch.where(zt != 0, zt, 1.0))
        + stats[:, STAT_ZS].log1p(), a)
    return exponent, wmse, torch.where(zt != 0, ce, 0.0)


def row_losses_torch(stats, config):
    """Per-row losses (B,) in the statistics' dtype, ``mse_weight wmse_b / 4 + ce_weight CE_b``
    (0 on rows not kept), from the rows' statistics of either backend."""
    exponent, wmse, ce = finish_rows_torch(stats, config)
    losses = torch.zeros_like(ce)
    if config.with_wmse:
        f = torch.exp2(exponent)
        losses = (config.mse_weight * 0.25) * torch.where(stats[:, STAT_W] != 0, f * (f * wmse),
                                                          0.0)
    if config.with_ce:
        losses = losses + config.ce_weight * ce
    return torch.where(stats[:, STAT_KEPT] > 0, losses, 0.0)


def finish_loss_torch(stats, config):
    """``(loss (), totals (NUM_TOTALS,))`` as ``kernels.finish_loss_kernel``."""
    exponent, wmse, ce = finish_rows_torch(stats, config)
    kept = stats[:, STAT_KEPT] > 0
    rows = kept.sum(dtype=stats.dtype)
    counted = kept & (stats[:, STAT_W] != 0)
    top = torch.zeros_like(rows)
    if not config.normalize_batch:
        top = torch.where(counted, exponent, -INF).amax()
        top = torch.where(top != -INF, top, 0.0)
    f = torch.exp2(torch.where(counted, exponent, top) - top)
    wmse_sum = torch.where(counted, f * f * wmse, 0.0).sum()
    fw = f * stats[:, STAT_W]
    den = torch.where(counted, fw if config.source == SOURCE_PAIRS else fw * fw, 0.0).sum()
    ce_sum = torch.where(kept, ce, 0.0).sum()
    loss = torch.zeros_like(rows)
    if config.with_wmse:
        norm = rows.clamp_min(1.0) if config.normalize_batch else torch.where(den != 0, den, INF)
        loss = (config.mse_weight * 0.25) * wmse_sum / norm
    if config.with_ce:
        loss = loss + config.ce_weight * ce_sum / rows.clamp_min(1.0)
    totals = torch.stack([top, den, rows, wmse_sum, ce_sum, stats[:, STAT_ERROR].amax(),
                          *top.new_zeros(NUM_TOTALS - 6)])
    return loss, totals


def coefficient_scales(grad_loss, totals, config):
    """``(ce, d, top)``: the batch's factors of the gradient coefficients (0-dim, or per row for a
    per-row ``grad_loss``): ``grad ce_weight / (T R)``, ``grad mse_weight / N'`` (pair weights:
    ``grad mse_weight / (2 N)``) and the normaliser's exponent ``K``."""
    rows = totals[TOTAL_ROWS].clamp_min(1.0)
    grad = grad_loss.to(totals.dtype)
    ce = grad * (config.ce_weight / config.temperature) / rows
    den = totals[TOTAL_DEN]
    norm = 1.0 / rows if config.normalize_batch else torch.where(den != 0, 1.0 / den, 0.0)
    d = grad * ((0.5 if config.source == SOURCE_PAIRS else 1.0) * config.mse_weight) * norm
    return ce, d, totals[TOTAL_K]


def row_coefficients_torch(stats, scales, config):
    """``(coef_d, coef_ce)`` (B,): the factors of ``v' (d - mu)`` and of ``q - p`` in the
    gradient, as ``kernels.loss_backward_kernel``, from the ``coefficient_scales``."""
    ce, d, top = scales
    kept = stats[:, STAT_KEPT] > 0
    coef_ce = torch.where(kept, ce, 0.0)
    if not config.with_wmse:
        return None, coef_ce
    if config.source == SOURCE_PAIRS:  # d loss / d d = (mse_weight / 4N) 2 g
        return torch.where(kept, d, 0.0), coef_ce
    weight = stats[:, STAT_W]
    counted = kept & (weight != 0)
    f = torch.exp2(torch.where(counted, _row_exponent(stats, config) - top, 0.0))
    return torch.where(counted, d * (f * weight) * f, 0.0), coef_ce


def loss_backward_torch(grad_loss, student, teacher, factor, labels, stats, totals, config,
                        need_ds, need_dt, softmax_difference, weighted_deviation):
    """``(grad_student, grad_teacher)`` in the logits' dtypes (empty when not needed), from the
    kept directions when there are some, else recomputed from the logits and the statistics."""
    ds, dt = loss_gradients_torch(grad_loss, student, teacher, factor, labels, stats, totals,
                                  config, need_ds, need_dt, softmax_difference, weighted_deviation)
    return ds.to(student.dtype), dt.to(teacher.dtype)


def _combine(coef_d, coef_ce, softmax_difference, weighted_deviation, config, ds, dt):
    """``ds = coef_ce (q - p) - coef_d v' (d - mu)`` (the second term when ``symmetric``) and
    ``dt = coef_d v' (d - mu)`` written into ``ds`` / ``dt`` (None: not wanted), which may be the
    directions themselves (then overwritten)."""
    if ds is not None:
        if config.with_ce:
            torch.mul(softmax_difference, coef_ce[:, None], out=ds)
        else:
            ds.zero_()
    if dt is not None:
        if config.with_wmse:
            torch.mul(weighted_deviation, coef_d[:, None], out=dt)
        else:
            dt.zero_()
    if ds is not None and config.symmetric and config.with_wmse:
        if dt is not None:
            ds.sub_(dt)
        else:
            ds.addcmul_(weighted_deviation, coef_d[:, None], value=-1.0)


def loss_gradients_torch(grad_loss, student, teacher, factor, labels, stats, totals, config,
                         need_ds, need_dt, softmax_difference, weighted_deviation,
                         overwrite=False):
    """``loss_backward_torch``'s gradients in the statistics' dtype; ``overwrite``: the kept
    directions are temporaries, to become the gradients."""
    coef_d, coef_ce = row_coefficients_torch(
        stats, coefficient_scales(grad_loss, totals, config), config)
    kept = (not config.with_ce or softmax_difference.numel()) and (
        not config.with_wmse or weighted_deviation.numel())
    if kept and overwrite:
        ds = softmax_difference if need_ds and config.with_ce else _direction(student, stats.dtype,
                                                                              need_ds)
        dt = weighted_deviation if need_dt and config.with_wmse else _direction(
            student, stats.dtype, need_dt)
        _combine(coef_d, coef_ce, softmax_difference, weighted_deviation, config,
                 ds if need_ds else None, dt if need_dt else None)
        return ds, dt
    ds, dt = (_direction(student, stats.dtype, wanted) for wanted in (need_ds, need_dt))
    scratch, blocks = scratch_and_blocks(student, stats.dtype)
    for block in blocks:
        if kept:
            directions = (_rows_of(softmax_difference, block), _rows_of(weighted_deviation, block))
        else:
            directions = gradient_directions_torch(
                *_block_inputs(block, student, teacher, factor, labels, config), stats[block],
                config, scratch)
        _combine(None if coef_d is None else coef_d[block], coef_ce[block], *directions, config,
                 ds[block] if need_ds else None, dt[block] if need_dt else None)
    return ds, dt


def row_stats_and_gradients_torch(student, teacher, factor, labels, totals, config, need_ds,
                                  need_dt, ds=None):
    """``(stats, ds, dt)``: the statistics and the gradients for an incoming gradient of 1, given
    the batch totals the gradient needs (``fused_linear``: known before the rows), each block's
    gradient formed while the block is in cache; ``ds``, ``dt`` in the statistics' dtype, empty
    when not wanted. ``ds``: a ``(B, C)`` tensor to write the student's gradient into (it may
    be ``student`` itself: each block's rows are written once they are read)."""
    dtype = compute_dtype(student, teacher)
    stats = student.new_empty(student.shape[0], NUM_STATS, dtype=dtype)
    ds = _direction(student, dtype, need_ds) if ds is None else ds
    dt = _direction(student, dtype, need_dt)
    scales = coefficient_scales(stats.new_ones(()), totals, config)
    wants_deviation = config.with_wmse and (need_dt or (need_ds and config.symmetric))
    scratch, blocks = scratch_and_blocks(student, dtype)
    for block in blocks:
        rows = block.stop - block.start
        ds_rows = ds[block] if need_ds else None  # written by _combine, after the block's reads
        dt_rows = dt[block] if need_dt else None
        softmax_difference = scratch.floats("ds", rows) if need_ds and config.with_ce else None
        weighted_deviation = None
        if wants_deviation:
            weighted_deviation = dt_rows if dt_rows is not None else scratch.floats(
                "weighted_deviation", rows)
        _block_stats(*_block_inputs(block, student, teacher, factor, labels, config), config,
                     scratch, stats[block], softmax_difference, weighted_deviation)
        coef_d, coef_ce = row_coefficients_torch(stats[block], scales, config)
        _combine(coef_d, coef_ce, softmax_difference, weighted_deviation, config, ds_rows,
                 dt_rows)
    return stats, ds, dt


def gradient_directions_torch(student, teacher, factor, labels, stats, config, scratch):
    """``(q - p, v' (d - mu))`` (R, C) of a block of rows, in ``scratch``, from the logits and
    merged statistics (None for a term the loss does not have); ignored rows give zeros."""
    s, t, kept, bad = kept_logits(student, teacher, labels, config, scratch)
    rows = s.shape[0]
    softmax_difference = weighted_deviation = None
    ms, mt = stats[:, STAT_MS], stats[:, STAT_MT]
    if config.with_ce:
        inv_t = 1.0 / config.temperature
        # the rests, an empty row's (-1) as 0: log z = log1p(rest), 0 there (its e are 0)
        rest_s, rest_t = stats[:, STAT_ZS].clamp_min(0.0), stats[:, STAT_ZT].clamp_min(0.0)
        q, p = ((_scaled(torch.sub(x, finite_ref(m)[:, None], out=scratch.floats(name, rows)),
                         inv_t).sub_(rest.log1p()[:, None]).exp_())
                for name, x, m, rest in (("e_s", s, ms, rest_s), ("e_t", t, mt, rest_t)))
        softmax_difference = q.sub_(p)
        top = row_max(s, scratch.floats("below", rows))[1]
        e_s, e_t = (_scaled(x.gather(1, top) - finite_ref(m)[:, None], inv_t).exp_()
                    for x, m in ((s, ms), (t, mt)))
        softmax_difference.scatter_(1, top, difference_at(e_s, e_t, rest_s, rest_t,
                                                           rest_s + 1.0, rest_t + 1.0))
    if config.with_wmse:
        v, inside = _weights(s, t, factor, labels, kept, bad, finite_ref(mt)[:, None], config,
                             scratch)
        if config.source != SOURCE_TEACHER:
            v.mul_(torch.exp2(-finite_ref(stats[:, STAT_L]))[:, None])
        hi, lo = _exact_difference(t, s, scratch)
        dev = hi.sub_(stats[:, STAT_PH, None]).add_(lo.sub_(stats[:, STAT_PL, None])).sub_(
            stats[:, STAT_DM, None])
        weighted_deviation = v.mul_(dev.mul_(inside))
    return softmax_difference, weighted_deviation


def merge_row_stats(a, b, config):
    """The statistics of the same rows over the union of two column parts (``a``, ``b``:
    ``(B, NUM_STATS)``): the rule the kernels apply between tiles, associative up to rounding."""
    out = a.clone()
    inv_t = 1.0 / config.temperature
    ms = torch.maximum(a[:, STAT_MS], b[:, STAT_MS])
    mt = torch.maximum(a[:, STAT_MT], b[:, STAT_MT])
    rt_a, rt_b = _rescale(a[:, STAT_MT], mt, inv_t), _rescale(b[:, STAT_MT], mt, inv_t)
    shifted = [torch.where(x[:, STAT_ZT] != -1.0,
                           (x[:, STAT_ZT] + 1.0) * (finite_ref(ms) - finite_ref(x[:, STAT_MS])),
                           0.0) for x in (a, b)]
    out[:, STAT_A] = torch.where(rt_a != 0, rt_a * (a[:, STAT_A] + shifted[0]), 0.0) + \
        torch.where(rt_b != 0, rt_b * (b[:, STAT_A] + shifted[1]), 0.0)
    out[:, STAT_ZS] = _merged_rest(a[:, STAT_ZS], _rescale(a[:, STAT_MS], ms, inv_t),
                                   b[:, STAT_ZS], _rescale(b[:, STAT_MS], ms, inv_t))
    out[:, STAT_ZT] = _merged_rest(a[:, STAT_ZT], rt_a, b[:, STAT_ZT], rt_b)
    inv_t2 = 1.0 / config.weight_temperature
    out[:, STAT_ZW] = a[:, STAT_ZW] * _rescale(a[:, STAT_MT], mt, inv_t2) + \
        b[:, STAT_ZW] * _rescale(b[:, STAT_MT], mt, inv_t2)
    out[:, STAT_MS], out[:, STAT_MT] = ms, mt
    if config.source == SOURCE_TEACHER:
        gamma_t2 = config.gamma * inv_t2 * math.log2(math.e)
        f_a, f_b = (torch.where(x[:, STAT_MT] != -INF, torch.exp2((x[:, STAT_MT] - mt) * gamma_t2),
                                0.0) for x in (a, b))
    else:
        scale = torch.maximum(a[:, STAT_L], b[:, STAT_L])
        f_a, f_b = (torch.where(x[:, STAT_L] != -INF, torch.exp2(x[:, STAT_L] - scale), 0.0)
                    for x in (a, b))
        out[:, STAT_L] = scale
    w_a, w_b = a[:, STAT_W] * f_a, b[:, STAT_W] * f_b
    weight = w_a + w_b
    a_heavy = w_a >= w_b
    heavy, light = torch.where(a_heavy[:, None], a, b), torch.where(a_heavy[:, None], b, a)
    w_heavy, w_light = torch.where(a_heavy, w_a, w_b), torch.where(a_heavy, w_b, w_a)
    delta = ((light[:, STAT_PH] - heavy[:, STAT_PH]) + (light[:, STAT_PL] - heavy[:, STAT_PL])) + \
        (light[:, STAT_DM] - heavy[:, STAT_DM])
    frac = w_light / torch.where(weight == 0, 1.0, weight)
    out[:, STAT_PH], out[:, STAT_PL] = heavy[:, STAT_PH], heavy[:, STAT_PL]
    out[:, STAT_DM] = heavy[:, STAT_DM] + torch.where(w_light == 0, 0.0, delta * frac)
    out[:, STAT_W] = weight
    out[:, STAT_M2] = a[:, STAT_M2] * f_a + b[:, STAT_M2] * f_b + \
        torch.where(w_light == 0, 0.0, delta * delta * w_heavy * frac)
    out[:, STAT_ERROR] = torch.maximum(a[:, STAT_ERROR], b[:, STAT_ERROR])
    return out
