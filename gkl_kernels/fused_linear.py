"""Fused linear GKL: the GKL loss of ``s = h_s W_s^T (+ b_s)`` and ``t = h_t W_t^T (+ b_t)``
computed chunk of rows by chunk, so that the ``(N, V)`` logits never exist.

For each chunk of ``c`` rows the two logit blocks ``(c, V)`` are formed by one matrix product each
(in the inputs' dtype: bfloat16 products accumulate in float32 and round their output), the rank-one
row terms and their gradient with respect to the logits run on them in float32 (Triton kernels for
CUDA tensors, the plain-PyTorch path on CPU), and the logit gradient ``g`` (c, V) is folded back
at once: ``dh = g W``, ``dW += g^T h`` (a float32 accumulator), ``db += sum_rows g``. The
gradients are computed during the forward pass and scaled by the incoming gradient in backward
(the loss is a scalar), so the peak extra memory is ``O(c V)`` plus the gradients themselves.

Every fused loss (``fused_linear_gkl``, ``fused_linear_jsd``, ``fused_linear_gkl_sparse``,
``fused_linear_jsd_sparse``, the trainer's ``FusedLinearDistillationLoss``) runs the one chunk
loop ``chunk_loop``: it forms each chunk's logits and folds the gradient its per-chunk function
returns back into the heads; that function forms the gradient from the row ops
(``rows_with_gradients``; a sparse teacher's ``sparse_share_and_gradient``), no autograd. One
autograd function, ``ChunkedLoss``, carries the gradients of all of them to the caller. Their
inputs are checked once, at the entry.

The loss's coefficients ``mse_weight / (4 N)`` and ``ce_weight / R`` must be known before any
chunk's gradient is formed (``batch_totals``, the one normaliser). ``R`` (the kept rows) comes
from the labels; ``N = sum_b W_b^2`` is ``R`` for ``normalize="batch"`` and for teacher weights
with ``gamma = 1`` (each row's softmax sums to 1); explicit and prior factors give ``W_b``
without any product; only teacher weights with ``gamma != 1`` need a first pass over the
teacher's chunks (one more teacher product each).
"""

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkl_kernels import validation as check
from gkl_kernels.core.config import (NUM_TOTALS, SOURCE_EXPLICIT, SOURCE_JSD, SOURCE_PRIOR,
                                     SOURCE_TEACHER, TOTAL_DEN, TOTAL_K, TOTAL_ROWS, RowConfig)
from gkl_kernels.jsd.torch_impl import jsd_row_stats_torch
from gkl_kernels.options import GKLOptions
from gkl_kernels.rank1.torch_impl import row_stats_and_gradients_torch
from gkl_kernels.row_ops import RowInputs, RowState, finish, gradients, statistics
from gkl_kernels.rows import safe_ratio
from gkl_kernels.sparse_teacher import (SparseTeacher, check_sparse_teacher, compact_rows,
                                        kept_row_count, optional_factor, readable_indices,
                                        sparse_share_and_gradient)
from gkl_kernels.validation import Backend

UNSUPPORTED_OPTIONS = ("sync_normalizer", "process_group", "reduction")  # of GKLOptions
# default chunk: the largest power of two of rows with c * V <= one of these. On CPU the row math
# runs in cache-sized row blocks whatever the chunk, so the chunk sets the products' shapes and
# the memory. Where the chunk's logits stay as they are and are read a row block at a time
# (fused_linear_gkl's float32 heads, written into (c, V) blocks reused from chunk to chunk; the
# trainer's plain-PyTorch rows) 2^25 elements (1024 rows at V = 32000: bench.fused_linear
# measures larger chunks faster there), but for the trainer's half-precision logits, converted a
# row block at a time, 512 rows (bench.fused_linear --trainer measured them faster than 1024 at
# V = 32000 and than 256 at V = 128256, with less memory at 32000); where each chunk's float32
# (c, V) tensors are fresh (half-precision heads of fused_linear_gkl, autograd differentiating
# the chunk: fused_linear_gkl_sparse) a 32 MiB block. On CUDA 2 GiB for eight float32 blocks
# (tools/chunk_model.py: fewer rows are bound by reading the weights once per chunk; a model,
# not timed on a GPU).
ROW_BLOCK_CHUNK_ELEMENTS = 2**25
HALF_PRECISION_ROW_BLOCK_CHUNK = 512  # rows
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
                         teacher_grad, options_from(gkl_options))
    rows_read, labels, student_hidden, teacher_hidden, weights = projected_rows(
        labels, plan.config.ignore_index, plan.config.use_triton, student_hidden,
        teacher_hidden, weights)
    teacher = (teacher_hidden, teacher_weight, teacher_bias)
    if not teacher_grad:
        teacher = tuple(None if x is None else x.detach() for x in teacher)
    student = (student_hidden, student_weight, student_bias)
    factor = weights if weights is not None else class_prior
    factor = None if factor is None else factor.detach()

    def loss_and_gradients(wanted):
        loss, grads = _loss_and_gradients(student, teacher, labels, factor, plan, wanted,
                                          rows_read)
        return (loss,), grads

    return ChunkedLoss.apply(loss_and_gradients, *student, *teacher)[0]


