"""Fused linear GKL: the GKL loss of ``s = h_s W_s^T (+ b_s)`` and ``t = h_t W_t^T (+ b_t)``
computed chunk of rows by chunk, so that the ``(N, V)`` logits never exist.

For each chunk of ``c`` rows the two logit blocks ``(c, V)`` are formed by one matrix product each
(in the inputs' dtype: bfloat16 products accumulate in float32 and round their output), the rank-one
row terms and their gradient with respect to the logits run on them in float32 (Triton kernels for
CUDA tensors, the plain-PyTorch path on CPU), and the logit gradient ``g`` (c, V) is folded back
at once: ``dh = g W``, ``dW += g^T h`` (a float32 accumulator), ``db += sum_rows g``. The
gradients are computed during the forward pass and scaled by the incoming gradient in backward
(the loss is a scalar), so the peak extra memory is ``O(c V)`` plus the gradients themselves.

The loss's coefficients ``mse_weight / (4 N)`` and ``ce_weight / R`` must be known before any
chunk's gradient is formed. ``R`` (the kept rows) comes from the labels; ``N = sum_b W_b^2`` is
``R`` for ``normalize="batch"`` and for teacher weights with ``gamma = 1`` (each row's softmax
sums to 1); explicit and prior factors give ``W_b`` without any product; only teacher weights
with ``gamma != 1`` need a first pass over the teacher's chunks (one more teacher product each).
"""

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkl_kernels import validation as check
from gkl_kernels.functional import gkl_loss_with_options, kept_row_count, row_config
from gkl_kernels.options import GKLOptions
from gkl_kernels.rank1.config import (NUM_STATS, NUM_TOTALS, SOURCE_EXPLICIT, SOURCE_PRIOR,
                                      SOURCE_TEACHER, TOTAL_DEN, TOTAL_ROWS, RowConfig)
from gkl_kernels.rank1.op import RowInputs, RowState, finish, gradients, statistics
from gkl_kernels.rank1.torch_impl import row_stats_and_gradients_torch
from gkl_kernels.sparse_teacher import (SparseTeacher, check_sparse_teacher, compact_factor,
                                        compact_student, compact_teacher, optional_factor,
                                        readable_indices)

UNSUPPORTED_OPTIONS = ("sync_normalizer", "process_group", "reduction")  # of GKLOptions
# default chunk: the largest power of two of rows with c * V <= one of these. On CPU the row math
# runs in cache-sized row blocks whatever the chunk, so the chunk sets the products' shapes and
# the memory: fused_linear_gkl with float32 heads writes each chunk's logits into (c, V) blocks
# reused from chunk to chunk, and at N = 8192, V = 32000 on 2 cores 1024 rows ran 5.25-5.55 s
# against 5.76 s at 256; where each chunk's (c, V) tensors are fresh (half-precision heads, or
# autograd differentiating the chunk: fused_linear_gkl_sparse, FusedLinearDistillationLoss) a
# 32 MiB block. On CUDA 2 GiB for eight float32 blocks (bench/chunk_model.py: fewer rows are
# bound by reading the weights once per chunk; a model, not timed on a GPU).
REUSED_CHUNK_ELEMENTS = 2**25
CHUNK_ELEMENTS = 2**23
GPU_CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class FusedLinearPlan:
    """What the chunk loop needs besides tensors: the row ops' config (loss options, weight
    source, backend), the chunk size, the vocabulary and whether the teacher gets gradients."""

    config: RowConfig
    chunk_size: int
    vocabulary: int
    teacher_grad: bool


