"""The GKL / DKL loss and the generalized JSD of logits whose vocabulary (columns) is sharded
across the processes of a ``torch.distributed`` group (tensor parallelism), from the row
kernel's mergeable statistics.

Every process holds the same ``N`` rows of its own ``V_p`` columns of the ``(N, V)`` student and
teacher logits; no logit leaves its process. Each process runs the rank-one row op over its shard
(Triton or torch like ``gkl_loss``), the ``(N, 16)`` statistics of every shard are gathered and
merged with the rule the kernels apply between tiles (``distributed.merged_row_stats``), and the
loss is finished from the merged statistics on every process; backward runs the loss's backward
op on each shard with the merged statistics (``rows.ShardMerged``).
"""

from typing import Any, Optional

import torch
from torch import Tensor

from gkl_kernels import validation as check
from gkl_kernels.core.config import SOURCE_EXPLICIT, SOURCE_PRIOR, SOURCE_TEACHER
from gkl_kernels.distributed import all_reduced, world_size
from gkl_kernels.options import GKLOptions
from gkl_kernels.rows import RowLoss, ShardMerged
from gkl_kernels.validation import Backend, Normalize

UNBOUNDED_LABELS = 2**62  # the kernel's label bound here: labels index V, not the shard's V_p


def vocab_parallel_gkl_loss(student_shard: Tensor, teacher_shard: Tensor, *,
                            labels: Optional[Tensor] = None,
                            class_prior_shard: Optional[Tensor] = None,
                            weights: Optional[Tensor] = None, ignore_index: int = -100,
                            gamma: float = 1.0, temperature: float = 1.0,
                            weight_temperature: float = 1.0, mse_weight: float = 1.0,
                            ce_weight: float = 1.0, normalize: Normalize = "weights",
                            symmetric: bool = True, process_group: Optional[Any] = None,
                            check_values: bool = True, backend: Backend = "auto") -> Tensor:
    """The GKL loss (``symmetric=True``) or DKL (``symmetric=False``: only the teacher gets the
    wMSE gradient) of logits whose vocabulary is sharded over ``process_group``: exactly
    ``gkl_loss`` of the concatenated vocabulary and the kept rows,
    ``L = mse_weight * sum_b wmse_b / (4 N) + ce_weight * sum_b CE_b / R`` with
    ``wmse_b = 2 W_b sum_j v_bj (d_bj - mu_b)^2`` (``d = t - s``), ``CE_b = -sum_j softmax(t_b/T)_j
    log_softmax(s_b/T)_j``, ``R`` kept rows, ``N = sum_b W_b^2`` (``normalize="weights"``) or ``R``
    (``"batch"``); a wMSE or CE term with nothing to average is 0.

    Every process must pass the same options. Communication: one all-gather of the ``(N, 16)``
    float32 row statistics of every shard (mergeable softmax normalisers and weighted moments,
    ``core.config``); backward communicates nothing and recomputes the gradient from the inputs
    and the merged statistics (no ``(N, V_p)`` float32 tensor is kept between the passes).

    Args:
        student_shard, teacher_shard: this process's ``(N, V_p)`` columns of the logits, float32,
            float16 or bfloat16 (dtypes may differ; arithmetic in float32, gradients in the input
            dtypes). Every process has the same ``N`` rows; ``V = sum V_p``, shards may be
            uneven. Each process gets the gradient of its own shards (the teacher's when it
            requires grad).
        labels: ``(N,)`` int64 / int32, the same on every process, each in ``[0, V)`` or
            ``ignore_index``. Needed by the class prior, optional otherwise.
        class_prior_shard: this process's ``(V, V_p)`` columns of the ``(V, V)`` class prior,
            ``v = prior[labels] ** gamma`` (``0 ** 0 = 1``). Pair weights ``v_j v_k`` are
            constants, taken from ``weights``, else ``class_prior_shard``, else the teacher
            (``v = softmax(t / T2) ** gamma`` over the whole vocabulary).
        weights: this process's ``(N, V_p)`` columns of a non-negative rank-one factor, as given.
        ignore_index: rows with this label add nothing to the loss, ``N``, ``R`` or the gradient
            (all ignored: loss 0, zero gradients).
        gamma, temperature, weight_temperature, mse_weight, ce_weight, normalize, symmetric: as
            in ``gkl_loss``.
        process_group: the group that shares the vocabulary (None: the default group); without
            an initialised process group the shards are the whole vocabulary.
        check_values: check label range and weight values before anything runs (a host
            synchronisation on CUDA); with ``labels`` and no class prior, ``V`` comes from one
            extra all-reduce of the shard widths (one int64).
        backend: as in ``gkl_loss`` (the row op of each shard).

    Returns:
        The loss, float32, 0-dim, the same on every process.
    """
    options = GKLOptions.of(locals())
    check.check_logits(student_shard, teacher_shard)
    _check_weight_source(student_shard, labels, class_prior_shard, weights, options)
    if labels is not None:
        _check_labels(labels, student_shard, class_prior_shard, ignore_index, options)
    if class_prior_shard is not None:
        _check_prior_rows(class_prior_shard, labels, ignore_index, options.check_values)
    factor, source = weights, SOURCE_EXPLICIT
    if class_prior_shard is not None:
        factor, source = class_prior_shard, SOURCE_PRIOR
    elif weights is None:
        source = SOURCE_TEACHER
    # labels index the whole vocabulary (checked above): the kernel does not bound them by V_p
    config = options.row_config(source, labels is not None,
                                check.use_triton_for(backend, student_shard.device),
                                num_labels=UNBOUNDED_LABELS)
    return RowLoss.apply(student_shard, teacher_shard, None if factor is None else factor.detach(),
                         labels, config, ShardMerged(process_group))