def fused_linear_jsd(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                     teacher_weight: Tensor, *, labels: Optional[Tensor] = None,
                     student_bias: Optional[Tensor] = None,
                     teacher_bias: Optional[Tensor] = None, beta: float = 0.5,
                     temperature: float = 1.0, ignore_index: int = -100,
                     chunk_size: Optional[int] = None, backend: Backend = "auto",
                     check_values: bool = True) -> Tensor:
    """``jsd_loss(h_s W_s^T + b_s, h_t W_t^T + b_t, ...)`` (the mean over the kept rows) without
    the ``(N, V)`` logits, chunk of rows by chunk as ``fused_linear_gkl``; the teacher is a
    constant.

    Args:
        student_hidden, student_weight, student_bias: ``(N, H_s)``, ``(V, H_s)``, ``(V,)`` or
            None, as in ``fused_linear_gkl``.
        teacher_hidden, teacher_weight, teacher_bias: ``(N, H_t)``, ``(V, H_t)``, ``(V,)`` or
            None.
        labels: ``(N,)``; rows equal to ``ignore_index`` are left out.
        beta, temperature, ignore_index, backend, check_values: as in ``jsd_loss``.
        chunk_size: rows per chunk, as in ``fused_linear_gkl``.

    Returns:
        The loss, float32, 0-dim.
    """
    options = GKLOptions.of(locals())
    plan = _checked_plan(student_hidden, student_weight, student_bias, teacher_hidden,
                         teacher_weight, teacher_bias, labels, None, None, chunk_size, False,
                         options, jsd=True)
    rows_read, labels, student_hidden, teacher_hidden = projected_rows(
        labels, ignore_index, plan.config.use_triton, student_hidden, teacher_hidden)
    student = (student_hidden, student_weight, student_bias)
    teacher = tuple(None if x is None else x.detach()
                    for x in (teacher_hidden, teacher_weight, teacher_bias))

    def loss_and_gradients(wanted):
        loss, grads = _loss_and_gradients(student, teacher, labels, None, plan,
                                          (*wanted, False, False, False), rows_read)
        return (loss,), grads[:3]

    return ChunkedLoss.apply(loss_and_gradients, *student)[0]


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
        check.check_chunk_size(chunk_size)
        check.check_bool("teacher_grad", teacher_grad)
        self.chunk_size, self.teacher_grad = chunk_size, teacher_grad
        self.options = options_from(gkl_options)
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
            f"{k}={v!r}" for k, v in vars(self.options).items()
            if k not in (*UNSUPPORTED_OPTIONS, "beta"))


class ChunkedLoss(torch.autograd.Function):
    """The one autograd function of the fused losses. Forward: ``loss_and_gradients(wanted) ->
    (terms, grads)``, the loss (and further terms, not differentiable) with the gradients of the
    ``tensors`` that want them (``gradient_buffers``; None for the others), formed chunk by
    chunk. Backward: those gradients times the incoming gradient of the loss, in the tensors'
    dtypes."""

    @staticmethod
    def forward(ctx, loss_and_gradients, *tensors):
        terms, grads = loss_and_gradients(ctx.needs_input_grad[1:])
        keep_gradients(ctx, tensors, grads)
        ctx.mark_non_differentiable(*terms[1:])
        return terms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_grad_terms):
        return (None, *scaled_gradients(ctx, grad_loss))