def fused_linear_gkl(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                     teacher_weight: Tensor, *, labels: Optional[Tensor] = None,
                     student_bias: Optional[Tensor] = None,
                     teacher_bias: Optional[Tensor] = None,
                     class_prior: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                     chunk_size: Optional[int] = None, teacher_grad: bool = False,
                     **gkl_options: Any) -> Tensor:
    """``gkl_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, ...)`` (mean reduction) without the
    ``(N, V)`` logits, computed chunk of rows by chunk.

    Args:
        student_hidden, student_weight, student_bias: ``(N, H_s)``, ``(V, H_s)``, ``(V,)`` or
            None; one dtype: float32, float16 or bfloat16. Gradients reach them (in their dtype).
        teacher_hidden, teacher_weight, teacher_bias: ``(N, H_t)``, ``(V, H_t)``, ``(V,)`` or
            None; one dtype, maybe another than the student's.
        labels: ``(N,)`` class indices; rows equal to ``ignore_index`` (default -100) are left
            out (token-level distillation). With ``class_prior`` they pick each row's weights.
        class_prior: ``(V, V)`` class prior (checked whole: finite, >= 0).
        weights: an explicit ``(N, V)`` rank-one factor.
        chunk_size: rows per chunk (default: the largest power of two with
            ``chunk_size * V <= 2**25`` for float32 heads on CPU, ``2**23`` for others, on CUDA
            ``2**26``); peak extra memory is about 2 float32 ``(chunk_size, V)`` blocks on CPU
            (the two models' logits; the student's gradient overwrites its own), about 8 on
            CUDA.
        teacher_grad: False treats the teacher as frozen; True sends the wMSE gradient to the
            teacher tensors that require it.
        **gkl_options: the options of ``gkl_loss``: ``gamma``, ``temperature``,
            ``weight_temperature``, ``mse_weight``, ``ce_weight``, ``normalize``, ``symmetric``,
            ``backend``, ``check_values``, ``block_c``, ``ignore_index``. ``sync_normalizer``,
            ``process_group`` and ``reduction`` are not supported (a ``ValueError``).

    Returns:
        The loss, float32, 0-dim.
    """
    plan = _checked_plan(student_hidden, student_weight, student_bias, teacher_hidden,
                         teacher_weight, teacher_bias, labels, class_prior, weights, chunk_size,
                         teacher_grad, gkl_options)
    teacher = (teacher_hidden, teacher_weight, teacher_bias)
    if not teacher_grad:
        teacher = tuple(None if x is None else x.detach() for x in teacher)
    factor = weights if weights is not None else class_prior
    return FusedLinearGKLFunction.apply(student_hidden, student_weight, student_bias, *teacher,
                                        labels, None if factor is None else factor.detach(),
                                        plan)


class FusedLinearGKLLoss(nn.Module):
    """``fused_linear_gkl`` as an ``nn.Module``, its options checked once, at construction.

    Args:
        chunk_size: rows per chunk (None: ``fused_linear_gkl``'s default).
        teacher_grad: whether the teacher tensors that require it get the wMSE gradient.
        **gkl_options: the ``gkl_loss`` options ``fused_linear_gkl`` accepts: ``gamma``,
            ``temperature``, ``weight_temperature``, ``mse_weight``, ``ce_weight``,
            ``normalize``, ``symmetric``, ``backend``, ``check_values``, ``block_c``,
            ``ignore_index``.
    """

    def __init__(self, *, chunk_size: Optional[int] = None, teacher_grad: bool = False,
                 **gkl_options: Any) -> None:
        super().__init__()
        _check_chunk_size(chunk_size)
        check.check_bool("teacher_grad", teacher_grad)
        self.chunk_size, self.teacher_grad = chunk_size, teacher_grad
        self.options = _options_from(gkl_options)
        self._gkl_options = gkl_options

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Optional[Tensor] = None,
                student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                class_prior: Optional[Tensor] = None,
                weights: Optional[Tensor] = None) -> Tensor:
        """The fused linear GKL loss of the two linear heads.

        Args:
            student_hidden, student_weight: ``(N, H_s)``, ``(V, H_s)``.
            teacher_hidden, teacher_weight: ``(N, H_t)``, ``(V, H_t)``.
            labels: ``(N,)`` class indices (``ignore_index`` rows are left out).
            student_bias, teacher_bias: ``(V,)`` or None.
            class_prior: ``(V, V)``; weights: ``(N, V)`` rank-one factor; as in
                ``fused_linear_gkl``.

        Returns:
            The loss, float32, 0-dim.
        """
        return fused_linear_gkl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                labels=labels, student_bias=student_bias,
                                teacher_bias=teacher_bias, class_prior=class_prior,
                                weights=weights, chunk_size=self.chunk_size,
                                teacher_grad=self.teacher_grad, **self._gkl_options)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, teacher_grad={self.teacher_grad}, " + ", ".join(
            f"{k}={v!r}" for k, v in vars(self.options).items() if k not in UNSUPPORTED_OPTIONS)


