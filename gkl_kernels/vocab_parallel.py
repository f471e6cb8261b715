"""The GKL / DKL loss of logits whose vocabulary (columns) is sharded across the processes of a
``torch.distributed`` group (tensor parallelism), from O(1) all-reduced statistics per row.

Every process holds the same ``N`` rows of its own ``V_p`` columns of the ``(N, V)`` student and
teacher logits; no logit leaves its process. Per row, with ``m_s = max_j s_j``, ``m_t = max_j t_j``
over the whole vocabulary, ``s' = s - m_s``, ``t' = t - m_t`` and ``d = t' - s'`` (the wMSE does not
see a per-row offset of ``d``, and the cross-entropy none of ``s``):

- ``CE = log sum_j exp(s'_j / T) - sum_j exp(t'_j / T) s'_j / (T sum_j exp(t'_j / T))``;
- teacher weights ``v = softmax(t / T2) ** gamma = c v'`` with ``v' = exp(gamma t' / T2)`` and the
  per-row scale ``c = (sum_j exp(t'_j / T2)) ** -gamma``; ``W = c W'``, ``mu = sum v' d / W'``,
  ``wmse = 2 W sum_j v_j (d_j - mu)^2 = 2 c^2 W' M2'`` with ``W' = sum v'`` and
  ``M2' = sum v' (d - mu)^2``; explicit and class-prior weights have ``c = 1``.

``mu`` and ``M2'`` come from the corrected two-pass algorithm (Chan, Golub and LeVeque), about the
rough mean ``mu~ = sum v' d / W'``: ``mu = mu~ + r``, ``r = sum v' (d - mu~) / W'``, ``M2' = sum v'
(d - mu~)^2 - W' r^2``; ``d - mu`` is formed as ``(d - mu~) - r``, accurate also when ``d`` is far
from 0 (one student logit far above the others moves every other ``d`` by that much).
"""

from typing import NamedTuple

import torch
from torch import distributed

from gkl_kernels import validation as check
from gkl_kernels.functional import safe_ratio
from gkl_kernels.options import GKLOptions


def vocab_parallel_gkl_loss(student_shard, teacher_shard, *, labels=None, class_prior_shard=None,
                            weights=None, ignore_index=-100, gamma=1.0, temperature=1.0,
                            weight_temperature=1.0, mse_weight=1.0, ce_weight=1.0,
                            normalize="weights", symmetric=True, process_group=None,
                            check_values=True):
    """The GKL loss (``symmetric=True``) or DKL (``symmetric=False``: only the teacher gets the
    wMSE gradient) over the whole vocabulary, a 0-dim float32 tensor, the same on every process.

    ``L = mse_weight * sum_b wmse_b / (4 N) + ce_weight * sum_b CE_b / R`` over the kept rows,
    ``wmse_b = 2 W_b sum_j v_bj (d_bj - mu_b)^2`` (``d = t - s``), ``CE_b = -sum_j softmax(t_b/T)_j
    log_softmax(s_b/T)_j``; ``R`` kept rows, ``N = sum_b W_b^2`` (``normalize="weights"``) or ``R``
    (``"batch"``); a wMSE or CE term with nothing to average is 0. Exactly ``gkl_loss`` (see there
    for the options) of the concatenated vocabulary and the kept rows.

    student_shard, teacher_shard: this process's ``(N, V_p)`` columns of the logits, float32,
    float16 or bfloat16 (dtypes may differ; arithmetic in float32, gradients in the input dtypes).
    Every process has the same ``N`` rows; ``V = sum V_p``, shards may be uneven. Autograd gives
    each process the gradient of its own shards (the teacher's when it requires grad).
    Pair weights ``v_j v_k`` (constants), in this order: ``weights``, this process's ``(N, V_p)``
    columns of a non-negative factor, used as given; ``class_prior_shard``, this process's
    ``(V, V_p)`` columns of the ``(V, V)`` class prior, ``v = prior[labels] ** gamma`` (``0 ** 0 =
    1``); else the teacher, ``v = softmax(t / T2) ** gamma`` over the whole vocabulary.
    labels: ``(N,)`` int64/int32, the same on every process, each in ``[0, V)`` or
    ``ignore_index``: those rows add nothing to the loss, ``N``, ``R`` or the gradient (all
    ignored: loss 0, zero gradients). Needed by the class prior, optional otherwise.
    process_group: the group that shares the vocabulary (None: the default group); without an
    initialised process group the shards are the whole vocabulary.
    check_values: check label range and weight values before anything runs (a host
    synchronisation on CUDA); with ``labels`` and no class prior, ``V`` comes from one extra
    all-reduce of the shard widths (one int64). Every process must pass the same options.

    Communication, the same on every process, nothing but three all-reduces of float32 row
    statistics (``s' = s - m_s``, ``t' = t - m_t``, ``d = t' - s'``; see the module docstring):
    ``(N, 2)`` MAX (``m_s``, ``m_t``); ``(N, 6)`` SUM (``sum exp(s'/T)``, ``sum exp(t'/T)``,
    ``sum exp(t'/T) s'/T``, ``W' = sum v'``, ``sum v' d``, and with teacher weights
    ``sum exp(t'/T2)``); ``(N, 2)`` SUM (``sum v' (d - mu~)`` and ``sum v' (d - mu~)^2`` about the
    rough mean ``mu~ = sum v' d / W'``: the corrected two-pass variance). 10 floats per row (9
    without teacher weights); backward communicates nothing. Memory: backward recomputes the
    ``(N, V_p)`` gradient directions from the inputs and 8 saved floats per row; no ``(N, V_p)``
    float32 tensor is kept between the passes.
    """
    options = GKLOptions(gamma=gamma, temperature=temperature,
                         weight_temperature=weight_temperature, mse_weight=mse_weight,
                         ce_weight=ce_weight, normalize=normalize, symmetric=symmetric,
                         check_values=check_values, process_group=process_group)
    check.check_logits(student_shard, teacher_shard)
    check.check_index("ignore_index", ignore_index)
    _check_weight_source(student_shard, labels, class_prior_shard, weights, options)
    keep = prior_labels = None
    if labels is not None:
        _check_labels(labels, student_shard, class_prior_shard, ignore_index, options)
        keep = labels != ignore_index
    factor = weights
    if class_prior_shard is not None:
        prior_labels = torch.where(keep, labels, 0)  # ignored rows read row 0, then weigh 0
        _check_prior_rows(class_prior_shard, prior_labels, keep, options.check_values)
        factor = class_prior_shard
    return _VocabParallelGKL.apply(student_shard, teacher_shard,
                                   None if factor is None else factor.detach(), prior_labels, keep,
                                   options)


