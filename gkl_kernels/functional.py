"""Public functional API: ``gkl_loss`` and ``pairwise_wmse``.

``L = mse_weight * sum_b wmse_b / (4 N) + ce_weight * mean_b CE_b`` (SPEC.md), with the rank-one
pair weights ``v_j v_k`` computed inside the kernels and never a ``B x C x C`` tensor.
"""

import torch

from gkl_kernels import validation as check
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
    check.check_logits(student, teacher)
    use_triton = check.use_triton_for(backend, student.device)
    check.check_choice("normalize", normalize, check.NORMALIZERS)
    for name, value in (("temperature", temperature), ("weight_temperature", weight_temperature)):
        check.check_positive(name, value)
    check.check_finite("gamma", gamma, minimum=0.0)
    check.check_finite("mse_weight", mse_weight)
    check.check_finite("ce_weight", ce_weight)
    _check_block(block_c)
    if labels is not None:
        check.check_labels(labels, student, check_values)
    if weights is not None:
        if class_prior is not None:
            raise ValueError("give either weights or class_prior, not both")
        check.check_factor("weights", weights, student, check_values)
        source, factor = SOURCE_EXPLICIT, weights.detach()
    elif class_prior is not None:
        if labels is None:
            raise ValueError("class_prior needs labels (B,) to pick each row's prior")
        check.check_prior(class_prior, student, check_values)
        source, factor = SOURCE_PRIOR, class_prior.detach()
    else:
        source, factor = SOURCE_TEACHER, None
    with_ce = ce_weight != 0
    wmse, ce, stats = rank1_rows(
        student, teacher, factor, labels if source == SOURCE_PRIOR else None, source,
        float(gamma), float(temperature), float(weight_temperature), with_ce, bool(symmetric),
        use_triton, block_c or 0)
    batch = student.shape[0]
    if normalize == "weights":
        total = stats[:, 0].detach().square().sum()
        positive = total > 0
        mse_term = torch.where(positive, wmse.sum() / torch.where(positive, total, 1.0), 0.0)
    else:
        mse_term = wmse.sum() / batch
    loss = (mse_weight / 4) * mse_term
    if with_ce:
        loss = loss + ce_weight * ce.mean()
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
    check.check_factor("weights", weights, student, check_values)
    _check_block(block_c)
    wmse, _, _ = rank1_rows(student, teacher, weights.detach(), None, SOURCE_EXPLICIT, 1.0, 1.0,
                            1.0, False, True, use_triton, block_c or 0)
    if reduction == "sum":
        return wmse.sum()
    if reduction == "mean":
        return wmse.mean()
    return wmse


def _check_block(block_c):
    if block_c is not None and (not isinstance(block_c, int) or block_c < 1
                                or block_c & (block_c - 1)):
        raise ValueError(f"block_c must be None or a power of two >= 1, got {block_c!r}")