class FusedLinearGKLFunction(torch.autograd.Function):
    """Forward: the loss and, for the inputs that need them, its gradients, chunk by chunk.
    Backward: those gradients times the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden,
                teacher_weight, teacher_bias, labels, factor, plan):
        wanted = ctx.needs_input_grad[:6]
        inputs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                  teacher_bias)
        loss, grads = _loss_and_gradients(inputs[:3], inputs[3:], labels, factor, plan, wanted)
        keep_gradients(ctx, inputs, grads)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return (*scaled_gradients(ctx, grad_loss), None, None, None)


def keep_gradients(ctx, inputs, grads):
    """Save the float32 gradients a forward computed (None where not wanted) for
    ``scaled_gradients``, with the dtypes of their ``inputs``."""
    ctx.wanted = tuple(g is not None for g in grads)
    ctx.dtypes = tuple(None if x is None else x.dtype for x in inputs)
    ctx.save_for_backward(*(g for g in grads if g is not None))


def scaled_gradients(ctx, grad_loss):
    """The kept gradients times the incoming scalar gradient, each in its input's dtype (None
    where not wanted)."""
    saved = iter(ctx.saved_tensors)
    scale = grad_loss.to(torch.float32)
    return [(next(saved) * scale).to(dtype) if wanted else None
            for wanted, dtype in zip(ctx.wanted, ctx.dtypes)]


def fused_linear_gkl_sparse(student_hidden: Tensor, student_weight: Tensor,
                            teacher: SparseTeacher, *, labels: Optional[Tensor] = None,
                            student_bias: Optional[Tensor] = None,
                            class_prior: Optional[Tensor] = None,
                            weights: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                            **gkl_options: Any) -> Tensor:
    """``gkl_loss(h_s W_s^T + b_s, teacher, ...)`` (mean reduction) for a teacher cached as its
    top-k classes, without the student's ``(N, V)`` logits: chunk by chunk, each chunk's
    ``(c, V)`` logits become the compact rows of ``sparse_teacher`` and their gradient is folded
    back at once. The normalisers come from the cache (and the weights) before the first chunk.

    Args:
        student_hidden, student_weight, student_bias: as in ``fused_linear_gkl``.
        teacher: the ``SparseTeacher``, ``(N, k)`` indices and values (a constant).
        labels: ``(N,)`` class indices (``ignore_index`` rows left out; the prior's rows).
        class_prior, weights: ``(V, V)`` prior or ``(N, V)`` rank-one factor, gathered at the
            cached classes.
        chunk_size: rows per chunk (default: the largest power of two with
            ``chunk_size * V <= 2**23``, on CUDA ``2**26``).
        **gkl_options: as in ``fused_linear_gkl``.

    Returns:
        The loss, float32, 0-dim.
    """
    options = _options_from(gkl_options)
    _check_chunk_size(chunk_size)
    rows, vocabulary = _check_linear("student", student_hidden, student_weight, student_bias)
    device = student_hidden.device
    like = torch.zeros((), device=device).expand(rows, vocabulary)  # shapes only, no memory
    if labels is not None:
        check.check_labels(labels, rows, vocabulary, device, options.check_values,
                           options.ignore_index)
    _checked_weight_source(weights, class_prior, labels, rows, vocabulary, device, options)
    ignored = None if labels is None else labels == options.ignore_index
    teacher = readable_indices(teacher, ignored)
    check_sparse_teacher(teacher, like, options.check_values, ignored)
    factor = optional_factor(weights, class_prior, labels, options)
    plan = SparsePlan(options, chunk_size or default_chunk_size(vocabulary, device.type),
                      teacher.temperature, teacher.rest)
    return FusedSparseFunction.apply(
        student_hidden, student_weight, student_bias, teacher.indices, teacher.values.detach(),
        labels, None if factor is None else compact_factor(factor.detach(), teacher.indices),
        plan)


@dataclass(frozen=True)
class SparsePlan:
    """The sparse chunk loop's options: the loss options, the chunk size, and the cache's
    temperature and rest option."""

    options: GKLOptions
    chunk_size: int
    temperature: float
    rest: str


class FusedSparseFunction(torch.autograd.Function):
    """Forward: the loss on the cached teacher and the student tensors' gradients, chunk by
    chunk. Backward: those gradients times the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, indices, values, labels,
                compact, plan):
        student = (student_hidden, student_weight, student_bias)
        grads = [_gradient_buffer(x, w) for x, w in zip(student, ctx.needs_input_grad[:3])]
        loss = _sparse_loss_and_gradients(student, indices, values, labels, compact, plan,
                                          grads)
        keep_gradients(ctx, student, grads)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        return (*scaled_gradients(ctx, grad_loss), None, None, None, None, None)