# --------------------------------------------------------------------------- validation


def _check_weight_source(student, labels, class_prior_shard, weights, options):
    """At most one of ``weights`` ``(N, V_p)`` and ``class_prior_shard`` ``(V, V_p)`` (which
    needs ``labels``), of the right shape, dtype and device; explicit weights finite and >= 0."""
    if weights is not None and class_prior_shard is not None:
        raise ValueError("give either weights or class_prior_shard, not both")
    if weights is not None:
        check.check_weights(weights, student, "factor", options.check_values)
    if class_prior_shard is not None:
        if labels is None:
            raise ValueError("class_prior_shard needs labels (N,) to pick each row's prior")
        _check_prior_shard_shape(class_prior_shard, student, options.process_group)


def _check_prior_shard_shape(prior, student, group):
    """``(V, V_p)`` float on the logits' device: ``V_p`` this shard's width, ``V`` (the whole
    vocabulary) ``>= V_p``, and ``== V_p`` without other processes."""
    if not isinstance(prior, torch.Tensor):
        raise TypeError(f"class_prior_shard must be a torch.Tensor, got {type(prior).__name__}")
    if prior.dim() != 2:
        raise ValueError(f"class_prior_shard must be 2-D (V, V_p), got shape {tuple(prior.shape)}")
    width = student.shape[1]
    check.check_tensor("class_prior_shard", prior, (prior.shape[0], width), check.FLOAT_DTYPES,
                        student.device)
    alone = _world_size(group) == 1
    if prior.shape[0] < width or (alone and prior.shape[0] != width):
        expected = f"= V_p = {width} in one process" if alone else f">= V_p = {width}"
        raise ValueError(f"class_prior_shard must have V rows, the whole vocabulary ({expected}), "
                         f"got shape {tuple(prior.shape)}")


def _check_labels(labels, student, class_prior_shard, ignore_index, options):
    """``(N,)`` int64/int32 on the logits' device, each in ``[0, V)`` or ``ignore_index``; ``V``
    is found (a collective without the prior) only when the values are checked."""
    vocabulary = None
    if check.values_checked(options.check_values):
        vocabulary = _total_vocabulary(student, class_prior_shard, options.process_group)
    check.check_labels(labels, student.shape[0], vocabulary, student.device,
                       options.check_values, ignore_index)


def _total_vocabulary(student, class_prior_shard, group):
    """``V``: the prior shard's rows, else the shard widths summed over the group."""
    if class_prior_shard is not None:
        return class_prior_shard.shape[0]
    width = torch.tensor([student.shape[1]], dtype=torch.int64, device=student.device)
    return int(_all_reduced(width, "sum", group))


