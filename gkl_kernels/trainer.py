"""``FusedLinearDistillationLoss``: language-model distillation from hidden states, in the
interface of Liger-Kernel's fused linear distillation losses (which TRL's former GKD trainer and
trainers that followed it, such as ms-swift, call; TRL's ``DistillationTrainer`` takes it through
``integrations.trl``), and ``FusedLinearJSDLoss``, Liger's JSD loss as a drop-in:
``loss(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
teacher_bias)``.

Per token ``b`` (rows of ``(..., H)`` inputs), with each model's logits transformed by its own
``z -> cap tanh(scale z / cap)`` (its logit scale, then its final-logit softcap, as TRL's
``DistillationTrainer`` reads them from each model's config; each optional, gradients through
both),

    hard_b = CE(student_b, label_b)              soft_b = mse_weight wmse_b / 4 + ce_weight CE_b
    loss   = (weight_hard_loss sum_b hard_b + weight_soft_loss sum_b soft_b) / normaliser

where ``soft_b`` is ``gkl_loss``'s per-row loss (``reduction="none"``, teacher weights by
default), or with ``divergence="jsd"`` the row's generalized JSD (``jsd_loss``), the sums run
over the tokens whose label is not ``ignore_index``, and the normaliser is
``num_items_in_batch`` when given (a tensor or a number: the global token count of a
gradient-accumulation step or of all data-parallel processes; no host synchronisation) or the
local count of those tokens. With teacher weights at ``gamma = 1`` each token's weights sum to 1,
so the soft term is ``gkl_loss``'s mean loss, rescaled by the normaliser. A teacher vocabulary
larger than the student's (padding tokens beyond it) is cut to the student's: the teacher's
softmax is taken over the shared vocabulary. Chunk by chunk of tokens, as ``fused_linear_gkl``:
the ``(N, V)`` logits never exist, each chunk's gradient is formed without autograd (the soft
rows' from the row ops, the hard cross-entropy's ``softmax - onehot``, then the transforms'
chain rule); the teacher is a constant.
"""

import copy
from dataclasses import replace
from functools import lru_cache
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from gkl_kernels import validation as check
from gkl_kernels.core.config import SOURCE_TEACHER
from gkl_kernels.distributed import whole
from gkl_kernels.fused_linear import (ChunkedLoss, chunk_loop, default_chunk_size,
                                      gradient_buffers, options_from, projected_rows,
                                      rows_with_gradients, sparse_teacher_rows)
from gkl_kernels.options import GKL_ONLY_OPTIONS
from gkl_kernels.rank1.torch_impl import (block_rows, finite_ref, row_losses_torch, row_sum,
                                          scratch_and_blocks)
from gkl_kernels.row_ops import RowInputs, statistics
from gkl_kernels.rows import per_row_totals
from gkl_kernels.sparse_teacher import (SparseTeacher, kept_row_count,
                                        sparse_share_and_gradient)
from gkl_kernels.validation import Divergence


