"""Public functional API: ``gkl_loss``, ``jsd_loss`` and ``pairwise_wmse``.

``L = mse_weight * sum_b wmse_b / (4 N) + ce_weight * mean_b CE_b`` (docs/SPEC.md). Rank-one pair
weights ``v_j v_k`` run in O(C) per row (``rank1``); shared ``(C, C)`` and per-row ``(B, C, C)``
weights in tiled kernels (``pairs``). No ``B x C x C`` tensor is ever built.
"""

from dataclasses import replace
from typing import Any, Optional, Union

import torch
from torch import Tensor

from gkl_kernels import validation as check
from gkl_kernels.core.config import (SOURCE_EXPLICIT, SOURCE_PAIRS, SOURCE_PRIOR,
                                     SOURCE_TEACHER, compute_dtype)
from gkl_kernels.options import GKLOptions
from gkl_kernels.pairs.op import pair_rows
from gkl_kernels.rows import MEAN, PER_ROW, RowLoss, SyncedMean
from gkl_kernels.sparse_teacher import (SparseTeacher, check_sparse_teacher, compact_rows,
                                        optional_factor, readable_indices, sparse_teacher_loss)
from gkl_kernels.validation import Backend, DotPrecision, Normalize, Reduction, WeightsKind


def gkl_loss(student: Tensor, teacher: Union[Tensor, SparseTeacher], *,
             labels: Optional[Tensor] = None,
             class_prior: Optional[Tensor] = None, weights: Optional[Tensor] = None,
             weights_kind: Optional[WeightsKind] = None, gamma: float = 1.0,
             temperature: float = 1.0, weight_temperature: float = 1.0, mse_weight: float = 1.0,
             ce_weight: float = 1.0, normalize: Normalize = "weights", symmetric: bool = True,
             reduction: Reduction = "mean", backend: Backend = "auto",
             check_values: bool = True, block_c: Optional[int] = None,
             dot_precision: DotPrecision = "ieee", sync_normalizer: bool = False,
             process_group: Optional[Any] = None, ignore_index: int = -100) -> Tensor:
    """The GKL loss (``symmetric=True``) or DKL (``symmetric=False``: only the teacher gets the
    wMSE gradient): ``mse_weight sum_b wmse_b / (4 N) + ce_weight mean_b CE_b`` with
    ``wmse_b = sum_{j,k} w_bjk ((t_j - t_k) - (s_j - s_k))^2`` and
    ``CE_b = -sum_j softmax(t_b / T)_j log_softmax(s_b / T)_j`` (``docs/MATH.md``).

    Args:
        student, teacher: logits ``(..., C)`` of one shape (rows: every leading index),
            float32 / float16 / bfloat16 (the dtypes may differ) or float64 (computed in float64,
            on both backends). ``teacher`` may be a ``SparseTeacher``, its cached top-k classes
            (``sparse_teacher``: the loss over them and one class for the rest; rank-one
            ``weights`` or ``class_prior`` are gathered there).
        labels: ``(...)`` int64 / int32 class indices, for ``class_prior`` and ``ignore_index``.
        class_prior: ``(C, C)``; row ``b`` uses ``v = class_prior[labels[b]] ** gamma``.
        weights: pair weights, constants: ``(..., C)`` a rank-one factor ``v`` (``w = v_j v_k``),
            ``(C, C)`` one matrix for every row, or ``(..., C, C)`` one per row. Without
            ``weights`` and ``class_prior``: ``v = softmax(teacher / weight_temperature) ** gamma``.
        weights_kind: ``"factor"``, ``"shared"`` or ``"per_row"``; needed when ``B == C`` makes a
            2-D ``weights`` ambiguous.
        gamma: power of the rank-one factor. temperature: ``T`` of the cross-entropy.
        weight_temperature: ``T2`` of the teacher weights. mse_weight, ce_weight: the two terms'
            factors.
        normalize: ``"weights"`` divides the wMSE by ``N = sum_{b,j,k} w`` (GKL; weights summing
            to 0 give a wMSE term of 0), ``"batch"`` by the row count (IKL).
        reduction: ``"mean"`` the loss above (0-dim); ``"none"`` the per-row losses
            ``mse_weight wmse_b / 4 + ce_weight CE_b`` of shape ``(...)``, not normalised (0 for
            ignored rows); ``"sum"`` their sum. With ``normalize="batch"`` ``"mean"`` is the sum
            over the kept rows' count.
        backend: ``"auto"`` (Triton for CUDA tensors and for CPU tensors under
            ``TRITON_INTERPRET=1``, else PyTorch), ``"triton"`` or ``"torch"``.
        check_values: check label and weight values: free on CPU; device-side assertions or the
            kernels' own flags on CUDA (no host synchronisation); skipped under
            ``torch.compile``.
        block_c: force the kernels' tile width (a power of two; >= 16 for ``(C, C)`` weights).
        dot_precision: ``(C, C)`` weights under Triton: ``"ieee"`` (float32 FMA, exact) or
            ``"tf32x3"`` / ``"tf32"`` (tensor cores; error relative to ``max |t - s|``).
        sync_normalizer: under ``torch.distributed``, the loss of every process's rows together
            (one all-reduce of four numbers); each process gets its own rows' gradient (DDP
            averages: scale the loss by the world size). Off: each process normalises by its own
            rows, as the authors' multi-GPU training does. ``reduction="mean"`` only.
        process_group: the group of ``sync_normalizer`` (None: the default group).
        ignore_index: rows whose label equals it add nothing to the loss, to ``N`` or the row
            count, and get a zero gradient; an all-ignored (or empty) batch gives 0.

    Returns:
        float32 (float64 for float64 logits): 0-dim for ``"mean"`` and ``"sum"``, ``(...)`` for
        ``"none"``.
    """
    options = GKLOptions.of(locals())
    return gkl_loss_with_options(student, teacher, options, labels=labels,
                                 class_prior=class_prior, weights=weights,
                                 weights_kind=weights_kind)


