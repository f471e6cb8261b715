"""Input checks for the public API: every problem is a ``TypeError``/``ValueError`` that names the
argument, raised before any kernel runs.

Checks of tensor *values* (label range, negative or non-finite weights and prior rows) run when
``check_values=True`` (the default) and never while ``torch.compile`` traces. They never make the
host wait for a device: each one builds a one-element condition tensor and hands it to
``assert_values``, which on CPU (reading is free) raises the ``ValueError`` and on CUDA queues a
device-side assertion (``torch._assert_async``) carrying the same message, so that a bad value
fails at the next synchronisation with "device-side assert triggered" (and the message in the
kernel's assertion output) instead of costing a synchronisation at every call. Meta tensors hold
no values: their value checks are skipped.
"""

import importlib.util
import math
import numbers
import os
from typing import Literal, get_args

import torch

from gkl_kernels.core.config import (DOT_PRECISIONS, MIN_DOT_BLOCK,  # noqa: F401 (the choices)
                                     DotPrecision)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the Triton kernels' inputs
LOGIT_DTYPES = (*FLOAT_DTYPES, torch.float64)  # float64: computed in float64
INDEX_DTYPES = (torch.int64, torch.int32)
# The string options: their types for the public signatures, their values for the checks
Backend = Literal["auto", "triton", "torch"]
Normalize = Literal["weights", "batch"]
Reduction = Literal["mean", "sum", "none"]
WeightsKind = Literal["factor", "shared", "per_row"]  # (B, C) rank-one factor, (C, C), (B, C, C)
Divergence = Literal["gkl", "jsd"]  # the trainer loss's soft term
BACKENDS = get_args(Backend)
NORMALIZERS = get_args(Normalize)
REDUCTIONS = get_args(Reduction)
DIVERGENCES = get_args(Divergence)
WEIGHT_KINDS = get_args(WeightsKind)
FLOAT32_MAX = torch.finfo(torch.float32).max
MIN_TEMPERATURE = 1.0 / FLOAT32_MAX  # below it 1 / T overflows float32 (about 2.9e-39)
DEVICE_MESSAGE_LIMIT = 250  # torch's CUDA _assert_async refuses messages of 255 characters or more
INTERPRETER_VARIABLE = "TRITON_INTERPRET"


def constant_under_compile(function):
    """``torch.compiler.assume_constant_result`` (Dynamo calls ``function`` while it traces and
    keeps the result as a constant) without importing Dynamo with this package (that import is
    most of a second): the mark that decorator sets, which Dynamo reads once a compile imported
    it. ``tests/test_validation.py`` checks that it is the same mark."""
    function._dynamo_marked_constant = True
    return function


@constant_under_compile
def triton_installed():
    """Whether triton can be imported here (it ships for Linux; the plain-PyTorch path needs
    none)."""
    return importlib.util.find_spec("triton") is not None


@constant_under_compile
def triton_interpreter_active():
    """Whether ``TRITON_INTERPRET`` asks Triton for its CPU interpreter, as Triton reads it now
    (``triton.knobs.runtime.interpret``: "1", "true", "on", "yes"; before triton 3.4, which has no
    knobs, triton's ``@jit`` tests ``TRITON_INTERPRET == "1"``). Whether the interpreter is in
    effect is ``triton_functions_interpreted``."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads the environment variable
        return os.environ.get(INTERPRETER_VARIABLE, "0") == "1"
    return bool(knobs.runtime.interpret)


@constant_under_compile
def triton_functions_interpreted():
    """Whether Triton's ``@triton.jit`` made interpreter functions when triton was imported.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when it decorates a function: triton's own
    library (``triton.language.standard``) is decorated when triton is imported, and kernels
    built for the GPU cannot call interpreter functions nor the other way round. So
    ``TRITON_INTERPRET=1`` only takes effect when it is set before triton is imported; this tells
    from the type of one of triton's own ``@jit`` functions (triton 3.2 to 3.9)."""
    try:
        from triton.language import standard
    except ImportError:
        return triton_interpreter_active()
    probe = getattr(standard, "sigmoid", None)
    if probe is None:  # a triton without it: assume the interpreter is what is asked for
        return triton_interpreter_active()
    return type(probe).__name__ == "InterpretedFunction"