def _sparse_loss_and_gradients(student, indices, values, labels, compact, plan, grads):
    """The loss (float32, 0-dim), the student's gradients added into ``grads``: per chunk the
    compact rows' wMSE and cross-entropy rows (two row-op calls, ``reduction="none"``), weighed by
    ``mse_weight / N`` and ``ce_weight / R`` (``"drop"``: times the cached mass) from
    ``_sparse_normalisers``."""
    options = plan.options
    teacher = SparseTeacher(indices, values, plan.temperature, plan.rest)
    ignored = None if labels is None else labels == options.ignore_index
    t_rows, mass = compact_teacher(teacher, student[1].shape[0], ignored)
    mask = None if labels is None else torch.where(ignored, options.ignore_index, 0)
    wmse_norm, ce_norm = _sparse_normalisers(t_rows, compact, ignored, options)

    def chunk_loss(chunk, logits, _):
        s_rows = compact_student(logits, indices[chunk], options.temperature,
                                 None if ignored is None else ignored[chunk])

        def rows(**changes):
            return gkl_loss_with_options(
                s_rows, t_rows[chunk], replace(options, reduction="none", **changes),
                labels=None if mask is None else mask[chunk],
                weights=None if compact is None else compact[chunk],
                weights_kind=None if compact is None else "factor")

        ce = rows(mse_weight=0.0, ce_weight=1.0)
        if mass is not None:
            ce = ce * mass[chunk]
        part = options.ce_weight * ce.sum() * ce_norm
        if options.mse_weight != 0:
            part = part + options.mse_weight * rows(mse_weight=1.0, ce_weight=0.0).sum() \
                * wmse_norm
        return part[None]

    return chunked_with_autograd(student, None, indices.shape[0], plan.chunk_size, grads,
                                 chunk_loss)[0]


def chunked_with_autograd(student, teacher, rows, chunk_size, grads, chunk_loss):
    """The sum over chunks of rows of ``chunk_loss(chunk, s, t)``, a 1-D tensor (its element 0
    the loss to differentiate, the others components), with ``s``, ``t`` the chunk's float32
    logits of the ``(h, W, b)`` heads (``t`` None without a teacher head; constants); each
    chunk's gradient of element 0 with respect to ``s`` (through autograd) is folded back into
    ``grads`` at once. Returns the detached sums, float32."""
    wanted = any(g is not None for g in grads)
    total = None
    for chunk in _chunks(rows, chunk_size):
        logits = _logits(student, chunk).requires_grad_(wanted)
        teacher_logits = None if teacher is None else _logits(teacher, chunk)
        with torch.enable_grad():  # the Function's forward runs without it
            parts = chunk_loss(chunk, logits, teacher_logits)
            loss = parts[0]
        if wanted:
            _fold_back(torch.autograd.grad(loss, logits)[0], student, grads, chunk)
        parts = parts.detach().float()
        total = parts if total is None else total + parts
    return total