def gkl_loss_with_options(student: Tensor, teacher: Union[Tensor, SparseTeacher],
                          options: GKLOptions, *, labels: Optional[Tensor] = None,
                          class_prior: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                          weights_kind: Optional[WeightsKind] = None) -> Tensor:
    """``gkl_loss`` with its scalar options given as a checked ``GKLOptions``."""
    if isinstance(teacher, SparseTeacher):
        return _sparse_teacher_loss(student, teacher, options, labels, class_prior, weights,
                                    weights_kind)
    check.check_logits(student, teacher, any_rows=True)
    lead = student.shape[:-1]
    if student.dim() != 2:
        if weights is not None:  # the kind from the shapes as given: (C, C) is not ambiguous
            weights_kind = check.check_weights(weights, student, weights_kind, False)
        student, teacher, labels, weights = _as_rows(student, teacher, labels, weights)
    use_triton = check.use_triton_for(options.backend, student.device)
    host_values = _host_checks(options, use_triton, student.device)
    if labels is not None:
        check.check_labels(labels, *student.shape, student.device, host_values,
                           options.ignore_index)
    kind = None
    if weights is not None:
        if class_prior is not None:
            raise ValueError("give either weights or class_prior, not both")
        kind = _checked_weights_kind(weights, teacher, student, weights_kind, options,
                                     host_values, use_triton)
    elif weights_kind is not None:
        raise ValueError(f"weights_kind={weights_kind!r} needs weights")
    elif class_prior is not None:
        if labels is None:
            raise ValueError("class_prior needs labels (B,) to pick each row's prior")
        kept = labels != options.ignore_index if host_values else None
        check.check_prior(class_prior, torch.where(kept, labels, 0) if host_values else labels,
                          student.shape[1], student.device, host_values, keep=kept)
    if student.shape[0] == 0:
        if options.sync_normalizer:
            raise ValueError("sync_normalizer needs at least one row on every process, got an "
                             "empty batch")
        rows = _zero_rows(student, teacher)
        return rows.reshape(lead) if options.reduction == "none" else rows.sum()
    if kind in ("shared", "per_row"):
        source, factor = SOURCE_PAIRS, weights.detach()
    elif weights is not None:
        source, factor = SOURCE_EXPLICIT, weights.detach()
    elif class_prior is not None:
        source, factor = SOURCE_PRIOR, class_prior.detach()
    else:
        source, factor = SOURCE_TEACHER, None
    config = options.row_config(source, labels is not None, use_triton,
                                per_row=kind == "per_row")
    if options.reduction != "mean":
        rows = RowLoss.apply(student, teacher, factor, labels, config, PER_ROW)
        return rows.reshape(lead) if options.reduction == "none" else rows.sum()
    reduce = SyncedMean(options.process_group) if options.sync_normalizer else MEAN
    return RowLoss.apply(student, teacher, factor, labels, config, reduce)