def keep_gradients(ctx, inputs, grads):
    """Save the gradients a forward computed (None where not wanted) for
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
    return _fused_sparse((student_hidden, student_weight, student_bias), teacher, labels,
                         class_prior, weights, chunk_size, options_from(gkl_options))


def fused_linear_jsd_sparse(student_hidden: Tensor, student_weight: Tensor,
                            teacher: SparseTeacher, *, labels: Optional[Tensor] = None,
                            student_bias: Optional[Tensor] = None, beta: float = 0.5,
                            temperature: float = 1.0, ignore_index: int = -100,
                            chunk_size: Optional[int] = None, backend: Backend = "auto",
                            check_values: bool = True) -> Tensor:
    """``jsd_loss(h_s W_s^T + b_s, teacher, ...)`` (the mean over the kept rows) for a teacher
    cached as its top-k classes, chunk by chunk as ``fused_linear_gkl_sparse``.

    Args:
        student_hidden, student_weight, student_bias: as in ``fused_linear_gkl``.
        teacher: the ``SparseTeacher`` (``rest="renormalize"`` or ``"rest"``, as in
            ``jsd_loss``).
        labels: ``(N,)``; rows equal to ``ignore_index`` are left out.
        beta, temperature, ignore_index, backend, check_values: as in ``jsd_loss``.
        chunk_size: rows per chunk, as in ``fused_linear_gkl_sparse``.

    Returns:
        The loss, float32, 0-dim.
    """
    return _fused_sparse((student_hidden, student_weight, student_bias), teacher, labels, None,
                         None, chunk_size, GKLOptions.of(locals()), jsd=True)


def _fused_sparse(student, teacher, labels, class_prior, weights, chunk_size, options,
                  jsd=False):
    """The fused sparse-teacher loss of the head ``student`` ``(h, W, b)``: every input checked
    (before any product), the teacher's compact rows formed once, then ``_sparse_loss``."""
    check.check_chunk_size(chunk_size)
    rows, vocabulary = check.check_linear("student", *student)
    device = student[0].device
    if labels is not None:
        check.check_labels(labels, rows, vocabulary, device, options.check_values,
                           options.ignore_index)
    _checked_weight_source(weights, class_prior, labels, rows, vocabulary, device, options)
    use_triton = check.use_triton_for(options.backend, device)
    student, labels, compact, rows_read = sparse_teacher_rows(
        student, teacher, labels, weights, class_prior, vocabulary, options, use_triton, jsd)
    chunk_size = chunk_size or default_chunk_size(vocabulary, device.type)

    def loss_and_gradients(wanted):
        grads = gradient_buffers(student, wanted)
        return (_sparse_loss(student, compact, options, chunk_size, use_triton, grads, jsd,
                             rows_read),), grads

    return ChunkedLoss.apply(loss_and_gradients, *student)[0]


def sparse_teacher_rows(student, teacher, labels, weights, class_prior, vocabulary, options,
                        use_triton, jsd=False):
    """``(student, labels, CompactRows, rows_read)`` of a sparse teacher's fused loss (the head
    and labels checked): the ``SparseTeacher`` checked for the ``(N, vocabulary)`` logits, the
    rows the loss reads selected or put first (``projected_rows``: the head ``(h, W, b)``,
    labels, cache and weights) and the teacher's compact rows formed once."""
    rows = student[0].shape[0]
    like = torch.zeros((), device=student[0].device).expand(rows, vocabulary)  # shapes only
    ignored = None if labels is None else labels == options.ignore_index
    teacher = readable_indices(teacher, ignored)
    check_sparse_teacher(teacher, like, options.check_values, ignored, jsd)
    rows_read, labels, hidden, indices, values, weights = projected_rows(
        labels, options.ignore_index, use_triton, student[0], teacher.indices, teacher.values,
        weights)
    teacher = replace(teacher, indices=indices, values=values.detach())
    ignored = None if labels is None else labels == options.ignore_index
    compact = compact_rows(teacher, vocabulary,
                           optional_factor(weights, class_prior, labels, options), ignored,
                           options.ignore_index)
    return (hidden, *student[1:]), labels, compact, rows_read


