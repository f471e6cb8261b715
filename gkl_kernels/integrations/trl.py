"""``GKLDistillationTrainer``: TRL's ``DistillationTrainer`` whose divergence is the package's
trainer loss (``FusedLinearDistillationLoss``: GKL by default, or the generalized JSD, with an
optional hard cross-entropy on the sampled completions).

Everything else is TRL's: on-policy generation, the completion and tool masks,
``num_items_in_batch`` counted over the accumulation window and its data-parallel correction,
the last hidden states of both models (through its FSDP / DeepSpeed redirection), each model's
``logit_scale`` (or ``output_multiplier``, ``lm_head_multiplier``, ``logits_scaling``) and
``final_logit_softcapping`` read from its config, logging. TRL's ``_compute_loss`` (private)
hands those to its module-level ``_chunked_divergence_loss``; this trainer runs TRL's
``_compute_loss`` with that function replaced, for the call, by the package's loss, and checks
at construction that both still have the signatures of the TRL versions it supports
(``SUPPORTED_TRL``).

Per completion token ``b`` (``completion_mask`` times ``tool_mask``), labels the sampled token:

    loss = (weight_soft_loss sum_b soft_b + weight_hard_loss sum_b CE_b) / num_items_in_batch

The entropy TRL logs is not computed (it would cost one more pass over every chunk's student
logits): its value is NaN, which TRL's logger leaves out (the metric reads None).
"""

import inspect
import math
import threading
from typing import Any, Optional

try:
    import trl
    from trl.trainer import distillation_trainer as trl_distillation
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("gkl_kernels.integrations.trl needs TRL: pip install "
                      "'gkl-kernels[trl]'") from error

from gkl_kernels.trainer import FusedLinearDistillationLoss, LogitTransform
from gkl_kernels.validation import check_positive

SUPPORTED_TRL = "1.16"  # the TRL versions whose private loss hook this trainer was written for
_DIVERGENCE_PARAMETERS = (
    "student_hidden_states", "teacher_hidden_states", "student_lm_head_weight",
    "teacher_lm_head_weight", "completion_mask", "beta", "num_items_in_batch",
    "student_lm_head_bias", "teacher_lm_head_bias", "student_logit_scale", "teacher_logit_scale",
    "student_final_logit_softcapping", "teacher_final_logit_softcapping", "temperature")
_COMPUTE_LOSS_PARAMETERS = ("self", "unwrapped_student", "inputs", "num_items_in_batch")
_REPLACING = threading.Lock()  # the module-level function is replaced for one call at a time


def check_trl_supported() -> None:
    """Raise ``RuntimeError`` naming ``SUPPORTED_TRL`` unless the installed TRL's
    ``DistillationTrainer._compute_loss`` and ``_chunked_divergence_loss`` have the signatures
    this trainer relies on."""
    divergence = getattr(trl_distillation, "_chunked_divergence_loss", None)
    compute_loss = getattr(getattr(trl, "DistillationTrainer", None), "_compute_loss", None)
    if divergence is None or compute_loss is None or \
            tuple(inspect.signature(divergence).parameters) != _DIVERGENCE_PARAMETERS or \
            tuple(inspect.signature(compute_loss).parameters) != _COMPUTE_LOSS_PARAMETERS:
        raise RuntimeError(
            f"GKLDistillationTrainer supports TRL {SUPPORTED_TRL}.x: the installed TRL "
            f"{getattr(trl, '__version__', '(unknown version)')} changed "
            f"DistillationTrainer._compute_loss or _chunked_divergence_loss, which it relies on")


class GKLDistillationTrainer(trl.DistillationTrainer):
    """``trl.DistillationTrainer`` with ``loss`` as its divergence.

    Args:
        *args, **kwargs: ``trl.DistillationTrainer``'s (model, teacher_model, args, datasets,
            processing_class, ...).
        loss: a ``FusedLinearDistillationLoss`` (or ``FusedLinearJSDLoss``) without logit
            transforms of its own (the trainer reads them from the models' configs) and with
            the config's ``temperature`` (TRL samples at it). None: GKL with the loss's default
            options, ``weight_hard_loss=0``, ``weight_soft_loss=1``, at ``args.temperature``.
            ``FusedLinearDistillationLoss(divergence="jsd", beta=args.beta, weight_hard_loss=0,
            weight_soft_loss=1)`` is TRL's own divergence.
    """

    def __init__(self, *args: Any, loss: Optional[FusedLinearDistillationLoss] = None,
                 **kwargs: Any) -> None:
        check_trl_supported()
        if loss is not None and not isinstance(loss, FusedLinearDistillationLoss):
            raise TypeError(f"loss must be a FusedLinearDistillationLoss, got "
                            f"{type(loss).__name__}")
        if loss is not None and (loss.student_transform, loss.teacher_transform) != (
                LogitTransform(), LogitTransform()):
            raise ValueError("loss must have no logit_scale or final_logit_softcapping of its "
                             "own: the trainer reads each model's from its config, as TRL does")
        super().__init__(*args, **kwargs)
        if loss is None:
            loss = FusedLinearDistillationLoss(weight_hard_loss=0.0, weight_soft_loss=1.0,
                                               temperature=self.temperature)
        if loss.options.temperature != self.temperature:
            raise ValueError(f"loss has temperature {loss.options.temperature}, the config "
                             f"{self.temperature}: TRL samples the completions at the config's, "
                             f"give the loss the same")
        self.distillation_loss = loss

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """TRL's ``_compute_loss`` with its divergence the package's loss; the hard
        cross-entropy's labels are the sampled completion tokens."""
        completion_ids = inputs["completion_ids"]

        def divergence(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                       teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                       student_lm_head_bias=None, teacher_lm_head_bias=None,
                       student_logit_scale=1.0, teacher_logit_scale=1.0,
                       student_final_logit_softcapping=None,
                       teacher_final_logit_softcapping=None, temperature=1.0):
            ignore_index = self.distillation_loss.options.ignore_index
            kept = completion_mask != 0
            labels = completion_ids.to(kept.device).masked_fill(~kept, ignore_index)
            loss = self.distillation_loss.with_logit_transforms(
                _transform("student", student_logit_scale, student_final_logit_softcapping),
                _transform("teacher", teacher_logit_scale, teacher_final_logit_softcapping))(
                student_hidden_states, student_lm_head_weight, teacher_hidden_states,
                teacher_lm_head_weight, labels, student_lm_head_bias, teacher_lm_head_bias,
                num_items_in_batch=num_items_in_batch)
            return loss, loss.new_full((), math.nan), kept.sum()

        with _REPLACING:
            stock = trl_distillation._chunked_divergence_loss
            trl_distillation._chunked_divergence_loss = divergence
            try:
                return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
            finally:
                trl_distillation._chunked_divergence_loss = stock


def _transform(model, scale, cap):
    """The ``LogitTransform`` of one model's values as TRL reads them (scale 1: none)."""
    scale = check_positive(f"{model} logit_scale", scale)
    cap = None if cap is None else check_positive(f"{model} final_logit_softcapping", cap)
    return LogitTransform(None if scale == 1.0 else scale, cap)
