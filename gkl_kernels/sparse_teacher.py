"""A teacher cached as its top-k classes (offline distillation): indices ``(..., k)`` and values
``(..., k)``, log-probabilities (or logits) at the temperature ``T_gen`` they were made at.

The loss runs on compact rows of ``k + 1`` columns, the cached classes and one "rest" column
that stands for every other class of the vocabulary (docs/MATH.md, "Sparse teacher"):

- teacher: ``t_j = T_gen x_j`` on the cached classes (a log-probability and a logit differ by a
  per-row constant, which the loss does not see), and on the rest column ``-inf`` (absent) or,
  with ``rest="rest"``, ``T_gen log(1 - sum_j exp(x_j))``, the mass the cache left out;
- student: its logits on the cached classes, and on the rest column ``T logsumexp(s_o / T)``
  over the other classes ``o``, so that the softmax over the ``k + 1`` columns at the
  cross-entropy's temperature ``T`` is the student's full-vocabulary softmax, grouped.

With that, ``rest`` decides how the teacher's mass outside the top-k enters:
``"renormalize"`` (the teacher's softmax over the cached classes; the wMSE over them),
``"drop"`` (the cross-entropy against the cached probabilities ``exp(x_j)`` as given, summing to
``m_b < 1``: ``m_b`` times the renormalised one), ``"rest"`` (one more class with the teacher's
``1 - m_b`` at ``T_gen`` and the student's mass outside, in the cross-entropy and the wMSE).
With ``k = C`` each is the dense loss. For the generalized JSD (``jsd_loss``,
``fused_linear_jsd_sparse``): ``"renormalize"`` is exactly the full-vocabulary JSD against the
renormalised cache (zero outside it: a class ``o`` outside adds ``(1 - beta) Q_o log(1 / (1 -
beta))``, linear in ``Q_o``, so the rest column carries their sum; reverse KL is infinite where
the student has mass outside); ``"rest"`` the JSD of both distributions grouped into the cached
classes and one class for the rest (at most the full one; equal where the teacher's rest is
spread as the student's); ``"drop"`` has no JSD (a ``ValueError``).

Only the ``(N, C)`` student is read in full (the rest column's log-sum-exp: one temporary of its
size); nothing else of size ``N x C`` exists.

``sparse_teacher_loss`` turns the compact rows into the loss (differentiated by autograd) for
``gkl_loss`` and ``jsd_loss``; ``sparse_share_and_gradient`` into a chunk's share of a batch's
loss with its gradient formed by hand, for ``fused_linear_gkl_sparse``, ``fused_linear_jsd_sparse``
and the trainer loss (no autograd inside their chunk loop). They are the one place that knows
what ``rest`` does to the loss; each entry point checks its inputs once, before calling them.
"""

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple, Optional, get_args

import torch
from torch import Tensor

from gkl_kernels import validation as check
from gkl_kernels.core.config import SOURCE_EXPLICIT, SOURCE_TEACHER
from gkl_kernels.rank1.torch_impl import row_losses_torch
from gkl_kernels.row_ops import RowInputs, RowState, statistics
from gkl_kernels.row_ops import gradients as row_gradients
from gkl_kernels.rows import MEAN, PER_ROW, RowLoss, SyncedMean, per_row_totals