def _sparse_loss(student, rows, options, chunk_size, use_triton, grads, jsd=False,
                 rows_read=None):
    """The loss (float32, 0-dim; ``jsd``: the generalized JSD's) of the student's head
    ``student`` against the teacher's ``CompactRows``, the student's gradients added into
    ``grads``: per chunk of ``chunk_size`` rows its share of the mean with the batch's
    ``(1 / N, 1 / R)`` (``batch_totals``) and its gradient (``sparse_share_and_gradient``, no
    autograd); ``rows_read`` as in ``chunk_loop``."""
    count = rows.indices.shape[0]

    def weight_inputs(chunk):  # the weights read the teacher's compact rows alone
        part = rows.part(chunk)
        return RowInputs(part.teacher, part.teacher, part.factor, part.labels)

    shares = normaliser_shares(batch_totals(  # the compact rows (N, k + 1): one chunk
        rows.config(options, use_triton, jsd),
        kept_row_count(rows.ignored, count, rows.teacher.device), count, count, weight_inputs))

    need_ds = any(g is not None for g in grads)

    def chunk_terms(chunk, logits):
        share, ds = sparse_share_and_gradient(logits, rows.part(chunk), options, use_triton,
                                              shares, jsd, need_ds)
        return share, (ds,)

    return sum(chunk_loop((student,), (grads,), count, chunk_size, chunk_terms,
                          rows_read=rows_read))


def chunk_loop(heads, grads, rows, chunk_size, chunk_function, reuse_blocks=False, upcast=True,
               rows_read=None):
    """The one chunk loop of the fused losses: for each chunk of ``rows`` rows the chunk's float32
    logits ``h[chunk] W^T (+ b)`` ``(c, V)`` of each linear head ``(h, W, b)`` of ``heads`` (not
    ``upcast``: in a half-precision head's dtype, for a function that converts row blocks), then
    ``terms, logit_grads = chunk_function(chunk, *logits)``; each logit gradient ``g`` (None: not
    wanted) is folded back into the head's ``grads`` ``(dh, dW, db)`` at once: ``dh = g W``,
    ``dW += g^T h[chunk]``, ``db += sum_rows g``. ``reuse_blocks``: the logits of float32 heads
    are written into one ``(chunk_size, V)`` block per head, reused from chunk to chunk (a fresh
    block a chunk costs its page faults on CPU). ``rows_read``: None, or the count of the rows
    read, which come first (``projected_rows``), a 0-dim device tensor: every product is then a
    ``counted_matmul`` that skips the other rows (their logits are 0). Returns the chunks'
    ``terms``, a list."""
    blocks = [_chunk_block(head, chunk_size) if reuse_blocks and head[0].dtype == torch.float32
              else None for head in heads]
    terms = []
    for chunk in _chunks(rows, chunk_size):
        logits = [_logits(head, chunk, block, upcast, rows_read)
                  for head, block in zip(heads, blocks)]
        part, logit_grads = chunk_function(chunk, *logits)
        del logits  # fresh logits are freed before the products of the fold-back
        for grad_logits, head, head_grads in zip(logit_grads, heads, grads):
            if grad_logits is not None:
                _fold_back(grad_logits, head, head_grads, chunk, rows_read)
        terms.append(part)
    return terms


