"""``GKLLoss``: the ``nn.Module`` form of ``gkl_loss``, holding its options."""

from typing import Any, Optional, Union

from torch import Tensor, nn

from gkl_kernels.functional import gkl_loss_with_options
from gkl_kernels.options import GKLOptions
from gkl_kernels.sparse_teacher import SparseTeacher
from gkl_kernels.validation import Backend, DotPrecision, Normalize, Reduction, WeightsKind


class GKLLoss(nn.Module):
    """The GKL / DKL loss with its options fixed at construction (checked there).

    Args:
        gamma, temperature, weight_temperature, mse_weight, ce_weight, normalize, symmetric,
        reduction, backend, check_values, block_c, dot_precision, sync_normalizer,
        process_group, ignore_index: as in ``gkl_kernels.gkl_loss``.

    Example::

        criterion = GKLLoss(temperature=4.0, mse_weight=16.0, gamma=0.05)
        loss = criterion(student_logits, teacher_logits, labels=y, class_prior=prior.matrix())
    """

    def __init__(self, *, gamma: float = 1.0, temperature: float = 1.0,
                 weight_temperature: float = 1.0, mse_weight: float = 1.0,
                 ce_weight: float = 1.0, normalize: Normalize = "weights",
                 symmetric: bool = True, reduction: Reduction = "mean",
                 backend: Backend = "auto", check_values: bool = True,
                 block_c: Optional[int] = None, dot_precision: DotPrecision = "ieee",
                 sync_normalizer: bool = False, process_group: Optional[Any] = None,
                 ignore_index: int = -100) -> None:
        super().__init__()
        self.options = GKLOptions.of(locals())

    def forward(self, student: Tensor, teacher: Union[Tensor, SparseTeacher],
                labels: Optional[Tensor] = None,
                class_prior: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                weights_kind: Optional[WeightsKind] = None) -> Tensor:
        """The loss of ``student`` against ``teacher``.

        Args:
            student, teacher: logits ``(..., C)``; ``teacher`` may be a ``SparseTeacher``.
            labels: ``(...)`` class indices (the class prior's rows, ``ignore_index``).
            class_prior: ``(C, C)`` prior; weights: ``(..., C)``, ``(C, C)`` or ``(..., C, C)``
                pair weights; weights_kind: as in ``gkl_loss``.

        Returns:
            float32 (float64 for float64 logits), 0-dim (``reduction`` ``"mean"`` / ``"sum"``)
            or ``(...)`` (``"none"``).
        """
        return gkl_loss_with_options(student, teacher, self.options, labels=labels,
                                     class_prior=class_prior, weights=weights,
                                     weights_kind=weights_kind)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())