def vocab_parallel_jsd_loss(student_shard: Tensor, teacher_shard: Tensor, *, beta: float = 0.5,
                            temperature: float = 1.0, labels: Optional[Tensor] = None,
                            ignore_index: int = -100, process_group: Optional[Any] = None,
                            check_values: bool = True, backend: Backend = "auto") -> Tensor:
    """The generalized JSD (``jsd_loss``, the mean over the kept rows) of logits whose vocabulary
    is sharded over ``process_group``: exactly ``jsd_loss`` of the concatenated vocabulary.

    A row's KL sums need its normalisers over the whole vocabulary, so the shards communicate in
    two rounds: one all-gather of the ``(N, 16)`` row statistics of every shard (its maxima and
    normaliser rests, merged as in ``vocab_parallel_gkl_loss``), then one of the ``(N, 3)`` KL
    sums each shard forms from the merged normalisers (added in process order). Backward
    communicates nothing: each shard's gradient comes from its logits and the merged statistics.

    Args:
        student_shard, teacher_shard: this process's ``(N, V_p)`` columns of the logits, as in
            ``vocab_parallel_gkl_loss``; the teacher is a constant.
        beta, temperature: as in ``jsd_loss``.
        labels: ``(N,)``, the same on every process, each in ``[0, V)`` or ``ignore_index``
            (rows left out).
        ignore_index, process_group, check_values, backend: as in ``vocab_parallel_gkl_loss``.

    Returns:
        The loss, float32, 0-dim, the same on every process.
    """
    options = GKLOptions.of(locals())
    check.check_logits(student_shard, teacher_shard)
    if labels is not None:
        _check_labels(labels, student_shard, None, ignore_index, options)
    config = options.jsd_config(labels is not None,
                                check.use_triton_for(backend, student_shard.device),
                                num_labels=UNBOUNDED_LABELS)
    return RowLoss.apply(student_shard, teacher_shard, None, labels, config,
                         ShardMerged(process_group))


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
    alone = world_size(group) == 1
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
    return int(all_reduced(width, "sum", group))


def _check_prior_rows(prior, labels, ignore_index, check_values):
    """The prior rows of the kept rows' labels: finite and >= 0 (the others never count)."""
    if check.values_checked(check_values):
        keep = labels != ignore_index
        check.check_label_rows("class_prior_shard", prior, torch.where(keep, labels, 0),
                               check_values, keep=keep)
