"""``GKLOptions``: the loss's scalar options, each declared once here with its type, default and
check; the public signatures take them as keyword arguments of the same names, types and defaults
(a test holds them to this list), and ``row_config`` derives the row ops' ``RowConfig`` from
them."""

from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Optional

from gkl_kernels import validation as check
from gkl_kernels.core.config import SOURCE_JSD, RowConfig
from gkl_kernels.validation import Backend, DotPrecision, Normalize, Reduction


def _option(default, checker=None, *arguments, only=None):
    """A field whose value ``checker(name, value, *arguments)`` checks (and returns, converted,
    or None); ``only``: the one divergence (``"gkl"``, ``"jsd"``) it belongs to, None: both."""
    return field(default=default, metadata={"check": checker, "arguments": arguments,
                                            "only": only})


@dataclass(frozen=True)
class GKLOptions:
    """Options of ``gkl_loss`` (see there for their meaning) and ``beta`` of ``jsd_loss``; invalid
    values raise at construction, numbers are stored as Python floats."""

    gamma: float = _option(1.0, check.check_finite, 0.0, only="gkl")
    temperature: float = _option(1.0, check.check_positive)
    weight_temperature: float = _option(1.0, check.check_positive, only="gkl")
    mse_weight: float = _option(1.0, check.check_finite, only="gkl")
    ce_weight: float = _option(1.0, check.check_finite, only="gkl")
    normalize: Normalize = _option("weights", check.check_choice, check.NORMALIZERS)
    symmetric: bool = _option(True, check.check_bool, only="gkl")
    reduction: Reduction = _option("mean", check.check_choice, check.REDUCTIONS)
    backend: Backend = _option("auto", check.check_choice, check.BACKENDS)
    check_values: bool = _option(True, check.check_bool)
    block_c: Optional[int] = _option(None, check.check_block)
    dot_precision: DotPrecision = _option("ieee", check.check_choice, check.DOT_PRECISIONS)
    sync_normalizer: bool = _option(False, check.check_bool)
    process_group: Optional[Any] = _option(None)
    ignore_index: int = _option(-100, check.check_index)
    beta: float = _option(0.5, check.check_fraction, only="jsd")

    def __post_init__(self):
        for name, checker, arguments in _CHECKS:
            value = checker(name, getattr(self, name), *arguments)
            if value is not None:
                object.__setattr__(self, name, value)
        if self.sync_normalizer and self.reduction != "mean":
            raise ValueError(f"sync_normalizer needs reduction='mean', got {self.reduction!r}")

    @classmethod
    def of(cls, arguments):
        """The options among ``arguments`` (a function's ``locals()``), checked; the checked
        value of values seen before (of the same types) is reused."""
        given = {name: arguments[name] for name in OPTION_NAMES if name in arguments}
        values = tuple(given.values())
        key = (*given, *values, *map(type, values))
        try:
            return _CHECKED[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable value: the checks say what is wrong with it
            return cls(**given)
        if len(_CHECKED) >= CHECKED_LIMIT:
            _CHECKED.clear()
        options = _CHECKED[key] = cls(**given)
        return options

    def row_config(self, source, has_labels, use_triton, **changes):
        """The ``RowConfig`` of these options for one weight source (``changes`` override
        fields)."""
        return _row_config(self, source, has_labels, use_triton, tuple(changes.items()))

    def jsd_config(self, has_labels, use_triton, **changes):
        """The ``RowConfig`` of the generalized JSD under these options (``beta``,
        ``temperature``, ``ignore_index``, ...): its rows' divergence as the loss's only term
        (``changes`` override fields)."""
        return self.row_config(SOURCE_JSD, has_labels, use_triton, mse_weight=0.0,
                               ce_weight=1.0, **changes)


@lru_cache(maxsize=256)
def _row_config(options, source, has_labels, use_triton, changes):
    """``GKLOptions.row_config``, one ``RowConfig`` per distinct call (``changes``: pairs)."""
    config = dict(source=source, gamma=options.gamma, temperature=options.temperature,
                  weight_temperature=options.weight_temperature, mse_weight=options.mse_weight,
                  ce_weight=options.ce_weight, normalize_batch=options.normalize == "batch",
                  symmetric=options.symmetric, has_labels=has_labels,
                  ignore_index=options.ignore_index, use_triton=use_triton,
                  block_c=options.block_c or 0,
                  dot_precision=check.DOT_PRECISIONS.index(options.dot_precision),
                  beta=options.beta)
    config.update(changes)
    return RowConfig(**config)


OPTION_NAMES = tuple(option.name for option in fields(GKLOptions))
GKL_ONLY_OPTIONS = tuple(option.name for option in fields(GKLOptions)
                         if option.metadata["only"] == "gkl")
CHECKED_LIMIT = 1024  # checked option values kept for reuse (``GKLOptions.of``)
_CHECKED = {}
_CHECKS = tuple((option.name, option.metadata["check"], option.metadata["arguments"])
                for option in fields(GKLOptions) if option.metadata["check"] is not None)