def projected_rows(labels, ignore_index, counted, *row_tensors):
    """``(rows_read, labels, *row_tensors)`` (``(N, ...)`` each, or None) arranged so that no
    product forms a row the loss does not read (label ``ignore_index``); the gradients reach the
    given rows through the selection. On CPU the rows read alone (their count is free there;
    ``rows_read`` None); elsewhere, for the Triton kernels (``counted``, not while compiling),
    the rows read first, in order (a stable sort on the device), ``rows_read`` their count, a
    0-dim device tensor for ``chunk_loop``'s counted products (no synchronisation); else every
    row projected (``rows_read`` None), the others zeroed, so that nothing of theirs (a NaN
    hidden state of a padding token) meets their zero gradient in a product. Without labels:
    as given."""
    if labels is None:
        return (None, labels, *row_tensors)
    kept = labels != ignore_index
    if check.host_reads_free(labels.device):
        if bool(kept.all()) or not bool(kept.any()):
            return (None, labels, *row_tensors)
        index = kept.nonzero().squeeze(1)
        rows_read = None
    elif counted and not torch.compiler.is_compiling():
        index = torch.argsort(kept.logical_not().to(torch.uint8), stable=True)
        rows_read = kept.sum()
    else:
        return (None, labels, *(None if x is None else
                                torch.where(kept.reshape(-1, *(1,) * (x.dim() - 1)), x, 0)
                                for x in row_tensors))
    return (rows_read, *(None if x is None else x.index_select(0, index)
                         for x in (labels, *row_tensors)))


def _loss_and_gradients(student, teacher, labels, factor, plan, wanted, rows_read):
    """``(loss, [d student_hidden, d student_weight, d student_bias, d teacher_hidden,
    d teacher_weight, d teacher_bias])`` (None where not wanted; ``gradient_buffers``): per
    chunk the row statistics and, given the batch totals (``batch_totals``), the logits'
    gradients from the row ops, no autograd; ``rows_read`` as in ``chunk_loop``."""
    config = plan.config
    rows = student[0].shape[0]
    grads = gradient_buffers(student, wanted[:3]) + gradient_buffers(teacher, wanted[3:])
    need_ds, need_dt = any(wanted[:3]), any(wanted[3:])

    def row_inputs(chunk, s, t):
        return RowInputs(s, t, factor[chunk] if config.source == SOURCE_EXPLICIT else factor,
                         None if labels is None else labels[chunk])

    if need_ds or need_dt:
        totals = _rank_one_totals(teacher, labels, row_inputs, plan, rows_read)

    def chunk_rows(chunk, s, t):
        inputs = row_inputs(chunk, s, t)
        if not (need_ds or need_dt):
            return statistics(inputs, config)[0], ()
        stats, ds, dt = rows_with_gradients(inputs, totals, config, need_ds, need_dt, out=s)
        return stats, (ds if need_ds else None, dt if need_dt else None)

    stats = chunk_loop((student, teacher), (grads[:3], grads[3:]), rows, plan.chunk_size,
                       chunk_rows, reuse_blocks=True, rows_read=rows_read)
    return finish(torch.cat(stats), config)[0], grads


def rows_with_gradients(inputs, totals, config, need_ds, need_dt, out=None):
    """``(stats, ds, dt)`` of rows (``RowInputs``) given the batch totals their gradients need,
    for an incoming gradient of 1, no autograd: the row ops' statistics, then their gradients;
    on the plain-PyTorch path for GKL both in one pass over each row block while it is in cache,
    the student's gradient written into ``out`` (``(B, C)``, maybe the student's logits
    themselves: each block is written once it is read); for the JSD in one pass too."""
    if config.source == SOURCE_JSD and not config.use_triton:
        return jsd_row_stats_torch(inputs.student, inputs.teacher, inputs.labels, config, totals,
                                   need_ds, out)
    if config.use_triton:
        stats = statistics(inputs, config)[0]
        one = stats.new_ones(())
        state = RowState(inputs, stats, totals, one.new_empty(0), one.new_empty(0))
        return (stats, *gradients(one, state, config, need_ds, need_dt))
    return row_stats_and_gradients_torch(*inputs, totals, config, need_ds, need_dt, out)


def _rank_one_totals(teacher, labels, row_inputs, plan, rows_read):
    """``fused_linear_gkl``'s ``batch_totals``, its weights from the teacher's logits (one more
    teacher product per chunk; ``rows_read`` as in ``chunk_loop``) or from the factor alone."""
    config = plan.config
    rows = teacher[0].shape[0]
    kept = kept_row_count(None if labels is None else labels == config.ignore_index, rows,
                          teacher[0].device)
    if config.source == SOURCE_TEACHER:
        return batch_totals(config, kept, rows, plan.chunk_size,
                            lambda chunk, t: row_inputs(chunk, t, t), (teacher,), rows_read)

    def factor_inputs(chunk):  # the weights need no logits: a zero row read through stride 0
        zero = kept.new_zeros(()).expand(chunk.stop - chunk.start, plan.vocabulary)
        return row_inputs(chunk, zero, zero)

    return batch_totals(config, kept, rows, plan.chunk_size, factor_inputs)


