"""Public functional API: ``gkl_loss`` and ``pairwise_wmse``.

``L = mse_weight * sum_b wmse_b / (4 N) + ce_weight * mean_b CE_b`` (SPEC.md). Rank-one pair
weights ``v_j v_k`` run in O(C) per row (``rank1``); shared ``(C, C)`` and per-row ``(B, C, C)``
weights in tiled kernels (``pairs``). No ``B x C x C`` tensor is ever built.
"""

import torch
from torch import distributed

from gkl_kernels import validation as check
from gkl_kernels.options import GKLOptions
from gkl_kernels.pairs.op import pair_rows
from gkl_kernels.rank1.config import (NUM_TOTALS, SOURCE_EXPLICIT, SOURCE_NONE, SOURCE_PAIRS,
                                      SOURCE_PRIOR, SOURCE_TEACHER, STAT_W, TOTAL_CE, TOTAL_DEN,
                                      TOTAL_K, TOTAL_ROWS, TOTAL_WMSE, RowConfig)
from gkl_kernels.rank1.op import (TorchRankOneLoss, rank1_finish, rank1_loss,
                                  rank1_loss_backward, rank1_row_stats)
from gkl_kernels.rank1.torch_impl import finish_rows_torch

REDUCTIONS = ("none", "sum", "mean")


def gkl_loss(student, teacher, *, labels=None, class_prior=None, weights=None, weights_kind=None,
             gamma=1.0, temperature=1.0, weight_temperature=1.0, mse_weight=1.0, ce_weight=1.0,
             normalize="weights", symmetric=True, backend="auto", check_values=True,
             block_c=None, dot_precision="ieee", sync_normalizer=False, process_group=None,
             ignore_index=-100):
    """The GKL loss (``symmetric=True``) or DKL (``symmetric=False``: only the teacher gets the
    wMSE gradient), a 0-dim float32 tensor.

    student, teacher: ``(B, C)`` logits, float32/float16/bfloat16 (the dtypes may differ).
    Pair weights, in this order: ``weights`` as given, of shape ``(B, C)`` (a rank-one factor
    ``v``, ``w = v_j v_k``), ``(C, C)`` (one matrix for every row) or ``(B, C, C)`` (one per row);
    when ``B == C`` a 2-D ``weights`` needs ``weights_kind="factor"`` or ``"shared"``
    (``"per_row"`` names the 3-D form). Else ``v = class_prior[labels] ** gamma``
    (``class_prior`` ``(C, C)``, ``labels`` ``(B,)`` int); else ``v = softmax(teacher /
    weight_temperature) ** gamma``. Weights are constants; explicit weights are used as given.
    temperature: ``T`` of the cross-entropy ``-sum_j softmax(t/T)_j log_softmax(s/T)_j``.
    normalize: ``"weights"`` divides the wMSE by ``N = sum_{b,j,k} w`` (GKL; a batch whose weights
    sum to 0 gives a wMSE term of 0), ``"batch"`` by ``B`` (IKL).
    backend: ``"auto"`` (Triton for CUDA tensors and for CPU tensors under ``TRITON_INTERPRET=1``,
    else ``"torch"``), ``"triton"`` or ``"torch"``.
    check_values: check label range and weight values (a host synchronisation on CUDA); skipped
    while ``torch.compile`` traces. block_c: force the kernels' tile width (a power of two; >= 16
    for ``(C, C)`` weights). dot_precision: ``tl.dot`` operands for ``(C, C)`` weights under Triton,
    ``"ieee"`` (float32), ``"tf32x3"`` or ``"tf32"`` (tensor cores; see ``pairs.shared_kernels``).
    sync_normalizer: under ``torch.distributed``, the loss of the batch of every process of
    ``process_group`` (None: the default group) concatenated, as one process would compute it:
    one all-reduce of four numbers (this batch's wMSE and CE sums, ``N`` and ``B``). The value is
    that loss on every process; the gradient reaches this process's logits only, exactly its rows
    of the one-process gradient (so the parameter gradients summed over processes are the
    one-process ones; DDP averages them instead: scale the loss by the world size to train as one
    process would). Off (default): each process normalises by its own ``N`` and ``B``, as the
    authors' multi-GPU training does. Without an initialised process group both are the same.
    ignore_index: rows whose label equals it (token-level distillation: padding, prompt tokens)
    add nothing to the loss, to ``N`` or ``B`` (which count the kept rows) or to the gradient
    (theirs is 0); with the class prior they need no valid label. A batch with every row ignored
    gives a loss of 0 and zero gradients. Without ``labels`` every row is kept.
    """
    options = GKLOptions(gamma=gamma, temperature=temperature,
                         weight_temperature=weight_temperature, mse_weight=mse_weight,
                         ce_weight=ce_weight, normalize=normalize, symmetric=symmetric,
                         backend=backend, check_values=check_values, block_c=block_c,
                         dot_precision=dot_precision, sync_normalizer=sync_normalizer,
                         process_group=process_group, ignore_index=ignore_index)
    return gkl_loss_with_options(student, teacher, options, labels=labels,
                                 class_prior=class_prior, weights=weights,
                                 weights_kind=weights_kind)


