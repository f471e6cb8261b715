"""Public functional API: ``gkl_loss`` and ``pairwise_wmse``.

``L = mse_weight * sum_b wmse_b / (4 N) + ce_weight * mean_b CE_b`` (SPEC.md), with the rank-one
pair weights ``v_j v_k`` computed inside the kernels and never a ``B x C x C`` tensor.
"""

import torch

from gkl_kernels import validation as check
from gkl_kernels.options import GKLOptions
from gkl_kernels.rank1.kernels import SOURCE_EXPLICIT, SOURCE_PRIOR, SOURCE_TEACHER
from gkl_kernels.rank1.op import rank1_rows

REDUCTIONS = ("none", "sum", "mean")


def gkl_loss(student, teacher, *, labels=None, class_prior=None, weights=None, gamma=1.0,
             temperature=1.0, weight_temperature=1.0, mse_weight=1.0, ce_weight=1.0,
             normalize="weights", symmetric=True, backend="auto", check_values=True,
             block_c=None):
    """The GKL loss (``symmetric=True``) or DKL (``symmetric=False``: only the teacher gets the
    wMSE gradient), a 0-dim float32 tensor.

    student, teacher: ``(B, C)`` logits, float32/float16/bfloat16 (the dtypes may differ).
    Pair weights ``v_j v_k`` from, in this order: ``weights`` ``(B, C)`` as given; else
    ``class_prior[labels] ** gamma`` (``class_prior`` ``(C, C)``, ``labels`` ``(B,)`` int);
    else ``softmax(teacher / weight_temperature) ** gamma``. The weights are constants.
    temperature: ``T`` of the cross-entropy ``-sum_j softmax(t/T)_j log_softmax(s/T)_j``.
    normalize: ``"weights"`` divides the wMSE by ``N = sum_{b,j,k} w`` (GKL; a batch whose weights
    sum to 0 gives a wMSE term of 0), ``"batch"`` by ``B`` (IKL).
    backend: ``"auto"`` (Triton for CUDA tensors and for CPU tensors under ``TRITON_INTERPRET=1``,
    else ``"torch"``), ``"triton"`` or ``"torch"``.
    check_values: check label range and weight values (a host synchronisation on CUDA); skipped
    while ``torch.compile`` traces. block_c: force the kernels' tile width (a power of two).
    """
    options = GKLOptions(gamma=gamma, temperature=temperature,
                         weight_temperature=weight_temperature, mse_weight=mse_weight,
                         ce_weight=ce_weight, normalize=normalize, symmetric=symmetric,
                         backend=backend, check_values=check_values, block_c=block_c)
    return gkl_loss_with_options(student, teacher, options, labels=labels,
                                 class_prior=class_prior, weights=weights)


def gkl_loss_with_options(student, teacher, options, *, labels=None, class_prior=None,
                          weights=None):
    """``gkl_loss`` with its scalar options given as a checked ``GKLOptions``."""
    check.check_logits(student, teacher)
    use_triton = check.use_triton_for(options.backend, student.device)
    if labels is not None:
        check.check_labels(labels, student, options.check_values)
    if weights is not None:
        if class_prior is not None:
            raise ValueError("give either weights or class_prior, not both")
        check.check_factor("weights", weights, student, options.check_values)
        source, factor = SOURCE_EXPLICIT, weights.detach()
    elif class_prior is not None:
        if labels is None:
            raise ValueError("class_prior needs labels (B,) to pick each row's prior")
        check.check_prior(class_prior, labels, student, options.check_values)
        source, factor = SOURCE_PRIOR, class_prior.detach()
    else:
        source, factor = SOURCE_TEACHER, None
    with_ce = options.ce_weight != 0
    wmse, ce, stats = rank1_rows(
        student, teacher, factor, labels if source == SOURCE_PRIOR else None, source,
        float(options.gamma), float(options.temperature), float(options.weight_temperature),
        with_ce, options.symmetric, use_triton, options.block_c or 0)
    if options.normalize == "weights":
        total = stats[:, 0].detach().square().sum()
        empty = total == 0
        mse_term = torch.where(empty, 0.0, wmse.sum() / torch.where(empty, 1.0, total))
    else:
        mse_term = wmse.sum() / student.shape[0]
    loss = (options.mse_weight / 4) * mse_term
    if with_ce:
        loss = loss + options.ce_weight * ce.mean()
    return loss


def pairwise_wmse(student, teacher, weights, *, reduction="sum", backend="auto",
                  check_values=True, block_c=None):
    """``sum_{j,k} v_j v_k ((t_j - t_k) - (s_j - s_k))^2`` per row, float32.

    student, teacher: ``(B, C)`` logits; weights: the ``(B, C)`` rank-one factor ``v`` (a
    constant). reduction: ``"none"`` gives ``(B,)``, ``"sum"`` and ``"mean"`` (over rows) a 0-dim
    tensor. Gradients go to student and teacher.
    """
    check.check_logits(student, teacher)
    use_triton = check.use_triton_for(backend, student.device)
    check.check_choice("reduction", reduction, REDUCTIONS)
    check.check_bool("check_values", check_values)
    check.check_block(block_c)
    check.check_factor("weights", weights, student, check_values)
    wmse, _, _ = rank1_rows(student, teacher, weights.detach(), None, SOURCE_EXPLICIT, 1.0, 1.0,
                            1.0, False, True, use_triton, block_c or 0)
    if reduction == "sum":
        return wmse.sum()
    if reduction == "mean":
        return wmse.mean()
    return wmse
