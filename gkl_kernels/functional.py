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
from gkl_kernels.rank1.kernels import SOURCE_EXPLICIT, SOURCE_NONE, SOURCE_PRIOR, SOURCE_TEACHER
from gkl_kernels.rank1.op import rank1_rows

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
    kept = None
    if labels is not None:
        check.check_labels(labels, *student.shape, student.device, options.check_values,
                           options.ignore_index)
        kept = labels != options.ignore_index
        labels = torch.where(kept, labels, 0)  # ignored rows pick any prior row; it is masked
    kind = None
    if weights is not None:
        if class_prior is not None:
            raise ValueError("give either weights or class_prior, not both")
        kind = _checked_weights_kind(weights, student, weights_kind, options)
    elif weights_kind is not None:
        raise ValueError(f"weights_kind={weights_kind!r} needs weights")
    elif class_prior is not None:
        if labels is None:
            raise ValueError("class_prior needs labels (B,) to pick each row's prior")
        check.check_prior(class_prior, labels, student.shape[1], student.device,
                          options.check_values)
    with_ce = options.ce_weight != 0
    if kind in ("shared", "per_row"):
        wmse, ce, weight_sums = _general_pair_rows(student, teacher, weights, kind == "per_row",
                                                   options, with_ce, use_triton)
    else:
        wmse, ce, weight_sums = _rank_one_rows(student, teacher, weights, labels, class_prior,
                                               options, with_ce, use_triton)
    if kept is None:
        rows = weight_sums.new_tensor(float(student.shape[0]))
    else:
        wmse, weight_sums = _kept_only(wmse, kept), _kept_only(weight_sums, kept)
        ce = _kept_only(ce, kept) if with_ce else None
        rows = kept.sum(dtype=torch.float32)
    normaliser = weight_sums.sum() if options.normalize == "weights" else rows
    ce_sum = ce.sum() if with_ce else None
    if options.sync_normalizer:
        return _loss_of_all_processes(wmse.sum(), ce_sum, normaliser, rows, options)
    return _loss_from_sums(wmse.sum(), ce_sum, normaliser, rows, options)


def _kept_only(per_row, kept):
    """A per-row tensor with the ignored rows' entries 0 (and no gradient to them)."""
    return torch.where(kept, per_row, 0.0)


def _loss_from_sums(wmse_sum, ce_sum, normaliser, rows, options):
    """``mse_weight * wmse_sum / (4 N) + ce_weight * ce_sum / rows``: a wMSE term of 0 when
    ``N = 0``, a cross-entropy term of 0 when ``rows = 0`` (every row ignored, so ``ce_sum = 0``)
    and none when ``ce_sum`` is None."""
    loss = (options.mse_weight / 4) * safe_ratio(wmse_sum, normaliser)
    if ce_sum is not None:
        loss = loss + options.ce_weight * ce_sum / rows.clamp(min=1.0)
    return loss


def safe_ratio(numerator, denominator):
    """``numerator / denominator``, 0 (with no gradient through it) where ``denominator`` is 0."""
    empty = denominator == 0
    return torch.where(empty, 0.0, numerator / torch.where(empty, 1.0, denominator))


def _loss_of_all_processes(wmse_sum, ce_sum, normaliser, rows, options):
    """The loss of every process's batch concatenated (``sync_normalizer``): one all-reduce of
    this batch's four numbers; the value is the total loss, the gradient that of this batch's
    share of it."""
    with_ce = ce_sum is not None
    local = torch.stack([wmse_sum, ce_sum if with_ce else torch.zeros_like(wmse_sum), normaliser,
                         rows]).detach()
    if distributed.is_available() and distributed.is_initialized():
        distributed.all_reduce(local, group=options.process_group)
    all_wmse, all_ce, all_normaliser, all_rows = local.unbind()
    share = _loss_from_sums(wmse_sum, ce_sum, all_normaliser, all_rows, options)
    total = _loss_from_sums(all_wmse, all_ce if with_ce else None, all_normaliser, all_rows,
                            options)
    return share + (total - share).detach()


def _rank_one_rows(student, teacher, weights, labels, class_prior, options, with_ce, use_triton):
    """Rank-one pair weights (explicit factor, class prior or teacher): per-row wMSE,
    cross-entropy and pair-weight sums ``W_b^2``, (B,) each."""
    if weights is not None:
        source, factor = SOURCE_EXPLICIT, weights.detach()
    elif class_prior is not None:
        source, factor = SOURCE_PRIOR, class_prior.detach()
    else:
        source, factor = SOURCE_TEACHER, None
    wmse, ce, stats, *_ = rank1_rows(
        student, teacher, factor, labels if source == SOURCE_PRIOR else None, source,
        float(options.gamma), float(options.temperature), float(options.weight_temperature),
        with_ce, options.symmetric, use_triton, options.block_c or 0,
        _gradients_wanted(student, teacher))
    return wmse, ce, stats[:, 0].detach().square()


def _gradients_wanted(student, teacher):
    """Whether a backward pass may follow (autograd records, a logit needs its gradient)."""
    return torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad)


def _general_pair_rows(student, teacher, weights, per_row, options, with_ce, use_triton):
    """Shared ``(C, C)`` or per-row ``(B, C, C)`` weights: per-row wMSE, cross-entropy (or None
    without it) and pair-weight sums, (B,) each."""
    block_c = options.block_c or 0
    wmse, weight_sums = pair_rows(student, teacher, weights.detach(), per_row, options.symmetric,
                                  use_triton, block_c, options.dot_precision)
    ce = None
    if with_ce:
        ce = rank1_rows(student, teacher, None, None, SOURCE_NONE, 1.0, float(options.temperature),
                        1.0, True, options.symmetric, use_triton, block_c,
                        _gradients_wanted(student, teacher))[1]
    return wmse, ce, weight_sums


def _checked_weights_kind(weights, student, weights_kind, options):
    kind = check.check_weights(weights, student, weights_kind, options.check_values)
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
    kind = _checked_weights_kind(weights, student, weights_kind, options)
    if kind == "factor":
        wmse = rank1_rows(student, teacher, weights.detach(), None, SOURCE_EXPLICIT, 1.0, 1.0,
                          1.0, False, True, use_triton, block_c or 0,
                          _gradients_wanted(student, teacher))[0]
    else:
        wmse = pair_rows(student, teacher, weights.detach(), kind == "per_row", True, use_triton,
                         block_c or 0, dot_precision)[0]
    if reduction == "sum":
        return wmse.sum()
    if reduction == "mean":
        return wmse.mean()
    return wmse