def use_triton_for(backend, device):
    """Resolve ``backend`` for tensors on ``device``: True for the Triton kernels, False for torch.

    ``"torch"``: never Triton. ``"triton"``: CUDA tensors, or CPU tensors under Triton's
    interpreter; anything else, or a machine without triton, is a ``ValueError``. ``"auto"``:
    Triton for CUDA tensors and for CPU tensors under the interpreter where triton is installed,
    torch otherwise (meta tensors: torch).

    ``TRITON_INTERPRET`` set after triton was imported (so Triton asks for its interpreter but its
    functions were built for the GPU, which ends in "0 active drivers" or "Cannot call
    @triton.jit'd outside of the scope of a kernel") is a ``ValueError`` for CPU tensors with
    ``backend="triton"`` and also with ``backend="auto"``: the variable says that Triton should
    run on the CPU, and falling back to torch silently would hide that it does not (a test of the
    kernels would test the torch path). Set the variable before triton is imported, unset it, or
    pass ``backend="torch"``. float64 logits take either backend (both compute in float64)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if not triton_installed():
        if backend == "triton":
            raise ValueError("backend='triton' needs triton, which is not installed here (it "
                             "ships for Linux: pip install triton); pass backend='torch' or "
                             "'auto' for the PyTorch path")
        return False
    interpreter = device.type == "cpu" and triton_interpreter_active()
    if interpreter and not triton_functions_interpreted():
        raise ValueError(
            f"backend={backend!r} with CPU tensors: {INTERPRETER_VARIABLE} asks for Triton's "
            f"interpreter, but it was set after triton was imported, so Triton's functions were "
            f"built for the GPU and the interpreter is not in effect: {INTERPRETER_VARIABLE} must "
            f"be set before triton is imported (in the shell, or at the top of the script before "
            f"anything imports triton); or unset it, or pass backend='torch', for the PyTorch "
            f"path")
    runnable = device.type == "cuda" or interpreter
    if backend == "triton" and not runnable:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported; got tensors on {device}")
    return runnable


def check_logits(student, teacher, *, any_rows=False, names=("student", "teacher")):
    """``student`` and ``teacher``: float tensors of one shape on one device, ``(B, C)`` with
    B, C > 0; with ``any_rows``, ``(..., C)`` with C > 0 and any number of rows (0 included).
    ``names``: the two arguments as the caller's signature names them."""
    first, second = names
    for name, x in ((first, student), (second, teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in LOGIT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got "
                            f"{x.dtype}")
        if any_rows and x.dim() == 0:
            raise ValueError(f"{name} must have a class dimension (..., C), got a 0-dim tensor")
        if not any_rows and x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (B, C), got shape {tuple(x.shape)} (gkl_loss "
                             f"takes (..., C) logits)")
    if student.shape != teacher.shape:
        raise ValueError(f"{first} and {second} must have the same shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[-1] == 0 or (not any_rows and student.shape[0] == 0):
        rows = "C > 0 classes" if any_rows else "B > 0 rows and C > 0 classes"
        raise ValueError(f"{first} and {second} must have {rows}, got shape "
                         f"{tuple(student.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"{first} and {second} must be on one device, got {student.device} and "
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


def host_reads_free(device):
    """Whether reading tensor values on ``device`` back to the host costs no synchronisation:
    CPU. The plain-PyTorch rows and the fused losses read there what lets them skip work (a row
    block with every row read, the masked rows of a chunk); elsewhere they never read. The one
    place this is decided (``testing.launches.reads_as_on_a_gpu`` turns it off; so does
    ``torch.compile``'s tracing, where a read would break the graph)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def asserts_on_device(device):
    """Whether a value check on ``device`` is a device-side assertion rather than a host read:
    CUDA (and any other accelerator whose dispatch table has ``_assert_async``), where reading a
    value back waits for the device; not CPU, where the read is free, nor devices without a
    device-side assertion (their checks read the value back). The one place this is decided."""
    if device.type == "cpu":
        return False
    return device.type == "cuda" or torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::_assert_async.msg", torch._C._dispatch_key_for_device(device.type))


def assert_values(condition, message, *, host_message=None, device_side=None):
    """Fail unless ``condition``, a one-element bool tensor on the checked values' device, holds.

    On the host (CPU, or ``device_side=False``): ``ValueError(host_message() or message)``;
    ``host_message`` may read tensors to say which value is wrong (only called when the check
    failed). On the device (CUDA, or ``device_side=True``): ``torch._assert_async(condition,
    message)``, queued on the stream without a synchronisation (on CPU that raises a
    ``RuntimeError`` with ``message`` at once); ``message`` must not need a host read.
    ``device_side=None`` asks ``asserts_on_device``. On the meta device nothing is checked."""
    device = condition.device
    if device.type == "meta":
        return
    if device_side is None:
        device_side = asserts_on_device(device)
    if device_side:
        if len(message) > DEVICE_MESSAGE_LIMIT:
            message = message[:DEVICE_MESSAGE_LIMIT - 3] + "..."
        torch._assert_async(condition, message)
    elif not bool(condition):
        raise ValueError(host_message() if host_message is not None else message)


def check_nonnegative_finite(name, x, check_values, *, device_side=None):
    """Pair weights and priors: every entry finite and >= 0, read in one pass (``aminmax``
    propagates NaN, so ``min >= 0`` and ``max < inf`` fail for NaN too); see ``assert_values``."""
    if not values_checked(check_values) or x.numel() == 0:
        return
    low, high = torch.aminmax(x)

    def host_message():
        if not bool(torch.isfinite(x).all()):
            return f"{name} must be finite, found inf or NaN"
        return f"{name} must be non-negative, found entries down to {float(low)}"
    assert_values((low >= 0) & (high < float("inf")),
                  f"{name} must be finite and >= 0, found inf, NaN or a negative entry",
                  host_message=host_message, device_side=device_side)


def check_weights(weights, student, weights_kind, check_values, name="weights"):
    """Pair weights of ``(..., C)`` logits ``student``: a rank-one factor of the logits' shape
    (``"factor"``), a ``(C, C)`` matrix shared by all rows (``"shared"``) or ``(..., C, C)``, one
    per row (``"per_row"``), float, on the logits' device, finite and >= 0. The shape decides the
    kind; ``weights_kind`` must name it when a 2-D shape is ambiguous, ``(C, C)`` for ``(B, C)``
    logits with ``B == C``. Returns the kind (for 1-D logits a ``(C, C)`` matrix is their one
    row's: ``"per_row"``, named ``"shared"`` or not)."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weights).__name__}")
    lead, num_classes = tuple(student.shape[:-1]), student.shape[-1]
    shapes = {"factor": (*lead, num_classes), "shared": (num_classes, num_classes),
              "per_row": (*lead, num_classes, num_classes)}
    if weights_kind is None:
        kinds = [kind for kind, shape in shapes.items() if tuple(weights.shape) == shape]
        if len(kinds) > 1 and "factor" in kinds:
            raise ValueError(f"{name} of shape {tuple(weights.shape)} with B == C == "
                             f"{num_classes} is ambiguous: pass weights_kind='factor' (a (B, C) "
                             f"rank-one factor) or weights_kind='shared' (a (C, C) matrix shared "
                             f"by all rows)")
        if not kinds:
            rows = "B" if len(lead) == 1 else "..."
            raise ValueError(f"{name} must have shape ({rows}, C) = {shapes['factor']}, (C, C) = "
                             f"{shapes['shared']} or ({rows}, C, C) = {shapes['per_row']}, got "
                             f"{tuple(weights.shape)}")
        weights_kind = kinds[-1]
    check_choice("weights_kind", weights_kind, WEIGHT_KINDS)
    check_tensor(name, weights, shapes[weights_kind], LOGIT_DTYPES, student.device)
    check_nonnegative_finite(name, weights, check_values)
    return "per_row" if not lead and weights_kind == "shared" else weights_kind


def check_dot_dtype(dot_precision, dtype):
    """The matrix-unit precisions of the ``(C, C)`` kernels take float32 operands: float64
    arithmetic (``dtype``) needs ``"ieee"``."""
    if dtype == torch.float64 and dot_precision != "ieee":
        raise TypeError(f"dot_precision={dot_precision!r} runs the matrix units on float32 "
                        f"operands: float64 logits need dot_precision='ieee'")


def check_dot_block(block_c):
    """A forced tile width for the ``tl.dot`` kernels of shared weights: None or >= 16."""
    if block_c is not None and block_c < MIN_DOT_BLOCK:
        raise ValueError(f"block_c must be None or >= {MIN_DOT_BLOCK} for (C, C) weights "
                         f"(tl.dot tiles), got {block_c}")


def check_labels(labels, rows, num_classes, device, check_values, ignore_index=None, *,
                 device_side=None, name="labels"):
    """Class labels: int64/int32 ``(rows,)`` on ``device``, each in ``[0, num_classes)`` or equal
    to ``ignore_index`` (when one is given); the values as ``assert_values`` checks them.
    ``name``: the argument as the caller's signature names it."""
    if isinstance(labels, torch.Tensor) and labels.is_floating_point():
        raise TypeError(f"{name} must be class indices (int64 or int32, shape ({rows},)), got a "
                        f"{labels.dtype} tensor of shape {tuple(labels.shape)}: for one-hot or "
                        f"soft labels pass {name}.argmax(-1)")
    check_tensor(name, labels, (rows,), INDEX_DTYPES, device)
    if not values_checked(check_values) or rows == 0:
        return
    outside = (labels < 0) | (labels >= num_classes)
    if ignore_index is not None:
        outside &= labels != ignore_index
    allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
    expected = f"{name} must lie in [0, {num_classes}){allowed}"
    assert_values(~outside.any(), f"{expected}, found a label outside",
                  host_message=lambda: f"{expected}, found {int(labels[outside][0])}",
                  device_side=device_side)


def check_index(name, value):
    """An integer option such as ``ignore_index``: an int, not a bool."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")


def check_prior(class_prior, labels, num_classes, device, check_values, *, keep=None,
                device_side=None):
    """A class prior: float ``(C, C)`` on ``device``; the rows that ``labels`` (checked before, in
    ``[0, C)``) pick, of the rows where ``keep`` (a ``(B,)`` bool mask; None: all) holds, are
    finite and >= 0 (the other rows never reach the loss); see ``check_label_rows``."""
    check_tensor("class_prior", class_prior, (num_classes, num_classes), LOGIT_DTYPES, device)
    check_label_rows("class_prior", class_prior, labels, check_values, keep=keep,
                     device_side=device_side)


def check_label_rows(name, matrix, labels, check_values, *, keep=None, device_side=None):
    """Rows ``matrix[labels[b]]`` (``keep[b]`` True, when a mask is given) finite and >= 0,
    without gathering them: each row's minimum and maximum (``amin``, ``amax``; on CPU
    ``aminmax(dim=1)`` is far slower than the two), then a ``(B,)`` pick of the rows' verdicts;
    see ``assert_values``."""
    if not values_checked(check_values) or labels.numel() == 0:
        return
    low, high = matrix.amin(dim=1), matrix.amax(dim=1)  # NaN propagates: the row fails both
    bad = (low < 0) | ~(high < float("inf"))
    picked = bad.index_select(0, labels)
    if keep is not None:
        picked &= keep

    def host_message():
        row = int(labels[picked][0])
        if not bool(torch.isfinite(matrix[row]).all()):
            return (f"{name} must be finite in the rows that labels pick, found inf or NaN in "
                    f"row {row}")
        return (f"{name} must be non-negative in the rows that labels pick, found "
                f"{float(low[row])} in row {row}")
    assert_values(~picked.any(), f"{name} must be finite and >= 0 in the rows that labels pick, "
                  f"found inf, NaN or a negative entry", host_message=host_message,
                  device_side=device_side)


def check_positive(name, value):
    """A temperature as a float: a finite number > 0 whose inverse is finite in float32 (``value
    >= MIN_TEMPERATURE``, about 2.9e-39: the kernels scale logits by ``1 / T`` in float32)."""
    value = _number(name, value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be >= 1 / float32 max = {MIN_TEMPERATURE:.6g} (so that 1 / "
                         f"{name} is finite in float32), got {value!r}")
    return value


def _number(name, value):
    """``value`` as a float; a TypeError unless it is a real number (Python's or numpy's int or
    float, not a bool), a ValueError for an int too large for a float."""
    if type(value) is float:  # the common case, without the abstract-class check
        return value
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an int too large for a float") from None


def check_finite(name, value, minimum=None):
    """A loss weight or power as a float: a finite number, ``>= minimum`` when one is given."""
    value = _number(name, value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" and >= {minimum}"
        raise ValueError(f"{name} must be finite{bound}, got {value}")
    return value


def check_fraction(name, value):
    """A mixture weight as a float: a number in ``[0, 1]``."""
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_choice(name, value, choices):
    """A string option: one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_bool(name, value):
    """A flag: exactly True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_block(name, block_c):
    """A forced tile width: None, or a power of two >= 1."""
    if block_c is not None and (isinstance(block_c, bool) or not isinstance(block_c, int)
                                or block_c < 1 or block_c & (block_c - 1)):
        raise ValueError(f"{name} must be None or a power of two >= 1, got {block_c!r}")


def check_chunk_size(chunk_size):
    """Rows per chunk of the fused losses: None (the default) or an int >= 1."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def check_linear(prefix, hidden, weight, bias):
    """``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None: one float dtype, one device.
    Returns ``(N, V)``."""
    for name, x in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if x.dim() != 2 or 0 in x.shape:
            raise ValueError(f"{name} must be 2-D and non-empty, got shape {tuple(x.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight must have the dtype of {prefix}_hidden "
                        f"({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{prefix}_weight must have shape (V, {hidden.shape[1]}) to match "
                         f"{prefix}_hidden {tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"{prefix}_weight must be on {hidden.device} like {prefix}_hidden, got "
                         f"{weight.device}")
    if bias is not None:
        check_tensor(f"{prefix}_bias", bias, weight.shape[:1], (hidden.dtype,),
                           hidden.device)
    return hidden.shape[0], weight.shape[0]