def _check_prior_rows(prior, prior_labels, keep, check_values):
    """The prior rows of the kept rows' labels: finite and >= 0 (the others never count)."""
    if check.values_checked(check_values):
        rows = torch.where(keep[:, None], prior.index_select(0, prior_labels), 0.0)
        check.check_nonnegative_finite("class_prior_shard", rows, check_values)


# --------------------------------------------------------------------------- communication


def _distributed():
    return distributed.is_available() and distributed.is_initialized()


def _world_size(group):
    return distributed.get_world_size(group) if _distributed() else 1


def _all_reduced(tensor, op, group):
    """``tensor`` reduced in place (``op``: ``"sum"`` or ``"max"``) over the processes of
    ``group``; as it is without an initialised process group."""
    if _distributed():
        reduce_op = distributed.ReduceOp.SUM if op == "sum" else distributed.ReduceOp.MAX
        distributed.all_reduce(tensor, op=reduce_op, group=group)
    return tensor


# --------------------------------------------------------------------------- row statistics


def _row_maxima(student, teacher):
    """``(N, 2)`` float32: this shard's largest student and teacher logit of each row."""
    return torch.stack([student.amax(dim=1), teacher.amax(dim=1)], dim=1).float()


def _relative_logits(student, teacher, maxima):
    """``(s' = s - m_s, t' = t - m_t)`` ``(N, V_p)`` float32 with the whole vocabulary's row
    maxima ``maxima`` ``(N, 2)``: exponentials of them are <= 1."""
    return student.float() - maxima[:, :1], teacher.float() - maxima[:, 1:]


def _weight_factor(t_rel, factor, prior_labels, keep, gamma, weight_temperature):
    """``v'`` ``(N, V_p)`` float32, 0 on ignored rows (``keep`` False): the given factor,
    ``prior[labels] ** gamma`` (``factor`` the prior shard, ``prior_labels`` given), or
    ``exp(gamma t' / T2)``, the teacher's ``softmax(t / T2) ** gamma`` times a per-row scale."""
    if factor is None:
        v = t_rel.mul(gamma / weight_temperature).exp_()
    elif prior_labels is None:
        v = factor.float()
    else:
        v = factor.index_select(0, prior_labels).float().pow_(gamma)
    return v if keep is None else torch.where(keep[:, None], v, 0.0)


def _cross_entropy_sums(s_rel, t_rel, temperature):
    """``(N, 3)``: this shard's ``sum exp(s'/T)``, ``sum exp(t'/T)`` and ``sum exp(t'/T) s'/T``."""
    s_scaled = s_rel / temperature
    t_exp = (t_rel / temperature).exp_()
    return torch.stack([s_scaled.exp().sum(dim=1), t_exp.sum(dim=1),
                        torch.linalg.vecdot(t_exp, s_scaled)], dim=1)


def _factor_sums(v, d, t_rel, weight_temperature):
    """``(N, 2)`` this shard's ``W' = sum v'`` and ``sum v' d``, and with teacher weights
    (``t_rel`` given) ``(N, 3)`` with ``sum exp(t'/T2)`` last."""
    sums = [v.sum(dim=1), torch.linalg.vecdot(v, d)]
    if t_rel is not None:
        sums.append((t_rel / weight_temperature).exp_().sum(dim=1))
    return torch.stack(sums, dim=1)


def _moments_about(rough_mean, v, d):
    """``(N, 2)``: this shard's ``sum v' (d - mu~)`` and ``sum v' (d - mu~)^2`` about the rough
    mean ``mu~`` ``(N,)`` (overwrites ``d``)."""
    deviation = d.sub_(rough_mean[:, None])
    weighted = v * deviation
    return torch.stack([weighted.sum(dim=1), torch.linalg.vecdot(weighted, deviation)], dim=1)


def _softmax_difference(s_rel, t_rel, log_z_s, log_z_t, temperature):
    """``softmax(s/T) - softmax(t/T)`` ``(N, V_p)`` from the whole vocabulary's row sums
    ``log sum exp(s'/T)`` and ``log sum exp(t'/T)`` ``(N,)``."""
    q = (s_rel / temperature).sub_(log_z_s[:, None]).exp_()
    return q.sub_((t_rel / temperature).sub_(log_z_t[:, None]).exp_())