def jsd_loss(student: Tensor, teacher: Union[Tensor, SparseTeacher], *, beta: float = 0.5,
             temperature: float = 1.0, labels: Optional[Tensor] = None,
             ignore_index: int = -100, reduction: Reduction = "mean", backend: Backend = "auto",
             check_values: bool = True) -> Tensor:
    """The generalized Jensen-Shannon divergence of TRL's and Liger-Kernel's distillation losses,
    per row ``beta KL(P || M) + (1 - beta) KL(Q || M)`` with ``M = beta P + (1 - beta) Q``,
    ``P = softmax(teacher / T)``, ``Q = softmax(student / T)``; at ``beta = 0`` forward KL
    ``KL(P || Q)``, at ``beta = 1`` reverse KL ``KL(Q || P)`` (``docs/MATH.md``). The teacher is
    a constant (no gradient).

    Args:
        student, teacher: logits ``(..., C)`` of one shape, dtypes as in ``gkl_loss``.
            ``teacher`` may be a ``SparseTeacher``: ``rest="renormalize"`` gives the JSD against
            the renormalised cache exactly, ``"rest"`` that of the distributions grouped into the
            cached classes and one class for the rest; ``"drop"`` is refused
            (``sparse_teacher``).
        beta: the teacher's share of the mixture ``M``, in ``[0, 1]``.
        temperature: ``T``, dividing both models' logits (no ``T^2`` factor).
        labels: ``(...)`` class indices; rows equal to ``ignore_index`` are left out.
        ignore_index: the label of the rows left out (0 loss, 0 gradient, not counted).
        reduction: ``"mean"`` the mean over the kept rows (``F.kl_div``'s ``"batchmean"``, TRL's
            ``generalized_jsd_loss``), ``"sum"`` the rows' sum, ``"none"`` the rows ``(...)``
            (0 for ignored rows).
        backend, check_values: as in ``gkl_loss``.

    Returns:
        float32 (float64 for float64 logits): 0-dim for ``"mean"`` and ``"sum"``, ``(...)`` for
        ``"none"``.
    """
    options = GKLOptions.of(locals())
    if isinstance(teacher, SparseTeacher):
        return _sparse_teacher_loss(student, teacher, options, labels, None, None, None, jsd=True)
    check.check_logits(student, teacher, any_rows=True)
    lead = student.shape[:-1]
    student, teacher, labels, _ = _as_rows(student, teacher, labels, None)
    use_triton = check.use_triton_for(options.backend, student.device)
    if labels is not None:
        check.check_labels(labels, *student.shape, student.device,
                           _host_checks(options, use_triton, student.device), ignore_index)
    config = options.jsd_config(labels is not None, use_triton)
    if student.shape[0] == 0:
        rows = _zero_rows(student, teacher)
    elif reduction == "mean":
        return RowLoss.apply(student, teacher, None, labels, config, MEAN)
    else:
        rows = RowLoss.apply(student, teacher, None, labels, config, PER_ROW)
    return rows.reshape(lead) if reduction == "none" else rows.sum()