TeacherRest = Literal["renormalize", "drop", "rest"]
TEACHER_RESTS = get_args(TeacherRest)
MASS_SLACK = 1e-3  # log-probabilities may sum to exp(1e-3) after rounding, not more


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher cached as its top-k classes, passed to ``gkl_loss`` as ``teacher``.

    Args:
        indices: ``(..., k)`` int64 / int32 classes, distinct in each row (rows the loss ignores
            may hold anything).
        values: ``(..., k)`` float log-probabilities ``log_softmax(t / T_gen)`` at ``indices``
            (or logits, with ``rest="renormalize"``).
        temperature: ``T_gen``, the temperature the values were made at.
        rest: the teacher's mass outside the top-k: ``"renormalize"``, ``"drop"`` or ``"rest"``
            (module docstring, docs/MATH.md).
    """

    indices: Tensor
    values: Tensor
    temperature: float = 1.0
    rest: TeacherRest = "renormalize"


def check_sparse_teacher(teacher, student, check_values, ignored=None, jsd=False):
    """Types, shapes, devices and options of a ``SparseTeacher`` for ``student`` ``(..., C)``
    (``jsd``: of the generalized JSD, which has no ``"drop"``);
    with ``check_values`` the indices in ``[0, C)`` and distinct per row, and (``"drop"``,
    ``"rest"``) log-probabilities whose mass is at most 1 on the rows not ``ignored`` (host reads
    on CPU, device-side assertions on CUDA)."""
    if not isinstance(teacher, SparseTeacher):
        raise TypeError(f"teacher must be a SparseTeacher here, got {type(teacher).__name__}")
    check.check_positive("teacher temperature", teacher.temperature)
    check.check_choice("rest", teacher.rest, TEACHER_RESTS)
    if jsd and teacher.rest == "drop":
        raise ValueError("rest='drop' scales the cross-entropy by the cached mass and has no "
                         "generalized JSD; give rest='renormalize' (the JSD against the "
                         "renormalised cache) or rest='rest' (the rest as one class)")
    indices, values = teacher.indices, teacher.values
    lead, num_classes = student.shape[:-1], student.shape[-1]
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise TypeError(f"teacher values must be a floating-point tensor (..., k), got "
                        f"{getattr(values, 'dtype', type(values).__name__)}")
    if values.dim() != student.dim() or values.shape[:-1] != lead:
        raise ValueError(f"teacher values must have shape (..., k) with the student's leading "
                         f"shape {tuple(lead)}, got {tuple(values.shape)}")
    top = values.shape[-1]
    if not 1 <= top <= num_classes:
        raise ValueError(f"teacher values must hold 1 to C = {num_classes} classes per row, got "
                         f"k = {top}")
    check.check_tensor("teacher indices", indices, values.shape, check.INDEX_DTYPES,
                       student.device)
    if values.device != student.device:
        raise ValueError(f"teacher values must be on {student.device} like the student, got "
                         f"{values.device}")
    if not check.values_checked(check_values) or indices.numel() == 0:
        return
    ordered = indices.sort(dim=-1).values
    check.assert_values(((ordered[..., 0] >= 0) & (ordered[..., -1] < num_classes)).all(),
                        f"teacher indices must lie in [0, {num_classes}), found one outside")
    check.assert_values((ordered[..., 1:] != ordered[..., :-1]).all(),
                        "teacher indices must be distinct in each row, found a repeated class")
    if teacher.rest != "renormalize":
        mass = values.detach().to(torch.promote_types(values.dtype, torch.float32)).logsumexp(-1)
        fits = mass <= MASS_SLACK
        check.assert_values((fits if ignored is None else fits | ignored).all(),
                            f"rest={teacher.rest!r} needs log-probabilities (their mass at most "
                            f"1), found a row whose exp sums above 1")


def compact_student(student, indices, temperature, ignored=None):
    """The student's ``(..., k + 1)`` compact logits: ``s`` at ``indices``, then the rest column
    ``T logsumexp(s_other / T)``; the gradient reaches ``student`` through both. ``ignored``
    ``(...)``: rows the loss does not read, whose logits (NaN, inf) reach no gradient."""
    return _student_parts(student, indices, temperature, ignored)[0]


def _student_parts(student, indices, temperature, ignored):
    """``(compact logits, others, log-sum-exp)`` of ``compact_student``: ``others`` ``(..., C)``
    is ``s / T`` with the cached classes at ``-inf`` (0 on the ``ignored`` rows, finite there so
    that no NaN meets their zero gradient), the log-sum-exp ``(..., 1)`` is over it."""
    indices = indices.long()
    cached = student.gather(-1, indices)
    others = (student / temperature).scatter_(-1, indices, float("-inf"))  # one (..., C) temp
    if ignored is not None:
        others = others.masked_fill_(ignored[..., None], 0.0)
    lse = others.logsumexp(dim=-1, keepdim=True)
    return torch.cat([cached, (temperature * lse).to(cached.dtype)], dim=-1), others, lse


def compact_teacher(teacher, num_classes, ignored=None):
    """``(teacher_rows, cached_mass)``: the teacher's ``(..., k + 1)`` compact logits (``T_gen
    x``, then the rest column: ``-inf``, or for ``"rest"`` ``T_gen log(1 - m_b)``; absent when
    ``k = num_classes``) and, for ``"drop"``, the mass ``m_b = sum_j exp(x_j)`` ``(...)`` (0 on
    ``ignored`` rows; else None)."""
    values = teacher.values
    scaled = teacher.temperature * values
    exact = torch.promote_types(values.dtype, torch.float32)
    mass = None
    if teacher.rest == "rest" and values.shape[-1] < num_classes:
        log_mass = values.to(exact).logsumexp(dim=-1, keepdim=True)
        outside = torch.where(log_mass < 0, torch.log(-torch.expm1(log_mass.clamp_max(0.0))),
                              float("-inf"))
        rest_logit = (teacher.temperature * outside).to(scaled.dtype)
    else:
        rest_logit = scaled.new_full((*scaled.shape[:-1], 1), float("-inf"))
        if teacher.rest == "drop":
            mass = values.detach().to(exact).logsumexp(dim=-1).exp()
            if ignored is not None:
                mass = mass.masked_fill(ignored, 0.0)
    return torch.cat([scaled, rest_logit], dim=-1), mass


def readable_indices(teacher, ignored):
    """``teacher`` with the indices of the ``ignored`` rows ``(...)`` (a cache may hold anything
    there) replaced by ``0 .. k-1``."""
    if ignored is None:
        return teacher
    indices = teacher.indices
    first = torch.arange(indices.shape[-1], device=indices.device, dtype=indices.dtype)
    return replace(teacher, indices=torch.where(ignored[..., None], first, indices))


def compact_factor(factor, indices):
    """A rank-one factor ``(..., C)`` on the compact columns: gathered at the cached classes,
    0 on the rest column (it is in no weighted pair)."""
    gathered = factor.gather(-1, indices.long())
    return torch.cat([gathered, gathered.new_zeros((*gathered.shape[:-1], 1))], dim=-1)


def prior_rows(class_prior, labels, ignore_index):
    """The ``(..., C)`` rows ``class_prior[labels]`` (row 0 for ignored rows)."""
    kept = labels if ignore_index is None else torch.where(labels == ignore_index, 0, labels)
    return class_prior.index_select(0, kept.reshape(-1)).reshape(*labels.shape, -1)


def optional_factor(weights, class_prior, labels, options):
    """The rank-one factor ``(..., C)`` the sparse teacher's rows weigh with: ``weights`` or the
    prior's rows of the labels to the power ``gamma``; None for teacher weights."""
    if class_prior is not None:
        return prior_rows(class_prior, labels, options.ignore_index) ** options.gamma
    return weights