def _sparse_normalisers(t_rows, compact, ignored, options):
    """``(1 / N, 1 / R)`` (0-dim tensors): ``R`` the kept rows (at least 1), ``N`` their ``sum_b
    W_b^2`` of the compact rows' weights (teacher ``softmax(t / T2) ** gamma`` over the present
    columns, or the gathered factor), or ``R`` for ``normalize="batch"``; ``1 / N = 0`` for
    ``N = 0``."""
    count = kept_row_count(ignored, t_rows.shape[0], t_rows.device)
    if options.normalize == "batch":
        return 1.0 / count, 1.0 / count
    if compact is None:
        present = t_rows != float("-inf")
        v = torch.softmax(t_rows.float() / options.weight_temperature, dim=-1)
        weight = torch.where(present, v ** options.gamma, 0.0).sum(dim=-1)
    else:
        weight = compact.float().sum(dim=-1)
    squares = weight * weight
    norm = (squares if ignored is None else torch.where(ignored, 0.0, squares)).sum()
    return torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0), 1.0 / count


def _loss_and_gradients(student, teacher, labels, factor, plan, wanted):
    """``(loss, [d student_hidden, d student_weight, d student_bias, d teacher_hidden,
    d teacher_weight, d teacher_bias])`` (None where not wanted), the gradients in float32."""
    config = plan.config
    rows = student[0].shape[0]
    grads = [_gradient_buffer(x, w) for x, w in zip((*student, *teacher), wanted)]
    need_ds, need_dt = any(wanted[:3]), any(wanted[3:])
    stats = torch.empty(rows, NUM_STATS, dtype=torch.float32, device=student[0].device)
    totals = None
    if need_ds or need_dt:
        totals = _gradient_totals(teacher, labels, factor, plan)
        one = torch.ones((), dtype=torch.float32, device=student[0].device)
        empty = one.new_empty(0)  # the Triton backward recomputes the directions
    # one block per chunk for each logit tensor, reused (a fresh (c, V) block a chunk costs its
    # page faults on CPU); on the plain-PyTorch path the student's gradient overwrites its logits
    s_block, t_block = (_chunk_block(linear[0], plan, linear[0].dtype == torch.float32)
                        for linear in (student, teacher))
    for chunk in _chunks(rows, plan.chunk_size):
        s = _logits(student, chunk, s_block)
        t = _logits(teacher, chunk, t_block)
        chunk_factor = factor[chunk] if config.source == SOURCE_EXPLICIT else factor
        chunk_labels = None if labels is None else labels[chunk]
        inputs = RowInputs(s, t, chunk_factor, chunk_labels)
        if not (need_ds or need_dt):
            stats[chunk] = statistics(inputs, config)[0]
            continue
        if config.use_triton:
            stats[chunk] = statistics(inputs, config)[0]
            ds, dt = gradients(one, RowState(inputs, stats[chunk], totals, empty, empty), config,
                               need_ds, need_dt)
        else:  # the plain-PyTorch path forms each row block's gradient while it is in cache
            stats[chunk], ds, dt = row_stats_and_gradients_torch(
                s, t, chunk_factor, chunk_labels, totals, config, need_ds, need_dt, s)
        del s, t
        if need_ds:
            _fold_back(ds, student, grads[:3], chunk)
        if need_dt:
            _fold_back(dt, teacher, grads[3:], chunk)
    return finish(stats, config)[0], grads