class FusedLinearDistillationLoss(nn.Module):
    """Hard cross-entropy plus GKL (or generalized JSD) distillation from the last hidden states
    and output layers.

    Args:
        weight_hard_loss: factor of the hard-label cross-entropy.
        weight_soft_loss: factor of the GKL (soft) term.
        temperature: ``T`` of the GKL cross-entropy (the hard term has none).
        ignore_index: label of the tokens left out (padding, prompt).
        logit_scale: multiply both models' logits by it first (None: 1).
        final_logit_softcapping: ``cap tanh(z / cap)`` on both models' logits (None: off).
        student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
            teacher_final_logit_softcapping: one model's own (TRL's names), in place of the
            shared value (giving both for one model is an error).
        return_components: also return the soft and hard terms (each divided by the normaliser,
            not weighted).
        chunk_size: tokens per chunk (None: on CPU with the plain-PyTorch rows 512 for
            half-precision heads, else the largest power of two with ``chunk_size * V <=
            2**25``; ``2**23`` under the Triton interpreter, on CUDA ``2**26``).
        divergence: the soft term: ``"gkl"`` (the GKL loss per token) or ``"jsd"`` (the
            generalized JSD of ``jsd_loss``, TRL's and Liger-Kernel's).
        beta: ``divergence="jsd"``'s mixture weight (None: 0.5; 0 forward KL, 1 reverse KL); an
            error with ``"gkl"``.
        return_soft_hard_loss: Liger-Kernel's name of ``return_components`` (None: not given).
        compiled: on CPU with the plain-PyTorch rows, run each full row block through
            ``torch.compile`` (inductor fuses the block's passes; needs a C++ compiler, as
            Liger-Kernel's ``compiled=True``; the first call compiles, once per vocabulary
            size and options); other blocks, and the Triton kernels, as without.
        **gkl_options: ``gkl_loss`` options of the soft term: ``gamma``, ``weight_temperature``,
            ``mse_weight``, ``ce_weight``, ``symmetric`` (GKL only), ``backend``,
            ``check_values``, ``block_c``.
    """

    def __init__(self, *, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5,
                 temperature: float = 1.0, ignore_index: int = -100,
                 logit_scale: Optional[float] = None,
                 final_logit_softcapping: Optional[float] = None,
                 student_logit_scale: Optional[float] = None,
                 teacher_logit_scale: Optional[float] = None,
                 student_final_logit_softcapping: Optional[float] = None,
                 teacher_final_logit_softcapping: Optional[float] = None,
                 return_components: bool = False, chunk_size: Optional[int] = None,
                 divergence: Divergence = "gkl", beta: Optional[float] = None,
                 return_soft_hard_loss: Optional[bool] = None, compiled: bool = False,
                 **gkl_options: Any) -> None:
        super().__init__()
        check.check_bool("compiled", compiled)
        if return_soft_hard_loss is not None:  # Liger-Kernel's name of return_components
            check.check_bool("return_soft_hard_loss", return_soft_hard_loss)
            if return_components and not return_soft_hard_loss:
                raise ValueError("return_soft_hard_loss=False contradicts return_components=True "
                                 "(the same option: give one)")
            return_components = return_soft_hard_loss
        self.compiled = compiled
        for name in ("reduction", "normalize"):  # the soft term is a per-token sum here
            if name in gkl_options:
                raise TypeError(f"{name} is not a gkl_options entry here: the soft term is the "
                                f"per-token GKL summed and divided by the normaliser")
        check.check_choice("divergence", divergence, check.DIVERGENCES)
        if divergence == "gkl" and beta is not None:
            raise ValueError("beta is the generalized JSD's mixture weight: give it with "
                             "divergence='jsd' (the GKL loss has none)")
        gkl_only = sorted(set(gkl_options) & set(GKL_ONLY_OPTIONS))
        if divergence == "jsd" and gkl_only:
            raise ValueError(f"{', '.join(gkl_only)}: GKL options, not the generalized JSD's "
                             f"(divergence='jsd' takes beta and temperature)")
        self.divergence = divergence
        self.weight_hard_loss = check.check_finite("weight_hard_loss", weight_hard_loss)
        self.weight_soft_loss = check.check_finite("weight_soft_loss", weight_soft_loss)
        given = locals()
        self.student_transform, self.teacher_transform = (
            LogitTransform(*(_model_value(given, model, name)
                             for name in ("logit_scale", "final_logit_softcapping")))
            for model in ("student", "teacher"))
        check.check_bool("return_components", return_components)
        check.check_chunk_size(chunk_size)
        self.return_components, self.chunk_size = return_components, chunk_size
        self.options = replace(options_from(gkl_options), temperature=temperature,
                               ignore_index=ignore_index, reduction="none",
                               beta=0.5 if beta is None else check.check_fraction("beta", beta))

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                teacher_weight: Tensor, true_labels: Optional[Tensor] = None,
                student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                num_items_in_batch: Optional[Union[Tensor, int, float]] = None
                ) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The loss (and, with ``return_components``, ``(loss, soft, hard)``), float32 0-dim.

        Args:
            student_input, student_weight, student_bias: ``(..., H_s)``, ``(V, H_s)``, ``(V,)``.
            teacher_input, teacher_weight, teacher_bias: ``(..., H_t)``, ``(V_t, H_t)``,
                ``(V_t,)`` with ``V_t >= V`` (cut to the student's ``V``); or a
                ``SparseTeacher`` ``(..., k)`` (its cached top-k classes; the weight and bias
                None), each ``rest`` as in ``gkl_loss`` and ``jsd_loss``.
            true_labels: ``(...)`` next-token labels (``ignore_index`` where left out); None:
                every token counts and the hard term is 0.
            num_items_in_batch: the normaliser (tensor or number); None: the local count.

        Returns:
            The loss, or ``(loss, soft, hard)``.
        """
        lead = student_input.shape[:-1] if isinstance(student_input, Tensor) else None
        student_hidden = _rows(student_input)
        student_weight, student_bias = (_gathered(x, student_hidden)
                                        for x in (student_weight, student_bias))
        rows, vocabulary = check.check_linear("student", student_hidden, student_weight,
                                              student_bias)
        sparse = isinstance(teacher_input, SparseTeacher)
        if sparse:
            if teacher_weight is not None or teacher_bias is not None:
                raise ValueError("a SparseTeacher teacher_input needs teacher_weight=None and "
                                 "teacher_bias=None (the cache holds the teacher's values)")
        else:
            teacher_hidden = _rows(teacher_input)
            teacher_weight, teacher_bias = (_gathered(x, teacher_hidden)
                                            for x in (teacher_weight, teacher_bias))
            teacher_rows, teacher_vocabulary = check.check_linear(
                "teacher", teacher_hidden, teacher_weight, teacher_bias)
            if teacher_vocabulary < vocabulary:
                raise ValueError(f"teacher_weight must have at least the student's V = "
                                 f"{vocabulary} rows, got {teacher_vocabulary}")
            if teacher_rows != rows:
                raise ValueError(f"teacher_input must have the student's {rows} tokens, got "
                                 f"{teacher_rows}")
        device = student_hidden.device
        labels = None
        if true_labels is not None:
            if not isinstance(true_labels, Tensor) or true_labels.shape != lead:
                raise ValueError(f"true_labels must be a tensor of the inputs' leading shape "
                                 f"{tuple(lead)}, got "
                                 f"{getattr(true_labels, 'shape', type(true_labels).__name__)}")
            labels = true_labels.reshape(-1)
            check.check_labels(labels, rows, vocabulary, device, self.options.check_values,
                               self.options.ignore_index)
        if sparse:
            return self._sparse_teacher_loss((student_hidden, student_weight, student_bias),
                                             _cache_rows(teacher_input, lead), labels,
                                             num_items_in_batch, vocabulary)
        use_triton = check.use_triton_for(self.options.backend, device)
        rows_read, labels, student_hidden, teacher_hidden = projected_rows(
            labels, self.options.ignore_index, use_triton, student_hidden, teacher_hidden)
        rows = student_hidden.shape[0]
        teacher = (teacher_hidden.detach(), teacher_weight[:vocabulary].detach(),
                   None if teacher_bias is None else teacher_bias[:vocabulary].detach())
        normaliser = self._normaliser(num_items_in_batch, labels, rows, device)
        config = self.options.jsd_config(labels is not None, use_triton) \
            if self.divergence == "jsd" else \
            self.options.row_config(SOURCE_TEACHER, labels is not None, use_triton)
        student = (student_hidden, student_weight, student_bias)
        # the plain-PyTorch rows on CPU read any chunk a row block at a time (_chunk_terms)
        chunk_size = self.chunk_size or default_chunk_size(
            vocabulary, device.type, device.type == "cpu" and not use_triton,
            student_hidden.dtype != torch.float32)
        per_row = per_row_totals(normaliser)  # the soft rows' sum

        def chunk_function(need_ds):
            def chunk_terms(chunk, s, t):
                return self._chunk_terms(s, t, None if labels is None else labels[chunk],
                                         normaliser, config, per_row, need_ds)
            return chunk_terms

        return self._chunked((student, teacher), rows, chunk_size, chunk_function, rows_read,
                             reuse_blocks=True, upcast=False)

    def _chunked(self, heads, rows, chunk_size, chunk_function, rows_read, **loop_options):
        """The loss (``return_components``: ``(loss, soft, hard)``) of the student's head
        ``heads[0]`` through ``ChunkedLoss``: ``chunk_loop`` over ``heads`` with
        ``chunk_function(need_ds)``'s per-chunk terms ``[loss, soft, hard]`` and student logit
        gradient, summed."""
        student = heads[0]

        def loss_and_gradients(wanted):
            grads = gradient_buffers(student, wanted)
            terms = chunk_loop(heads, (grads,), rows, chunk_size,
                               chunk_function(any(g is not None for g in grads)),
                               rows_read=rows_read, **loop_options)
            return tuple(total.clone() for total in sum(terms)), grads

        loss, soft, hard = ChunkedLoss.apply(loss_and_gradients, *student)
        return (loss, soft, hard) if self.return_components else loss

    def _sparse_teacher_loss(self, student, teacher, labels, num_items, vocabulary):
        """The loss of the student's head ``(h, W, b)`` (checked, ``(N, H)`` rows) against a
        ``SparseTeacher`` ``(N, k)``: per chunk the transformed logits' hard cross-entropy and
        the soft rows on the cache's compact rows (``sparse_share_and_gradient``), each summed
        and divided by the normaliser, the gradient formed by hand as for a dense teacher."""
        options = self.options
        jsd = self.divergence == "jsd"
        device = student[0].device
        use_triton = check.use_triton_for(options.backend, device)
        student, labels, compact, rows_read = sparse_teacher_rows(
            student, teacher, labels, None, None, vocabulary, options, use_triton, jsd)
        rows = student[0].shape[0]
        normaliser = self._normaliser(num_items, labels, rows, device)
        one = normaliser.new_ones(())
        shares = (one, one)  # the soft rows' sum (_terms_and_gradient divides it)
        chunk_size = self.chunk_size or default_chunk_size(vocabulary, device.type)

        def chunk_function(need_ds):
            def chunk_terms(chunk, logits):
                def soft_rows(s):
                    return sparse_share_and_gradient(s, compact.part(chunk), options,
                                                     use_triton, shares, jsd, need_ds)

                terms, ds = self._terms_and_gradient(
                    logits, None if labels is None else labels[chunk], normaliser, need_ds,
                    soft_rows)
                return terms, (ds,)
            return chunk_terms

        return self._chunked((student,), rows, chunk_size, chunk_function, rows_read)

    def _normaliser(self, num_items, labels, rows, device):
        """The token count the sums are divided by: ``num_items_in_batch`` or the local one."""
        if num_items is None:
            return kept_row_count(None if labels is None else labels == self.options.ignore_index,
                                  rows, device)
        if isinstance(num_items, Tensor):
            if num_items.numel() != 1 or num_items.device != device:
                raise ValueError(f"num_items_in_batch must be one number on {device}, got shape "
                                 f"{tuple(num_items.shape)} on {num_items.device}")
            count = num_items.detach().reshape(()).float()
            if check.values_checked(self.options.check_values):
                check.assert_values(count > 0, "num_items_in_batch must be > 0")
            return count
        return torch.tensor(check.check_positive("num_items_in_batch", num_items), device=device)

    def _chunk_terms(self, s, t, labels, normaliser, config, per_row, need_ds):
        """``([loss, soft, hard], (ds,))`` of one chunk of tokens (each sum divided by the
        normaliser) and, when ``need_ds``, the loss's gradient with respect to the student's raw
        logits ``s`` (written into ``s``'s memory), no autograd. For the plain-PyTorch rows on CPU
        row block by row block (``_block_terms``; half-precision logits converted a block at a
        time, in cache); for the Triton rows, or on a GPU, the chunk at once."""
        if config.use_triton or s.device.type != "cpu":
            terms, ds = self._block_terms(s, t, labels, normaliser, config, per_row, need_ds)
            return terms, (ds,)
        terms = 0
        scratch, blocks = scratch_and_blocks(s, torch.float32, pool="trainer")
        compiled = self.compiled and not torch.compiler.is_compiling()
        full = block_rows(s.shape[1])
        for block in blocks:
            rows = s[block]
            args = (rows, t[block], None if labels is None else labels[block], normaliser, config,
                    per_row, need_ds)
            if compiled and rows.shape[0] == full:  # one shape per vocabulary: one compilation
                part, ds = _compiled_block_terms()(self, *args)
            else:
                part, ds = self._block_terms(*args, scratch)
            if ds is not None and ds is not rows:
                rows.copy_(ds)
            terms = terms + part
        return terms, (s if need_ds else None,)

    def _block_terms(self, s, t, labels, normaliser, config, per_row, need_ds, scratch=None):
        """``([loss, soft, hard], ds)`` of a block of rows and, when ``need_ds`` (else None), its
        gradient, float32, in ``s``'s memory where ``s`` is float32: the soft rows and their
        gradient from the row ops under ``config`` (``per_row`` totals), the hard
        cross-entropy's by hand, then the chain rule of the logit transforms, in float32;
        temporaries in ``scratch`` (None: fresh)."""
        rows = s.shape[0]

        def as_float(x, name):
            if x.dtype == torch.float32:
                return x
            return x.float() if scratch is None else scratch.floats(name, rows).copy_(x)

        raw = as_float(s, "student")
        teacher = self.teacher_transform.apply(as_float(t, "teacher"))

        def soft_rows(student):
            inputs = RowInputs(student, teacher, None, labels)
            if not need_ds:
                return row_losses_torch(statistics(inputs, config)[0], config).sum(), None
            # the raw logits are not read again: the gradient goes there (compiled: a new
            # tensor, the graph's inputs are not written)
            stats, ds, _ = rows_with_gradients(
                inputs, per_row, config, True, False,
                out=None if torch.compiler.is_compiling() else raw)
            return row_losses_torch(stats, config).sum(), ds

        return self._terms_and_gradient(raw, labels, normaliser, need_ds, soft_rows,
                                        None if scratch is None else scratch.floats("hard", rows))

    def _terms_and_gradient(self, raw, labels, normaliser, need_ds, soft_rows, hard_out=None):
        """``([loss, soft, hard], ds)`` of the student's raw float32 logits ``(B, V)`` (each sum
        divided by the normaliser) and, when ``need_ds``, the loss's gradient with respect to
        them (else None), no autograd: the student's transform, the hard cross-entropy and its
        gradient by hand (in ``hard_out`` where given), ``soft_rows(student) -> (the soft rows'
        sum, its gradient or None)`` on the transformed logits, then the transform's chain
        rule."""
        student = self.student_transform.apply(raw)
        hard, hard_grad = _cross_entropy_sum(
            student, labels, self.options.ignore_index, need_ds and self.weight_hard_loss != 0,
            hard_out)
        soft, ds = soft_rows(student)
        if ds is not None:
            ds.mul_(self.weight_soft_loss / normaliser)
            if hard_grad is not None:
                ds.addcmul_(hard_grad, self.weight_hard_loss / normaliser)
            self.student_transform.chain(ds, student)
        soft, hard = soft / normaliser, hard / normaliser
        return torch.stack([self.weight_soft_loss * soft + self.weight_hard_loss * hard, soft,
                            hard]), ds

    def with_logit_transforms(self, student: "LogitTransform",
                              teacher: "LogitTransform") -> "FusedLinearDistillationLoss":
        """This loss (its options shared) with each model's logit transform replaced, for a caller
        that reads them from the models at call time (``integrations.trl``).

        Args:
            student, teacher: each model's ``LogitTransform`` (``scale``, ``cap``; None: off).

        Returns:
            A shallow copy of this module.
        """
        configured = copy.copy(self)
        configured.student_transform, configured.teacher_transform = student, teacher
        return configured

    def extra_repr(self) -> str:
        divergence = f"divergence={self.divergence!r}" + (
            f", beta={self.options.beta}" if self.divergence == "jsd" else "")
        return (f"{divergence}, weight_hard_loss={self.weight_hard_loss}, "
                f"weight_soft_loss={self.weight_soft_loss}, "
                f"student_transform={self.student_transform}, "
                f"teacher_transform={self.teacher_transform}, "
                f"return_components={self.return_components}, chunk_size={self.chunk_size}, "
                f"temperature={self.options.temperature}, "
                f"ignore_index={self.options.ignore_index}")


class LogitTransform(NamedTuple):
    """One model's ``z -> cap tanh(scale z / cap)`` (``scale``, ``cap``: None for off)."""

    scale: Optional[float] = None
    cap: Optional[float] = None

    def apply(self, logits):
        """The transformed logits (a new tensor where anything applies)."""
        if self.scale is not None:
            logits = logits * self.scale
        if self.cap is not None:
            logits = self.cap * torch.tanh(logits / self.cap)
        return logits

    def chain(self, grad, transformed):
        """``grad`` (w.r.t. the ``transformed`` logits) times the transform's derivative, in
        place: ``d cap tanh(z / cap) = 1 - tanh^2 = 1 - (transformed / cap)^2``, then
        ``scale``."""
        if self.cap is not None:
            grad.mul_(1.0 - (transformed / self.cap).square_())
        if self.scale is not None:
            grad.mul_(self.scale)


@lru_cache(maxsize=None)
def _compiled_block_terms():
    """``FusedLinearDistillationLoss._block_terms`` under ``torch.compile`` (inductor: a row
    block's passes fused into a few loops), made at first use."""
    return torch.compile(FusedLinearDistillationLoss._block_terms, dynamic=False)


def _model_value(given, model, name):
    """The ``model``'s own ``{model}_{name}`` or the shared ``name`` among the constructor's
    arguments ``given`` (checked > 0; None where neither is given)."""
    own, shared = given[f"{model}_{name}"], given[name]
    if own is not None and shared is not None:
        raise ValueError(f"give {name} (both models) or {model}_{name}, not both")
    value = own if own is not None else shared
    label = f"{model}_{name}" if own is not None else name
    return None if value is None else check.check_positive(label, value)


def _cross_entropy_sum(logits, labels, ignore_index, need_grad, out=None):
    """``(sum of CE_b, its gradient or None)`` over the rows not labelled ``ignore_index``
    (``F.cross_entropy(..., reduction="sum")``): ``CE_b = logsumexp(z_b) - z_b[label_b]``, the
    gradient ``softmax(z_b) - onehot(label_b)`` on those rows, 0 on the others (not read), in
    ``out`` where given."""
    if labels is None:
        return logits.new_zeros(()), None
    kept = labels != ignore_index
    picked = torch.where(kept, labels, 0)[:, None]
    top = finite_ref(logits.amax(dim=1, keepdim=True))
    e = torch.sub(logits, top, out=out).exp_()
    z = row_sum(e)[:, None]
    rows = torch.where(kept, (top + z.log() - logits.gather(1, picked))[:, 0], 0.0)
    if not need_grad:
        return rows.sum(), None
    grad = e.div_(z).scatter_add_(1, picked, e.new_full(picked.shape, -1.0))
    return rows.sum(), grad.masked_fill_(~kept[:, None], 0.0)


def _cache_rows(teacher, lead):
    """A ``SparseTeacher`` of the tokens ``lead`` as ``(N, k)`` rows (other shapes as given, for
    the checks)."""
    if isinstance(teacher.indices, Tensor) and lead is not None and len(lead) > 1 and \
            teacher.indices.shape[:-1] == lead and isinstance(teacher.values, Tensor):
        top = teacher.indices.shape[-1]
        return replace(teacher, indices=teacher.indices.reshape(-1, top),
                       values=teacher.values.reshape(-1, teacher.values.shape[-1]))
    return teacher


def _gathered(x, hidden):
    """An FSDP2-sharded head's weight or bias (a ``DTensor``) as the whole tensor in the hidden
    states' dtype (FSDP's mixed precision keeps float32 shards), gathered once per call; other
    inputs as given."""
    return whole(x, hidden.dtype) if isinstance(hidden, Tensor) else x


def _rows(hidden):
    """Hidden states ``(..., H)`` as ``(N, H)`` rows (other inputs as given, for the checks)."""
    if isinstance(hidden, Tensor) and hidden.dim() > 2:
        return hidden.reshape(-1, hidden.shape[-1])
    return hidden


class FusedLinearJSDLoss(FusedLinearDistillationLoss):
    """Liger-Kernel's ``LigerFusedLinearJSDLoss``, as a drop-in: its constructor (names, order,
    defaults) and call, the hard cross-entropy plus the generalized JSD (``jsd_loss``) from the
    hidden states, each summed over the tokens not labelled ``ignore_index`` and divided by
    their count. ``FusedLinearDistillationLoss(divergence="jsd", ...)`` with Liger's defaults.

    Args:
        weight_hard_loss, weight_soft_loss: the two terms' factors.
        beta: the mixture weight (0: forward KL, 1: reverse KL).
        ignore_index: the label of the tokens left out.
        temperature: divides both models' logits in the soft term.
        compiled: ``torch.compile`` the row blocks on CPU (``FusedLinearDistillationLoss``).
        chunk_size: tokens per chunk (Liger splits the ``N`` tokens into ``N // chunk_size``
            chunks of about equal size; here every chunk but the last has ``chunk_size``).
        return_soft_hard_loss: also return the soft and hard terms.
    """

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5,
                 beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False) -> None:
        super().__init__(weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss,
                         temperature=temperature, ignore_index=ignore_index,
                         chunk_size=chunk_size, divergence="jsd", beta=beta,
                         return_soft_hard_loss=return_soft_hard_loss, compiled=compiled)