def kept_row_count(ignored, rows, device):
    """The rows ``R`` a mean is taken over, float32 0-dim, at least 1: those not ``ignored`` (a bool
    tensor of the rows; None: all ``rows``). No host synchronisation."""
    if ignored is None:
        return torch.tensor(float(max(rows, 1)), device=device)
    return (~ignored).sum(dtype=torch.float32).clamp_min(1.0)


class CompactRows(NamedTuple):
    """The teacher's side of the compact rows of ``B`` rows, formed once (``compact_rows``):
    the cached classes ``indices`` ``(B, k)``, the compact teacher logits ``teacher``
    ``(B, k + 1)``, the cached mass ``(B,)`` of ``"drop"`` (else None), the rank-one ``factor``
    ``(B, k + 1)`` (None: teacher weights), the rows' ``labels`` ``(B,)`` (``ignore_index`` on the
    ignored rows, else 0; None without labels) and the ``ignored`` rows ``(B,)`` (or None)."""

    indices: Tensor
    teacher: Tensor
    mass: Optional[Tensor]
    factor: Optional[Tensor]
    labels: Optional[Tensor]
    ignored: Optional[Tensor]

    def part(self, chunk):
        """The rows ``chunk`` (a slice)."""
        return CompactRows(*(None if x is None else x[chunk] for x in self))

    def config(self, options, use_triton, jsd=False, **changes):
        """The row ops' ``RowConfig`` of these rows under ``options`` (``GKLOptions``): their GKL
        loss, or (``jsd``) their generalized JSD."""
        if jsd:
            return options.jsd_config(self.labels is not None, use_triton)
        source = SOURCE_TEACHER if self.factor is None else SOURCE_EXPLICIT
        return options.row_config(source, self.labels is not None, use_triton, **changes)


def compact_rows(teacher, num_classes, factor, ignored, ignore_index):
    """The ``CompactRows`` of a checked ``SparseTeacher`` ``(B, k)`` (``readable_indices``) of
    ``(B, num_classes)`` logits, with the rank-one ``factor`` ``(B, C)`` (or None) and the
    ``ignored`` rows ``(B,)`` (or None)."""
    logits, mass = compact_teacher(teacher, num_classes, ignored)
    compact = None if factor is None else compact_factor(factor.detach(), teacher.indices)
    # the compact rows need the labels only to leave out the ignored rows (the prior is gathered)
    labels = None if ignored is None else torch.where(ignored, ignore_index, 0)
    return CompactRows(teacher.indices, logits, mass, compact, labels, ignored)