def gkl_loss_with_options(student, teacher, options, *, labels=None, class_prior=None,
                          weights=None, weights_kind=None):
    """``gkl_loss`` with its scalar options given as a checked ``GKLOptions``."""
    check.check_logits(student, teacher)
    use_triton = check.use_triton_for(options.backend, student.device)
    host_values = options.check_values and not kernels_check_values(use_triton, student.device)
    if labels is not None:
        check.check_labels(labels, *student.shape, student.device, host_values,
                           options.ignore_index)
    kind = None
    if weights is not None:
        if class_prior is not None:
            raise ValueError("give either weights or class_prior, not both")
        kind = _checked_weights_kind(weights, student, weights_kind, options, host_values)
    elif weights_kind is not None:
        raise ValueError(f"weights_kind={weights_kind!r} needs weights")
    elif class_prior is not None:
        if labels is None:
            raise ValueError("class_prior needs labels (B,) to pick each row's prior")
        kept = labels != options.ignore_index if host_values else None
        check.check_prior(class_prior, torch.where(kept, labels, 0) if host_values else labels,
                          student.shape[1], student.device, host_values, keep=kept)
    pairs = {}
    if kind in ("shared", "per_row"):
        source, factor = SOURCE_PAIRS, weights.detach()
        pairs = dict(per_row=kind == "per_row",
                     dot_precision=check.DOT_PRECISIONS.index(options.dot_precision))
    elif weights is not None:
        source, factor = SOURCE_EXPLICIT, weights.detach()
    elif class_prior is not None:
        source, factor = SOURCE_PRIOR, class_prior.detach()
    else:
        source, factor = SOURCE_TEACHER, None
    config = row_config(options, source, labels is not None, use_triton, **pairs)
    if options.sync_normalizer:
        return _SyncedRankOneLoss.apply(student, teacher, factor, labels, config,
                                        options.process_group)
    if not use_triton and not torch.compiler.is_compiling():
        return TorchRankOneLoss.apply(student, teacher, factor, labels, config)
    return rank1_loss(student, teacher, factor, labels, config.floats, config.ints,
                      _gradients_wanted(student, teacher))[0]


def kernels_check_values(use_triton, device):
    """Whether the kernels check label and weight values (a device assertion of the compiled
    finishing kernel, no host synchronisation) instead of the host: compiled Triton on CUDA.
    Elsewhere reading the values is free (CPU tensors, where the interpreter runs no device
    assertion) or the torch path's own device-side assertions check them."""
    return use_triton and device.type == "cuda"


def row_config(options, source, has_labels, use_triton, **changes):
    """The ``RowConfig`` of ``options`` for one weight source (``changes`` override fields)."""
    fields = dict(source=source, gamma=options.gamma, temperature=options.temperature,
                  weight_temperature=options.weight_temperature, mse_weight=options.mse_weight,
                  ce_weight=options.ce_weight, normalize_batch=options.normalize == "batch",
                  symmetric=options.symmetric, has_labels=has_labels,
                  ignore_index=options.ignore_index, use_triton=use_triton,
                  block_c=options.block_c or 0)
    fields.update(changes)
    return RowConfig(**fields)


def _gradients_wanted(student, teacher):
    """Whether a backward pass may follow (autograd records, a logit needs its gradient)."""
    return torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad)


def safe_ratio(numerator, denominator):
    """``numerator / denominator``, 0 (with no gradient through it) where ``denominator`` is 0."""
    empty = denominator == 0
    return torch.where(empty, 0.0, numerator / torch.where(empty, 1.0, denominator))


def _distributed():
    return distributed.is_available() and distributed.is_initialized()


def all_process_totals(totals, group):
    """The batch totals of every process's rows together: the largest scale exponent ``K``, then
    the sums (the normaliser mantissa and wMSE sum brought to that ``K``), two all-reduces."""
    if not _distributed():
        return totals
    top = totals[TOTAL_K].clone()
    distributed.all_reduce(top, op=distributed.ReduceOp.MAX, group=group)
    f = torch.exp2(totals[TOTAL_K] - top)
    sums = torch.stack([totals[TOTAL_DEN] * f * f, totals[TOTAL_ROWS],
                        totals[TOTAL_WMSE] * f * f, totals[TOTAL_CE]])
    distributed.all_reduce(sums, group=group)
    merged = totals.clone()
    merged[TOTAL_K] = top
    merged[[TOTAL_DEN, TOTAL_ROWS, TOTAL_WMSE, TOTAL_CE]] = sums
    return merged


def loss_from_totals(totals, config):
    """``mse_weight wmse_sum / (4 N) + ce_weight ce_sum / R`` from batch totals (0-dim)."""
    rows = totals[TOTAL_ROWS].clamp_min(1.0)
    loss = totals.new_zeros(())
    if config.with_wmse:
        norm = rows if config.normalize_batch else totals[TOTAL_DEN]
        loss = (config.mse_weight / 4) * safe_ratio(totals[TOTAL_WMSE], norm)
    if config.with_ce:
        loss = loss + config.ce_weight * totals[TOTAL_CE] / rows
    return loss


