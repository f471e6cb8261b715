"""Input checks for the public API: every problem is a ``TypeError``/``ValueError`` that names the
argument, raised before any kernel runs.

Checks of tensor *values* (label range, negative or non-finite weights) read the data back to the
host, a synchronisation on CUDA; they run when ``check_values=True`` (the default) and never while
``torch.compile`` traces.
"""

import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
BACKENDS = ("auto", "triton", "torch")
NORMALIZERS = ("weights", "batch")
WEIGHT_KINDS = ("factor", "shared", "per_row")  # (B, C) rank-one factor, (C, C), (B, C, C)
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")  # tl.dot operands for shared (C, C) weights
MIN_DOT_BLOCK = 16  # tl.dot needs tiles of at least 16 when compiled


@torch.compiler.assume_constant_result
def triton_interpreter_active():
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads the environment variable
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)


def use_triton_for(backend, device):
    """Resolve ``backend`` for tensors on ``device``: True for the Triton kernels, False for torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    runnable = device.type == "cuda" or (device.type == "cpu" and triton_interpreter_active())
    if backend == "triton" and not runnable:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got tensors on {device}")
    return runnable


def check_logits(student, teacher):
    """``student`` and ``teacher``: 2-D float tensors of one shape ``(B, C)``, B, C > 0, one device."""
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B, C), got shape {tuple(x.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student and teacher must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] == 0 or student.shape[1] == 0:
        raise ValueError(f"student and teacher must have B > 0 rows and C > 0 classes, got shape "
                         f"{tuple(student.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"student and teacher must be on one device, got {student.device} and "
                         f"{teacher.device}")


def check_tensor(name, x, shape, dtypes, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like the logits, got {x.device}")


def values_checked(check_values):
    return check_values and not torch.compiler.is_compiling()


def check_nonnegative_finite(name, x, check_values):
    """Pair weights and prior rows: every entry finite and >= 0, read in one pass (``aminmax``
    propagates NaN, so ``min >= 0`` and ``max < inf`` fail for NaN too)."""
    if not values_checked(check_values):
        return
    low, high = torch.aminmax(x)
    if bool(low >= 0) and bool(high < float("inf")):
        return
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, found inf or NaN")
    raise ValueError(f"{name} must be non-negative, found entries down to {float(low)}")


def check_weights(weights, student, weights_kind, check_values, name="weights"):
    """Pair weights: ``(B, C)`` rank-one factor (``"factor"``), ``(C, C)`` shared matrix
    (``"shared"``) or ``(B, C, C)`` per-row tensor (``"per_row"``), float, on the logits' device,
    finite and >= 0. The shape decides the kind; ``weights_kind`` must name it when ``B == C``
    makes a 2-D shape ambiguous. Returns the kind."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weights).__name__}")
    batch, num_classes = student.shape
    shapes = {"factor": (batch, num_classes), "shared": (num_classes, num_classes),
              "per_row": (batch, num_classes, num_classes)}
    if weights_kind is None:
        kinds = [kind for kind, shape in shapes.items() if tuple(weights.shape) == shape]
        if len(kinds) > 1:
            raise ValueError(f"{name} of shape {tuple(weights.shape)} with B == C == {batch} "
                             f"is ambiguous: pass weights_kind='factor' (a (B, C) rank-one factor) "
                             f"or weights_kind='shared' (a (C, C) matrix shared by all rows)")
        if not kinds:
            raise ValueError(f"{name} must have shape (B, C) = {shapes['factor']}, (C, C) = "
                             f"{shapes['shared']} or (B, C, C) = {shapes['per_row']}, got "
                             f"{tuple(weights.shape)}")
        weights_kind = kinds[0]
    check_choice("weights_kind", weights_kind, WEIGHT_KINDS)
    check_tensor(name, weights, shapes[weights_kind], FLOAT_DTYPES, student.device)
    check_nonnegative_finite(name, weights, check_values)
    return weights_kind


def check_dot_block(block_c):
    """A forced tile width for the ``tl.dot`` kernels of shared weights: None or >= 16."""
    if block_c is not None and block_c < MIN_DOT_BLOCK:
        raise ValueError(f"block_c must be None or >= {MIN_DOT_BLOCK} for (C, C) weights "
                         f"(tl.dot tiles), got {block_c}")


def check_labels(labels, rows, num_classes, device, check_values, ignore_index=None):
    """Class labels: int64/int32 ``(rows,)`` on ``device``, each in ``[0, num_classes)`` or equal
    to ``ignore_index`` (when one is given)."""
    check_tensor("labels", labels, (rows,), INDEX_DTYPES, device)
    if not values_checked(check_values):
        return
    outside = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        outside &= labels != ignore_index
    if bool(outside.any()):
        bad = int(labels[outside][0])
        allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
        raise ValueError(f"labels must lie in [0, {num_classes}){allowed}, found {bad}")


def check_index(name, value):
    """An integer option such as ``ignore_index``: an int, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")


def check_prior(class_prior, labels, num_classes, device, check_values):
    """A class prior: float ``(C, C)`` on ``device``; the rows that ``labels`` (checked before, in
    ``[0, C)``) pick are finite and >= 0 (the other rows never reach the loss)."""
    check_tensor("class_prior", class_prior, (num_classes, num_classes), FLOAT_DTYPES, device)
    if values_checked(check_values):
        check_nonnegative_finite("class_prior", class_prior.index_select(0, labels), check_values)


def check_positive(name, value):
    """A temperature: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_finite(name, value, minimum=None):
    """A loss weight or power: a finite number, ``>= minimum`` when one is given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" and >= {minimum}"
        raise ValueError(f"{name} must be finite{bound}, got {value}")


def check_choice(name, value, choices):
    """A string option: one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name, value):
    """A flag: exactly True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_block(block_c):
    """A forced tile width: None, or a power of two >= 1."""
    if block_c is not None and (isinstance(block_c, bool) or not isinstance(block_c, int)
                                or block_c < 1 or block_c & (block_c - 1)):
        raise ValueError(f"block_c must be None or a power of two >= 1, got {block_c!r}")
