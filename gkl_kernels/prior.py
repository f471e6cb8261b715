"""``ClassPrior``: the class-wise prior ``P`` of GKL ("global information", docs/SPEC.md).

Row ``c`` of the ``(C, C)`` matrix ``P`` is the mean of ``softmax(t / T2)`` over the samples of
class ``c`` seen in the previous epoch; before the first epoch every entry is ``1 / C``. Pass
``class_prior=prior.matrix()`` and the batch's ``labels`` to ``gkl_loss``.
"""

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from gkl_kernels import validation as check
from gkl_kernels.distributed import all_reduced

STATE_TENSORS = ("prior", "sums", "counts")  # state_dict keys of the (C, C), (C, C), (C,) tensors


class ClassPrior:
    """The class prior ``P`` (float32 ``(C, C)``), kept up to date over training.

    Each ``update(teacher_logits, labels)`` adds ``softmax(teacher_logits / T2)`` to row
    ``labels[b]`` of a float32 ``(C, C)`` sum and counts the samples of each class (int64
    ``(C,)``). ``end_epoch()`` sets every row seen in the epoch to its mean,
    ``P[c] = sum_{b: y_b = c} softmax(t_b / T2) / count[c]`` (divided by the exact count, so a row
    sums to 1 up to float32 rounding), or with ``momentum=m`` to ``m * P[c] + (1 - m) * mean``;
    rows not seen keep their value. Under an initialised ``torch.distributed`` process group the
    sums and counts of every process in ``process_group`` (None: the default group) are added
    first, so all processes end the epoch with the same ``P`` (create the prior on a device that
    the group's backend takes: CUDA for NCCL).

    ``P`` is updated in place: ``matrix()`` returns the same tensor every epoch (do not modify it;
    clone it to keep an epoch's value).

    Args:
        num_classes: ``C``, an int >= 1.
        weight_temperature: ``T2`` of ``softmax(t / T2)``, > 0.
        momentum: None (a row becomes the epoch's mean) or ``m`` in ``[0, 1)``.
        device: where ``P``, the sums and the counts live (None: the default device).
        process_group: the ``torch.distributed`` group whose sums are added at ``end_epoch``
            (None: the default group).
    """

    def __init__(self, num_classes: int, weight_temperature: float = 1.0,
                 momentum: Optional[float] = None,
                 device: Optional[Union[str, int, torch.device]] = None,
                 process_group: Optional[Any] = None) -> None:
        _check_num_classes(num_classes)
        _check_settings(weight_temperature, momentum)
        device = _checked_device(device)
        self.num_classes = num_classes
        self.weight_temperature = weight_temperature
        self.momentum = momentum
        self.process_group = process_group
        self.epochs = 0
        shape = (num_classes, num_classes)
        self._prior = torch.full(shape, 1.0 / num_classes, dtype=torch.float32, device=device)
        self._sums = torch.zeros(shape, dtype=torch.float32, device=device)
        self._counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(self, teacher_logits: Tensor, labels: Tensor) -> None:
        """Add one batch: ``softmax(teacher_logits / T2)`` to rows ``labels`` of the sums, and the
        class counts. An empty batch (B = 0) is a no-op. No gradient flows.

        The values are checked without a host synchronisation (``validation.assert_values``): on
        CPU a bad value is a ``ValueError`` and the state is left alone; on CUDA it is a
        device-side assertion, which fails at the next synchronisation (the CUDA context is then
        unusable, the state with it).

        Args:
            teacher_logits: ``(B, C)`` float32 / float16 / bfloat16, finite, on the prior's
                device.
            labels: ``(B,)`` int64 / int32 in ``[0, C)``, on the prior's device.
        """
        self._check_logits(teacher_logits)
        empty = teacher_logits.shape[0] == 0
        check.check_labels(labels, *teacher_logits.shape, teacher_logits.device,
                           check_values=not empty)
        if empty:
            return
        if check.values_checked(True):
            check.assert_values(torch.isfinite(teacher_logits).all(),
                                "teacher_logits must be finite, found inf or NaN")
        with torch.no_grad():
            probs = torch.softmax(teacher_logits.float() / self.weight_temperature, dim=1)
            self._sums.index_add_(0, labels, probs)
            self._counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.int64))

    def end_epoch(self) -> Tensor:
        """Sum the epoch over processes, set the seen rows of ``P`` (see the class), reset the sums
        and counts, count the epoch.

        Returns:
            ``P``, float32 ``(C, C)``: the tensor ``matrix()`` returns.
        """
        all_reduced(self._sums, "sum", self.process_group)
        all_reduced(self._counts, "sum", self.process_group)
        seen = (self._counts > 0).unsqueeze(1)
        new = self._sums / self._counts.clamp_min(1).unsqueeze(1)
        if self.momentum is not None:
            new = self.momentum * self._prior + (1 - self.momentum) * new
        self._prior.copy_(torch.where(seen, new, self._prior))
        self._sums.zero_()
        self._counts.zero_()
        self.epochs += 1
        return self._prior

    def matrix(self, device: Optional[Union[str, int, torch.device]] = None) -> Tensor:
        """The class prior ``P``, to pass as ``gkl_loss(class_prior=...)``.

        Args:
            device: None, or the prior's device (checked). Another device is a ``ValueError``,
                not a copy (``P`` would be copied at every step): build the prior there.

        Returns:
            ``P``, float32 ``(C, C)``, on the prior's device (the same tensor every epoch).
        """
        if device is not None:
            wanted, held = _checked_device(device), self._prior.device
            if wanted.type != held.type or wanted.index not in (None, held.index):
                raise ValueError(f"matrix(device={wanted}): mismatched device, the prior is on "
                                 f"{held}; create ClassPrior(..., device={str(wanted)!r}) instead")
        return self._prior

    def state_dict(self) -> dict[str, Any]:
        """The state to checkpoint.

        Returns:
            Copies of ``P`` (``"prior"``), the epoch's ``"sums"`` and ``"counts"``, and
            ``"epochs"``, ``"num_classes"``, ``"weight_temperature"``, ``"momentum"``.
        """
        return {"num_classes": self.num_classes, "weight_temperature": self.weight_temperature,
                "momentum": self.momentum, "epochs": self.epochs, "prior": self._prior.clone(),
                "sums": self._sums.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s state (tensors copied to the prior's device), including its
        ``weight_temperature`` and ``momentum``. Checked in full before anything changes; a bad
        value is a ``ValueError`` on every device (read back: a synchronisation, once, at a
        resume).

        Args:
            state: a ``state_dict()``: ``num_classes`` must match; ``prior`` and ``sums``
                floating-point, finite and >= 0 (after the cast to float32), ``counts`` of an
                integer dtype and >= 0.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping (a state_dict()), got "
                            f"{type(state).__name__}")
        missing = [key for key in ("num_classes", "weight_temperature", "momentum", "epochs",
                                   *STATE_TENSORS) if key not in state]
        if missing:
            raise ValueError(f"state is missing the keys {missing}")
        if state["num_classes"] != self.num_classes:
            raise ValueError(f"state['num_classes'] = {state['num_classes']!r} does not match "
                             f"num_classes = {self.num_classes}")
        _check_settings(state["weight_temperature"], state["momentum"], key="state['{}']")
        epochs = state["epochs"]
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"state['epochs'] must be an int >= 0, got {epochs!r}")
        owns = (self._prior, self._sums, self._counts)
        values = [_checked_state_tensor(key, state[key], own)
                  for key, own in zip(STATE_TENSORS, owns)]
        for key, value in zip(STATE_TENSORS, values):
            _check_state_values(key, value)
        for own, value in zip(owns, values):
            own.copy_(value)
        self.weight_temperature = state["weight_temperature"]
        self.momentum = state["momentum"]
        self.epochs = epochs

    def _check_logits(self, logits):
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"teacher_logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dtype not in check.FLOAT_DTYPES:
            raise TypeError(f"teacher_logits must be float32, float16 or bfloat16, got "
                            f"{logits.dtype}")
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"teacher_logits must have shape (B, num_classes={self.num_classes}),"
                             f" got {tuple(logits.shape)}")
        if logits.device != self._prior.device:
            raise ValueError(f"teacher_logits must be on the prior's device "
                             f"{self._prior.device}, got {logits.device}")