def _gradient_totals(teacher, labels, factor, plan):
    """The batch totals the gradient needs before any chunk's gradient is formed: ``K`` and
    ``DEN`` of the normaliser and the kept rows ``R``. ``N = R`` for ``normalize="batch"`` and
    for teacher weights with ``gamma = 1`` (each row's softmax sums to 1); else a first pass of
    the row kernel over the weights alone (with teacher weights, one more teacher product per
    chunk)."""
    config = plan.config
    rows = teacher[0].shape[0]
    device = teacher[0].device
    kept = torch.ones(rows, dtype=torch.bool, device=device) if labels is None \
        else labels != config.ignore_index
    teacher_softmax = config.source == SOURCE_TEACHER and config.gamma == 1.0
    if config.normalize_batch or not config.with_wmse or teacher_softmax:
        totals = torch.zeros(NUM_TOTALS, dtype=torch.float32, device=device)
        totals[TOTAL_ROWS] = kept.sum(dtype=torch.float32)
        totals[TOTAL_DEN] = totals[TOTAL_ROWS]
        return totals
    weights_only = replace(config, ce_weight=0.0)
    stats = torch.empty(rows, NUM_STATS, dtype=torch.float32, device=device)
    for chunk in _chunks(rows, plan.chunk_size):
        if config.source == SOURCE_TEACHER:
            t = s = _logits(teacher, chunk)
        else:  # the weights need no logits: a zero row read through stride 0
            t = s = torch.zeros((), dtype=torch.float32, device=device).expand(
                chunk.stop - chunk.start, plan.vocabulary)
        chunk_factor = factor[chunk] if config.source == SOURCE_EXPLICIT else factor
        stats[chunk] = statistics(RowInputs(s, t, chunk_factor,
                                            None if labels is None else labels[chunk]),
                                  weights_only)[0]
    return finish(stats, weights_only)[1]