def batch_totals(config, kept_rows, rows, chunk_size, weight_inputs, heads=(), rows_read=None):
    """The one normaliser of the fused losses: the batch totals ``(NUM_TOTALS,)`` their gradients
    need before the first chunk's, ``R`` = ``kept_rows`` (``kept_row_count``) and
    ``N = DEN 2^(2K) = sum_b W_b^2`` over the kept rows: ``R`` for ``normalize="batch"``, without
    a wMSE and for teacher weights at ``gamma = 1`` (each row's weights sum to 1); else from the
    row op's weights-only statistics of the ``rows`` rows, chunk by chunk
    (``weight_inputs(chunk, *logits) -> RowInputs``, the logits of ``heads``; ``rows_read`` as
    in ``chunk_loop``)."""
    totals = kept_rows.new_zeros(NUM_TOTALS)
    if config.normalize_batch or not config.with_wmse or (
            config.source == SOURCE_TEACHER and config.gamma == 1.0):
        totals[TOTAL_DEN] = kept_rows
    else:
        weights_only = replace(config, ce_weight=0.0)

        def chunk_stats(chunk, *logits):
            return statistics(weight_inputs(chunk, *logits), weights_only)[0], ()

        stats = chunk_loop(heads, (), rows, chunk_size, chunk_stats, rows_read=rows_read)
        totals = finish(torch.cat(stats), weights_only)[1]
    totals[TOTAL_ROWS] = kept_rows
    return totals


def normaliser_shares(totals):
    """``(1 / N, 1 / R)`` (0-dim) of ``batch_totals``: ``N = DEN 2^(2K)``, ``1 / N = 0`` for
    ``N = 0``."""
    return safe_ratio(torch.exp2(-2.0 * totals[TOTAL_K]), totals[TOTAL_DEN]), \
        1.0 / totals[TOTAL_ROWS]