def _checked_state_tensor(key, value, own):
    """``state[key]``: a tensor of ``own``'s shape, floating-point (``prior``, ``sums``) or of an
    integer dtype (``counts``), holding values (not on the meta device unless the prior is);
    returned on ``own``'s device in its dtype (a copy when either differs)."""
    if not isinstance(value, torch.Tensor) or value.shape != own.shape:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
        raise ValueError(f"state['{key}'] must be a tensor of shape {tuple(own.shape)}, "
                         f"got {shape}")
    if own.is_floating_point() and not value.is_floating_point():
        raise ValueError(f"state['{key}'] must be a floating-point tensor, got {value.dtype}")
    if not own.is_floating_point() and (value.is_floating_point() or value.is_complex()
                                        or value.dtype == torch.bool):
        raise ValueError(f"state['{key}'] must have an integer dtype, got {value.dtype}")
    if value.device.type == "meta" and own.device.type != "meta":
        raise ValueError(f"state['{key}'] is on the meta device: it holds no values")
    return value.to(device=own.device, dtype=own.dtype)


def _check_state_values(key, value):
    """``prior`` and ``sums`` finite and >= 0, ``counts`` >= 0: a ``ValueError`` on every
    device."""
    if value.numel() == 0:
        return
    name = f"state['{key}']"
    if value.is_floating_point():
        low, high = torch.aminmax(value)
        condition = (low >= 0) & (high < float("inf"))
        expected = f"{name} must be finite and >= 0"

        def host_message():
            if not bool(torch.isfinite(value).all()):
                return f"{expected}, found inf or NaN"
            return f"{expected}, found entries down to {float(low)}"
    else:
        low = value.min()
        condition = low >= 0
        expected = f"{name} must be >= 0"

        def host_message():
            return f"{expected}, found {int(low)}"
    check.assert_values(condition, f"{expected}, found a bad entry", host_message=host_message,
                        device_side=False)


def _check_num_classes(num_classes):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")


def _check_settings(weight_temperature, momentum, key="{}"):
    """``weight_temperature`` and ``momentum``, named ``key.format(name)`` (as the caller gave
    them: an argument, or an entry of ``state``)."""
    check.check_positive(key.format("weight_temperature"), weight_temperature)
    if momentum is not None:
        name = key.format("momentum")
        check.check_finite(name, momentum, minimum=0.0)
        if momentum >= 1:
            raise ValueError(f"{name} must be None or in [0, 1), got {momentum}")


def _checked_device(device):
    """``device`` (None, a str, an int or a ``torch.device``) as a ``torch.device``."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"device must be None, a str, an int or a torch.device, got "
                        f"{type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device must name a device, got {device!r}: {error}") from None