def default_chunk_size(vocabulary, device_type="cpu", reused_blocks=False):
    """The largest power of two of rows with ``rows * vocabulary <= CHUNK_ELEMENTS`` (CUDA:
    ``GPU_CHUNK_ELEMENTS``; on CPU with ``reused_blocks``, float32 logit blocks reused from chunk
    to chunk: ``REUSED_CHUNK_ELEMENTS``), at least 1."""
    elements = GPU_CHUNK_ELEMENTS if device_type == "cuda" else \
        REUSED_CHUNK_ELEMENTS if reused_blocks else CHUNK_ELEMENTS
    return 1 << max(0, (elements // vocabulary).bit_length() - 1)


def _chunks(rows, chunk_size):
    return [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


def _chunk_block(hidden, plan, wanted):
    """An uninitialised float32 ``(chunk_size, V)`` block when ``wanted``, else None."""
    if not wanted:
        return None
    return hidden.new_empty(min(plan.chunk_size, hidden.shape[0]), plan.vocabulary,
                            dtype=torch.float32)


def _logits(linear, chunk, block=None):
    """``h[chunk] W^T (+ b)`` in the inputs' dtype, returned in float32, (c, V); written into
    the first rows of ``block`` when given (float32 inputs)."""
    hidden, weight, bias = linear
    if block is None:
        return F.linear(hidden[chunk], weight, bias).float()
    out = block[:chunk.stop - chunk.start]
    if bias is None:
        return torch.mm(hidden[chunk], weight.t(), out=out)
    return torch.addmm(bias, hidden[chunk], weight.t(), out=out)


def _gradient_buffer(tensor, wanted):
    """A float32 zero gradient for ``tensor`` when it is wanted, else None."""
    if tensor is None or not wanted:
        return None
    return torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)


def _fold_back(grad_logits, linear, grads, chunk):
    """Add a chunk's logit gradient ``g`` (c, V) to the gradients of ``(h, W, b)``: ``dh = g W``,
    ``dW += g^T h[chunk]``, ``db += sum_rows g`` (products in the inputs' dtype)."""
    hidden, weight, _ = linear
    grad_hidden, grad_weight, grad_bias = grads
    g = grad_logits.to(hidden.dtype)
    if grad_hidden is not None and g.dtype == grad_hidden.dtype:
        torch.mm(g, weight, out=grad_hidden[chunk])
    elif grad_hidden is not None:
        grad_hidden[chunk] = g @ weight
    if grad_weight is not None and grad_weight.dtype == g.dtype:
        grad_weight.addmm_(g.t(), hidden[chunk])
    elif grad_weight is not None:  # a half-precision product, summed in float32
        grad_weight += g.t() @ hidden[chunk]
    if grad_bias is not None:
        grad_bias += grad_logits.sum(dim=0)


def _options_from(gkl_options):
    """A checked ``GKLOptions`` from ``gkl_loss``'s keyword options (``sync_normalizer``,
    ``process_group`` and ``reduction`` are not for this loss: one process's mean loss)."""
    for name in UNSUPPORTED_OPTIONS:
        if name in gkl_options:
            raise ValueError(f"fused_linear_gkl does not support {name}: it computes one "
                             f"process's mean loss")
    try:
        return GKLOptions(**gkl_options)
    except TypeError as error:
        raise TypeError(f"fused_linear_gkl got an unknown option: {error}") from None


def _check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _check_linear(prefix, hidden, weight, bias):
    """``hidden`` (N, H), ``weight`` (V, H), ``bias`` (V,) or None: one float dtype, one device.
    Returns ``(N, V)``."""
    for name, x in ((f"{prefix}_hidden", hidden), (f"{prefix}_weight", weight)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in check.FLOAT_DTYPES:
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
        check.check_tensor(f"{prefix}_bias", bias, weight.shape[:1], (hidden.dtype,),
                           hidden.device)
    return hidden.shape[0], weight.shape[0]


def _checked_plan(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                  teacher_bias, labels, class_prior, weights, chunk_size, teacher_grad,
                  gkl_options):
    """Check every argument (before any product runs) and return the ``FusedLinearPlan``."""
    options = _options_from(gkl_options)
    _check_chunk_size(chunk_size)
    check.check_bool("teacher_grad", teacher_grad)
    rows, vocabulary = _check_linear("student", student_hidden, student_weight, student_bias)
    teacher_shape = _check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_shape != (rows, vocabulary):
        raise ValueError(f"teacher logits would have shape {teacher_shape}, the student's "
                         f"{(rows, vocabulary)}: teacher_hidden needs N = {rows} rows and "
                         f"teacher_weight V = {vocabulary} rows")
    device = student_hidden.device
    if teacher_hidden.device != device:
        raise ValueError(f"teacher tensors must be on {device} like the student's, got "
                         f"{teacher_hidden.device}")
    if labels is not None:
        check.check_labels(labels, rows, vocabulary, device, options.check_values,
                           options.ignore_index)
    source = _checked_weight_source(weights, class_prior, labels, rows, vocabulary, device,
                                    options)
    config = row_config(options, source, labels is not None,
                        check.use_triton_for(options.backend, device))
    reused = student_hidden.dtype == teacher_hidden.dtype == torch.float32  # see _chunk_block
    return FusedLinearPlan(config=config,
                           chunk_size=chunk_size or default_chunk_size(vocabulary, device.type,
                                                                       reused),
                           vocabulary=vocabulary, teacher_grad=teacher_grad)


def _checked_weight_source(weights, class_prior, labels, rows, vocabulary, device, options):
    """Check the rank-one weights of a fused loss, an ``(N, V)`` factor or a ``(V, V)`` prior
    (checked whole, in place: gathering the labels' rows would cost an ``(N, V)`` tensor), and
    return their source."""
    if weights is not None:
        if class_prior is not None:
            raise ValueError("give either weights or class_prior, not both")
        check.check_tensor("weights", weights, (rows, vocabulary), check.FLOAT_DTYPES, device)
        check.check_nonnegative_finite("weights", weights, options.check_values)
        return SOURCE_EXPLICIT
    if class_prior is not None:
        if labels is None:
            raise ValueError("class_prior needs labels (N,) to pick each row's prior")
        check.check_tensor("class_prior", class_prior, (vocabulary, vocabulary),
                           check.FLOAT_DTYPES, device)
        check.check_nonnegative_finite("class_prior", class_prior, options.check_values)
        return SOURCE_PRIOR
    return SOURCE_TEACHER