def _zero_rows(student, teacher):
    """The losses ``(0,)`` of an empty batch, with (empty) gradients to both logits."""
    return (student.sum(1) + teacher.sum(1)).float() * 0.0


def _host_checks(options, use_triton, device):
    """Whether the entry checks label and weight values on the host: unless the finishing
    kernel's device assertion does (compiled Triton, ``reduction="mean"``; per-row losses do not
    finish)."""
    return options.check_values and not (kernels_check_values(use_triton, device)
                                         and options.reduction == "mean")


def _sparse_teacher_loss(student, teacher, options, labels, class_prior, weights, weights_kind,
                         jsd=False):
    """``gkl_loss`` (``jsd``: ``jsd_loss``) on a ``SparseTeacher``: every input checked here,
    once, then taken as rows ``(B, C)`` and the teacher's ``CompactRows``, and the loss is
    ``sparse_teacher_loss``'s."""
    check.check_logits(student, student, any_rows=True)
    if weights is not None and (weights_kind not in (None, "factor")
                                or weights.shape != student.shape):
        raise ValueError(f"a SparseTeacher takes rank-one weights (..., C) = "
                         f"{tuple(student.shape)} or class_prior, got weights of shape "
                         f"{tuple(weights.shape)}" + (f" (weights_kind={weights_kind!r})"
                                                      if weights_kind else ""))
    lead = student.shape[:-1]
    student_rows, _, labels, weights = _as_rows(student, student, labels, weights)
    num_classes = student.shape[-1]
    if labels is not None:
        check.check_labels(labels, student_rows.shape[0], num_classes, student.device,
                           options.check_values, options.ignore_index)
    if class_prior is not None:
        if labels is None:
            raise ValueError("class_prior needs labels (...) to pick each row's prior")
        check.check_tensor("class_prior", class_prior, (num_classes,) * 2, check.LOGIT_DTYPES,
                           student.device)
    ignored = None if labels is None else (labels == options.ignore_index).reshape(lead)
    teacher = readable_indices(teacher, ignored)
    check_sparse_teacher(teacher, student, options.check_values, ignored, jsd)
    if teacher.rest == "drop" and options.sync_normalizer:
        raise ValueError("sync_normalizer does not combine with rest='drop' (its cross-entropy "
                         "is averaged here, per process)")
    top = teacher.indices.shape[-1]
    teacher = replace(teacher, indices=teacher.indices.reshape(-1, top),
                      values=teacher.values.reshape(-1, top))
    factor = optional_factor(weights, class_prior, labels, options)
    rows = compact_rows(teacher, num_classes, factor,
                        None if ignored is None else ignored.reshape(-1), options.ignore_index)
    if rows.factor is not None:  # the weights the loss reads: at the cached classes
        check.check_nonnegative_finite("weights" if weights is not None else "class_prior",
                                       rows.factor, options.check_values)
    if student_rows.shape[0] == 0:
        if options.sync_normalizer:
            raise ValueError("sync_normalizer needs at least one row on every process, got an "
                             "empty batch")
        zeros = student.sum(-1).float() * 0.0  # zeros, gradients of zeros
        return zeros if options.reduction == "none" else zeros.sum()
    loss = sparse_teacher_loss(student_rows, rows, options,
                               check.use_triton_for(options.backend, student.device), jsd=jsd)
    return loss.reshape(lead) if options.reduction == "none" else loss


