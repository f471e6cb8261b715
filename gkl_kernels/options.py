"""``GKLOptions``: the scalar options of the loss, checked once when they are made."""

from dataclasses import dataclass
from typing import Any, Optional

from gkl_kernels import validation as check


@dataclass(frozen=True)
class GKLOptions:
    """Options of ``gkl_loss`` (see there for their meaning); invalid values raise at construction,
    numbers are stored as Python floats."""

    gamma: float = 1.0
    temperature: float = 1.0
    weight_temperature: float = 1.0
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    normalize: str = "weights"
    symmetric: bool = True
    reduction: str = "mean"
    backend: str = "auto"
    check_values: bool = True
    block_c: Optional[int] = None
    dot_precision: str = "ieee"
    sync_normalizer: bool = False
    process_group: Any = None
    ignore_index: int = -100

    def __post_init__(self):
        numbers = dict(temperature=check.check_positive("temperature", self.temperature),
                       weight_temperature=check.check_positive("weight_temperature",
                                                               self.weight_temperature),
                       gamma=check.check_finite("gamma", self.gamma, minimum=0.0),
                       mse_weight=check.check_finite("mse_weight", self.mse_weight),
                       ce_weight=check.check_finite("ce_weight", self.ce_weight))
        for name, value in numbers.items():
            object.__setattr__(self, name, value)
        check.check_choice("normalize", self.normalize, check.NORMALIZERS)
        check.check_choice("reduction", self.reduction, check.REDUCTIONS)
        check.check_choice("backend", self.backend, check.BACKENDS)
        check.check_bool("symmetric", self.symmetric)
        check.check_bool("check_values", self.check_values)
        check.check_block(self.block_c)
        check.check_choice("dot_precision", self.dot_precision, check.DOT_PRECISIONS)
        check.check_bool("sync_normalizer", self.sync_normalizer)
        check.check_index("ignore_index", self.ignore_index)
        if self.sync_normalizer and self.reduction != "mean":
            raise ValueError(f"sync_normalizer needs reduction='mean', got {self.reduction!r}")