def sparse_teacher_loss(student, rows, options, use_triton, jsd=False):
    """The loss of the student's logits ``(B, C)`` against the teacher's ``CompactRows`` (checked
    inputs), reduced as ``options.reduction`` (``sync_normalizer`` included; not with ``"drop"``)
    over these rows, differentiated by autograd: the row loss of the compact rows; for ``"drop"``
    its wMSE term plus ``ce_weight m_b CE_b`` per row (``CE_b`` against the renormalised cache,
    ``m_b`` the cached mass). ``jsd``: the rows' generalized JSD instead (not with ``"drop"``).
    A chunk of a batch: ``sparse_share_and_gradient``."""
    s_rows = compact_student(student, rows.indices, options.temperature, rows.ignored)

    def row_loss(reduce, **changes):
        return RowLoss.apply(s_rows, rows.teacher, rows.factor, rows.labels,
                             rows.config(options, use_triton, jsd, **changes), reduce)

    if rows.mass is None:
        if options.reduction == "mean":
            return row_loss(SyncedMean(options.process_group) if options.sync_normalizer
                            else MEAN)
        losses = row_loss(PER_ROW)
        return losses if options.reduction == "none" else losses.sum()
    ce = row_loss(PER_ROW, mse_weight=0.0, ce_weight=1.0) * rows.mass  # "drop": mass m_b
    if options.reduction == "mean":
        return row_loss(MEAN, ce_weight=0.0) + options.ce_weight * ce.sum() / kept_row_count(
            rows.ignored, ce.shape[0], ce.device)
    losses = row_loss(PER_ROW, ce_weight=0.0) + options.ce_weight * ce
    return losses if options.reduction == "none" else losses.sum()


def sparse_share_and_gradient(student, rows, options, use_triton, shares, jsd=False,
                              need_grad=True):
    """``(share, ds)`` of the student's logits ``(B, C)`` (no autograd graph) against the
    ``CompactRows`` of a chunk of a batch with ``shares = (1 / N, 1 / R)`` (0-dim tensors): the
    chunk's share of the batch's loss, ``mse_weight sum_b wmse_b / (4 N) + ce_weight sum_b m_b
    CE_b / R`` (``m_b``: ``"drop"``'s cached mass, else 1; ``jsd``: ``sum_b JSD_b / R``), 0-dim,
    and its gradient ``(B, C)`` (None unless ``need_grad``), formed without autograd (one graph
    under ``torch.compile``): the row ops' per-row gradients of the compact rows, back through
    ``compact_student`` (``d rest / d s_o = softmax(others)_o``)."""
    s_rows, others, lse = _student_parts(student, rows.indices, options.temperature, rows.ignored)
    inputs = RowInputs(s_rows, rows.teacher, rows.factor, rows.labels)
    if jsd:
        parts = [(rows.config(options, use_triton, True), shares[1])]
    else:
        ce_scale = options.ce_weight * shares[1]
        parts = [(rows.config(options, use_triton, mse_weight=0.0, ce_weight=1.0),
                  ce_scale if rows.mass is None else ce_scale * rows.mass)]
        if options.mse_weight != 0:
            parts.append((rows.config(options, use_triton, mse_weight=1.0, ce_weight=0.0),
                          options.mse_weight * shares[0]))
    share, grad_rows = 0.0, None
    for config, scale in parts:
        stats = statistics(inputs, config)[0]
        share = share + (row_losses_torch(stats, config) * scale).sum()
        if need_grad:
            per_row = torch.broadcast_to(scale, stats.shape[:1]).to(stats.dtype).contiguous()
            state = RowState(inputs, stats, per_row_totals(stats), stats.new_empty(0),
                             stats.new_empty(0))
            part = row_gradients(per_row, state, config, True, False)[0]
            grad_rows = part if grad_rows is None else grad_rows + part
    if grad_rows is None:
        return share, None
    ds = others.sub_(torch.where(lse == float("-inf"), 0.0, lse)).exp_()
    ds.mul_(grad_rows[:, -1:]).scatter_add_(-1, rows.indices.long(),
                                            grad_rows[:, :-1].to(ds.dtype))
    return share, ds