class _RowStatistics(NamedTuple):
    """The whole vocabulary's per-row ``(N,)`` statistics (``maxima`` ``(N, 2)``: ``m_s, m_t``)."""

    maxima: torch.Tensor
    log_z_s: torch.Tensor  # log sum exp(s'/T)
    log_z_t: torch.Tensor  # log sum exp(t'/T)
    ce: torch.Tensor  # CE_b
    scale: torch.Tensor  # c = (sum exp(t'/T2)) ** -gamma with teacher weights, else 1
    weight_sum: torch.Tensor  # W = c W'
    rough_mean: torch.Tensor  # mu~ = sum v' d / W'; the weighted mean mu = mu~ + residual
    residual: torch.Tensor
    wmse: torch.Tensor  # 2 W sum v (d - mu)^2 = 2 c^2 W' M2'


def _row_statistics(student, teacher, factor, prior_labels, keep, options):
    """The three all-reduces: row maxima, then the exponential and weight sums, then the moments
    about the rough mean. Every process gets the same ``_RowStatistics``."""
    group = options.process_group
    maxima = _all_reduced(_row_maxima(student, teacher), "max", group)
    s_rel, t_rel = _relative_logits(student, teacher, maxima)
    teacher_weights = factor is None
    v = _weight_factor(t_rel, factor, prior_labels, keep, options.gamma,
                       options.weight_temperature)
    d = t_rel - s_rel
    sums = torch.cat([_cross_entropy_sums(s_rel, t_rel, options.temperature),
                      _factor_sums(v, d, t_rel if teacher_weights else None,
                                   options.weight_temperature)], dim=1)
    z_s, z_t, t_weighted_s, w_sum, weighted_d, *z_w = _all_reduced(sums, "sum", group).unbind(1)
    rough_mean = safe_ratio(weighted_d, w_sum)
    residual_sum, rough_m2 = _all_reduced(_moments_about(rough_mean, v, d), "sum",
                                          group).unbind(1)
    residual = safe_ratio(residual_sum, w_sum)
    m2 = (rough_m2 - residual_sum * residual).clamp_min_(0.0)
    scale = z_w[0].log().mul_(-options.gamma).exp_() if teacher_weights else torch.ones_like(w_sum)
    log_z_s = z_s.log()
    return _RowStatistics(maxima, log_z_s, z_t.log(), log_z_s - t_weighted_s / z_t, scale,
                          scale * w_sum, rough_mean, residual, 2.0 * scale * w_sum * scale * m2)


# --------------------------------------------------------------------------- autograd


class _VocabParallelGKL(torch.autograd.Function):
    """Forward: three all-reduces of row statistics, then the loss. Backward: local; the gradient
    directions are recomputed from the inputs and the saved row statistics."""

    @staticmethod
    def forward(ctx, student, teacher, factor, prior_labels, keep, options):
        rows = _row_statistics(student, teacher, factor, prior_labels, keep, options)
        kept = torch.ones_like(rows.ce) if keep is None else keep.float()
        row_count = kept.sum()
        normaliser = rows.weight_sum.square().sum() if options.normalize == "weights" \
            else row_count
        mse_factor = safe_ratio(options.mse_weight, normaliser)
        ce_factor = safe_ratio(options.ce_weight, row_count)
        ctx.options = options
        ctx.save_for_backward(student, teacher, factor, prior_labels, keep, rows.maxima,
                              rows.log_z_s, rows.log_z_t, rows.rough_mean, rows.residual,
                              mse_factor * rows.scale * rows.weight_sum,
                              kept * (ce_factor / options.temperature))
        return mse_factor / 4 * rows.wmse.sum() + ce_factor * (rows.ce * kept).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        """``dL/dt = (mse_weight / N) W v (d - mu)``; ``dL/ds = (ce_weight / (R T)) (softmax(s/T)
        - softmax(t/T)) - [symmetric] dL/dt``, each row's factors saved by forward."""
        (student, teacher, factor, prior_labels, keep, maxima, log_z_s, log_z_t, rough_mean,
         residual, wmse_rows, ce_rows) = ctx.saved_tensors
        options = ctx.options
        need_student, need_teacher = ctx.needs_input_grad[:2]
        s_rel, t_rel = _relative_logits(student, teacher, maxima)
        wmse_direction = grad_student = None  # float32; autograd casts to the inputs' dtypes
        if need_teacher or (need_student and options.symmetric):
            v = _weight_factor(t_rel, factor, prior_labels, keep, options.gamma,
                               options.weight_temperature)
            wmse_direction = (t_rel - s_rel).sub_(rough_mean[:, None]).sub_(residual[:, None])
            wmse_direction.mul_(v).mul_((grad_loss * wmse_rows)[:, None])
        if need_student:
            grad_student = _softmax_difference(s_rel, t_rel, log_z_s, log_z_t,
                                               options.temperature)
            grad_student.mul_((grad_loss * ce_rows)[:, None])
            if options.symmetric:
                grad_student.sub_(wmse_direction)
        return grad_student, wmse_direction if need_teacher else None, None, None, None, None