class _SyncedRankOneLoss(torch.autograd.Function):
    """``sync_normalizer``: the loss of every process's rows together, from this process's
    statistics and the all-reduced totals; backward is this process's rows of its gradient."""

    @staticmethod
    def forward(ctx, student, teacher, factor, labels, config, group):
        stats = rank1_row_stats(student, teacher, factor, labels, config.floats, config.ints)
        totals = all_process_totals(rank1_finish(stats, config.floats, config.ints)[1], group)
        ctx.save_for_backward(student, teacher, factor, labels, stats, totals)
        ctx.config = config
        return loss_from_totals(totals, config)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, factor, labels, stats, totals = ctx.saved_tensors
        config = ctx.config
        need_ds = ctx.needs_input_grad[0]
        need_dt = ctx.needs_input_grad[1] and config.source != SOURCE_NONE
        empty = stats.new_empty(0)
        ds, dt = rank1_loss_backward(grad_loss, student, teacher, factor, labels, stats, totals,
                                     empty, empty, config.floats, config.ints, need_ds, need_dt)
        return ds if need_ds else None, dt if need_dt else None, None, None, None, None


def _checked_weights_kind(weights, student, weights_kind, options, check_values):
    """The weights' kind, their values checked when ``check_values`` (``gkl_loss``: not where its
    kernels check the weights they read themselves, compiled Triton on CUDA)."""
    kind = check.check_weights(weights, student, weights_kind, False)
    check.check_nonnegative_finite("weights", weights, check_values)
    if kind == "shared":
        check.check_dot_block(options.block_c)
    return kind


def pairwise_wmse(student, teacher, weights, *, weights_kind=None, reduction="sum",
                  backend="auto", check_values=True, block_c=None, dot_precision="ieee"):
    """``sum_{j,k} w[b,j,k] ((t_j - t_k) - (s_j - s_k))^2`` per row, float32.

    student, teacher: ``(B, C)`` logits. weights (constants): a ``(B, C)`` rank-one factor ``v``
    (``w = v_j v_k``), a ``(C, C)`` matrix shared by every row, or a ``(B, C, C)`` tensor; the
    shape decides, ``weights_kind`` (``"factor"``, ``"shared"``, ``"per_row"``) settles ``B == C``.
    reduction: ``"none"`` gives ``(B,)``, ``"sum"`` and ``"mean"`` (over rows) a 0-dim tensor.
    Gradients go to student and teacher. backend, check_values, block_c, dot_precision: as in
    ``gkl_loss``.
    """
    check.check_choice("reduction", reduction, REDUCTIONS)
    options = GKLOptions(backend=backend, check_values=check_values, block_c=block_c,
                         dot_precision=dot_precision)
    check.check_logits(student, teacher)
    use_triton = check.use_triton_for(backend, student.device)
    kind = _checked_weights_kind(weights, student, weights_kind, options, check_values)
    if kind == "factor":
        config = RowConfig(source=SOURCE_EXPLICIT, mse_weight=4.0, ce_weight=0.0,
                           normalize_batch=True, use_triton=use_triton, block_c=block_c or 0)
        wmse = _RowWmse.apply(student, teacher, weights.detach(), config)
    else:
        wmse = pair_rows(student, teacher, weights.detach(), kind == "per_row", True, use_triton,
                         block_c or 0, dot_precision)[0]
    if reduction == "sum":
        return wmse.sum()
    if reduction == "mean":
        return wmse.mean()
    return wmse


class _RowWmse(torch.autograd.Function):
    """Per-row rank-one wMSE ``(B,)`` of an explicit factor: the row kernel's statistics, and the
    loss's backward kernel fed one gradient per row (``N = R = 1``, ``mse_weight = 4``)."""

    @staticmethod
    def forward(ctx, student, teacher, factor, config):
        stats = rank1_row_stats(student, teacher, factor, None, config.floats, config.ints)
        exponent, wmse, _ = finish_rows_torch(stats, config)
        ctx.save_for_backward(student, teacher, factor, stats)
        ctx.config = config
        f = torch.exp2(exponent)
        return torch.where(stats[:, STAT_W] > 0, f * f * wmse, 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        student, teacher, factor, stats = ctx.saved_tensors
        totals = stats.new_zeros(NUM_TOTALS)
        totals[TOTAL_ROWS] = 1.0
        empty = stats.new_empty(0)
        ds, dt = rank1_loss_backward(grad_rows.contiguous(), student, teacher, factor, None,
                                     stats, totals, empty, empty, ctx.config.floats,
                                     ctx.config.ints, ctx.needs_input_grad[0],
                                     ctx.needs_input_grad[1])
        return (ds if ctx.needs_input_grad[0] else None,
                dt if ctx.needs_input_grad[1] else None, None, None)