def default_chunk_size(vocabulary, device_type="cpu", in_row_blocks=False,
                       half_precision=False):
    """The largest power of two of rows with ``rows * vocabulary <= CHUNK_ELEMENTS`` (CUDA:
    ``GPU_CHUNK_ELEMENTS``; on CPU ``in_row_blocks``, the chunk's logits read a row block at a
    time, no float32 copy of the chunk: ``ROW_BLOCK_CHUNK_ELEMENTS``, or for
    ``half_precision`` logits ``HALF_PRECISION_ROW_BLOCK_CHUNK`` rows), at least 1."""
    if device_type != "cuda" and in_row_blocks and half_precision:
        return HALF_PRECISION_ROW_BLOCK_CHUNK
    elements = GPU_CHUNK_ELEMENTS if device_type == "cuda" else \
        ROW_BLOCK_CHUNK_ELEMENTS if in_row_blocks else CHUNK_ELEMENTS
    return 1 << max(0, (elements // vocabulary).bit_length() - 1)


def _chunks(rows, chunk_size):
    return [slice(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]


def _chunk_block(linear, chunk_size):
    """An uninitialised float32 ``(chunk_size, V)`` block for the logits of ``(h, W, b)``."""
    hidden, weight, _ = linear
    return hidden.new_empty(min(chunk_size, hidden.shape[0]), weight.shape[0],
                            dtype=torch.float32)


def _logits(linear, chunk, block=None, upcast=True, rows_read=None):
    """``h[chunk] W^T (+ b)`` in the inputs' dtype, returned in float32 (``upcast``) or in that
    dtype, (c, V); written into the first rows of ``block`` when given (float32 inputs); with
    ``rows_read`` (``chunk_loop``) from the counted product, float32 sums written once."""
    hidden, weight, bias = linear
    if rows_read is not None:
        from gkl_kernels.core.counted_matmul import counted_matmul
        out = block[:chunk.stop - chunk.start] if block is not None else hidden.new_empty(
            chunk.stop - chunk.start, weight.shape[0],
            dtype=torch.float32 if upcast else hidden.dtype)
        return counted_matmul(hidden[chunk], weight.t(), out, rows_read, chunk.start, "rows",
                              bias)
    if block is None:
        logits = F.linear(hidden[chunk], weight, bias)
        return logits.float() if upcast else logits
    out = block[:chunk.stop - chunk.start]
    if bias is None:
        return torch.mm(hidden[chunk], weight.t(), out=out)
    return torch.addmm(bias, hidden[chunk], weight.t(), out=out)


def gradient_buffers(head, wanted):
    """Zero gradients of a head ``(h, W, b)`` where ``wanted`` (else None): the hidden states' in
    their dtype (each row is written once, by one chunk), the weight's and bias's in float32
    (every chunk adds to them)."""
    return [None if x is None or not w else
            torch.zeros(x.shape, dtype=x.dtype if index == 0 else torch.float32, device=x.device)
            for index, (x, w) in enumerate(zip(head, wanted))]


def _fold_back(grad_logits, linear, grads, chunk, rows_read=None):
    """Add a chunk's logit gradient ``g`` (c, V) to the gradients of ``(h, W, b)``: ``dh = g W``,
    ``dW += g^T h[chunk]``, ``db += sum_rows g`` (products in the inputs' dtype, ``dW`` summed in
    float32; with ``rows_read`` (``chunk_loop``) the counted products)."""
    hidden, weight, _ = linear
    grad_hidden, grad_weight, grad_bias = grads
    g = grad_logits.to(hidden.dtype)
    if rows_read is not None:
        from gkl_kernels.core.counted_matmul import counted_matmul
        if grad_hidden is not None:
            counted_matmul(g, weight, grad_hidden[chunk], rows_read, chunk.start, "rows")
        if grad_weight is not None:
            counted_matmul(g.t(), hidden[chunk], grad_weight, rows_read, chunk.start,
                           "reduction", accumulate=True)
    else:
        if grad_hidden is not None:  # in the hidden states' dtype (gradient_buffers)
            torch.mm(g, weight, out=grad_hidden[chunk])
        if grad_weight is not None and grad_weight.dtype == g.dtype:
            grad_weight.addmm_(g.t(), hidden[chunk])
        elif grad_weight is not None:  # a half-precision product, summed in float32
            grad_weight += g.t() @ hidden[chunk]
    if grad_bias is not None:
        grad_bias += grad_logits.sum(dim=0)


def options_from(gkl_options):
    """A checked ``GKLOptions`` from ``gkl_loss``'s keyword options (``sync_normalizer``,
    ``process_group`` and ``reduction`` are not for this loss: one process's mean loss)."""
    for name in UNSUPPORTED_OPTIONS:
        if name in gkl_options:
            raise ValueError(f"fused_linear_gkl does not support {name}: it computes one "
                             f"process's mean loss")
    if "beta" in gkl_options:
        raise TypeError("beta is the generalized JSD's option (jsd_loss); the GKL loss has none")
    try:
        return GKLOptions(**gkl_options)
    except TypeError as error:
        raise TypeError(f"fused_linear_gkl got an unknown option: {error}") from None


def _checked_plan(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                  teacher_bias, labels, class_prior, weights, chunk_size, teacher_grad,
                  options, jsd=False):
    """Check every argument (before any product runs) and return the ``FusedLinearPlan`` of the
    GKL loss under ``options`` or (``jsd``) of the generalized JSD."""
    check.check_chunk_size(chunk_size)
    check.check_bool("teacher_grad", teacher_grad)
    rows, vocabulary = check.check_linear("student", student_hidden, student_weight, student_bias)
    teacher_shape = check.check_linear("teacher", teacher_hidden, teacher_weight, teacher_bias)
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
    use_triton = check.use_triton_for(options.backend, device)
    if jsd:
        config = options.jsd_config(labels is not None, use_triton)
    else:
        config = options.row_config(
            _checked_weight_source(weights, class_prior, labels, rows, vocabulary, device,
                                   options), labels is not None, use_triton)
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