def _as_rows(student, teacher, labels, weights):
    """Logits ``(..., C)`` as ``(B, C)`` rows, and ``labels`` ``(...)`` and row-wise ``weights``
    (``(..., C)``, ``(..., C, C)``) with them; ``(C, C)`` weights as given."""
    lead, num_classes = student.shape[:-1], student.shape[-1]
    if isinstance(labels, Tensor):
        if labels.shape != lead:
            raise ValueError(f"labels must have the logits' leading shape {tuple(lead)}, got "
                             f"{tuple(labels.shape)}")
        labels = labels.reshape(-1)
    if isinstance(weights, Tensor):
        if weights.shape == student.shape:
            weights = weights.reshape(-1, num_classes)
        elif weights.shape == (*student.shape, num_classes):
            weights = weights.reshape(-1, num_classes, num_classes)
        elif weights.shape != (num_classes, num_classes):
            raise ValueError(f"weights must have shape (..., C) = {tuple(student.shape)}, (C, C) "
                             f"= {(num_classes, num_classes)} or (..., C, C) = "
                             f"{(*student.shape, num_classes)}, got {tuple(weights.shape)}")
    return (student.reshape(-1, num_classes), teacher.reshape(-1, num_classes), labels,
            weights)


def kernels_check_values(use_triton, device):
    """Whether the kernels check label and weight values (a device assertion of the compiled
    finishing kernel, no host synchronisation) instead of the host: compiled Triton on CUDA.
    Elsewhere reading the values is free (CPU tensors, where the interpreter runs no device
    assertion) or the torch path's own device-side assertions check them."""
    return use_triton and device.type == "cuda"


def _checked_weights_kind(weights, teacher, student, weights_kind, options, check_values,
                          use_triton):
    """The weights' kind, their values checked when ``check_values`` (``gkl_loss``: not where its
    kernels check the weights they read themselves, compiled Triton on CUDA); for shared weights
    under Triton the tile width and the dot precision for the logits' dtype."""
    kind = check.check_weights(weights, student, weights_kind, False)
    check.check_nonnegative_finite("weights", weights, check_values)
    if kind == "shared":
        check.check_dot_block(options.block_c)
        if use_triton:
            check.check_dot_dtype(options.dot_precision, compute_dtype(student, teacher))
    return kind


def pairwise_wmse(student: Tensor, teacher: Tensor, weights: Tensor, *,
                  weights_kind: Optional[WeightsKind] = None, reduction: Reduction = "sum",
                  backend: Backend = "auto", check_values: bool = True,
                  block_c: Optional[int] = None, dot_precision: DotPrecision = "ieee") -> Tensor:
    """The weighted MSE of the logit differences, per row:
    ``wmse_b = sum_{j,k} w[b,j,k] ((t_j - t_k) - (s_j - s_k))^2``; gradients go to student and
    teacher.

    Args:
        student, teacher: ``(B, C)`` logits.
        weights: pair weights, constants: a ``(B, C)`` rank-one factor ``v`` (``w = v_j v_k``), a
            ``(C, C)`` matrix shared by every row, or a ``(B, C, C)`` tensor; the shape decides.
        weights_kind: ``"factor"``, ``"shared"`` or ``"per_row"``; settles ``B == C``.
        reduction: ``"none"`` the rows ``(B,)``, ``"sum"`` their sum, ``"mean"`` their mean.
        backend, check_values, block_c, dot_precision: as in ``gkl_loss``.

    Returns:
        float32 (float64 for float64 logits): ``(B,)`` for ``"none"``, else 0-dim.
    """
    options = GKLOptions.of(locals())
    check.check_logits(student, teacher)
    use_triton = check.use_triton_for(backend, student.device)
    kind = _checked_weights_kind(weights, teacher, student, weights_kind, options, check_values,
                                 use_triton)
    if kind == "factor":
        config = options.row_config(SOURCE_EXPLICIT, False, use_triton, mse_weight=4.0,
                                    ce_weight=0.0, normalize_batch=True)
        wmse = RowLoss.apply(student, teacher, weights.detach(), None, config, PER_ROW)
    else:
        wmse = pair_rows(student, teacher, weights.detach(), kind == "per_row", True, use_triton,
                         block_c or 0, dot_precision)[0]
    if reduction == "sum":
        return wmse.sum()
    if reduction == "mean":
        return wmse.mean()
    return wmse
