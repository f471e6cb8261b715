"""Input validation of every public entry point (``gkl_loss``, ``pairwise_wmse``, ``GKLLoss``,
``compat.dkl_loss``, ``compat.ikl_loss``, ``compat.adv_dkl_loss``, ``compat.consistency_loss``,
``compat.ConsistencyLoss``; ``ClassPrior``'s are in test_class_prior.py): each bad input is a
``TypeError``/``ValueError`` whose message names the argument as the entry's signature does,
raised before any kernel runs. The
ops that every entry point reaches, ``gkl_kernels.functional``'s ``KERNEL_ENTRIES``, are
replaced by functions that fail the test if called.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkl_kernels import GKLLoss, compat, functional, gkl_loss, pairwise_wmse, validation
from gkl_kernels.options import GKLOptions

ROOT = Path(__file__).resolve().parents[1]

B, C = 4, 6  # nominal shape of the (valid) inputs that every case starts from
KERNEL_BACKENDS = ["triton", "torch"]
# the ops through which functional reaches a kernel
KERNEL_ENTRIES = ("RowLoss", "pair_rows")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def no_kernel(monkeypatch):
    """Replace the op with one that fails the test: validation must reject the input first."""
    def forbidden(*args, **kwargs):
        pytest.fail("a kernel ran although the input is invalid")
    forbidden.apply = forbidden  # RowLoss.apply
    for name in KERNEL_ENTRIES:
        monkeypatch.setattr(functional, name, forbidden, raising=False)


@pytest.fixture
def recorded_kernel(monkeypatch):
    """Replace the op with a stub that records its arguments and returns well-shaped zeros."""
    calls = []

    class RecordedRowLoss:  # the autograd function of every reduction, on both backends
        @staticmethod
        def apply(student, teacher, factor, labels, config, reduce):
            calls.append(dict(source=config.source, use_triton=config.use_triton,
                              block_c=config.block_c))
            return torch.zeros(student.shape[0] if reduce.per_row else ())
    monkeypatch.setattr(functional, "RowLoss", RecordedRowLoss)
    return calls


def logits(generator, batch=B, num_classes=C):
    return (3 * torch.randn(batch, num_classes, generator=generator),
            3 * torch.randn(batch, num_classes, generator=generator))


def valid_prior(generator, num_classes=C):
    prior = torch.rand(num_classes, num_classes, generator=generator) + 0.1
    return prior / prior.sum(1, keepdim=True)


def valid_labels(generator, batch=B, num_classes=C):
    return torch.randint(0, num_classes, (batch,), generator=generator)


def valid_weights(generator, batch=B, num_classes=C):
    return torch.rand(batch, num_classes, generator=generator)


def names(*args):
    """A regex that requires every argument name, as a word, in the message (any order)."""
    return "".join(rf"(?=[\s\S]*\b{a}\b)" for a in args)


# --------------------------------------------------------------------------- the entry points

TENSOR_ARGS = ("labels", "class_prior", "weights", "weights_kind")


def call_gkl_loss(student, teacher, **kw):
    return gkl_loss(student, teacher, **kw)


def call_module(student, teacher, **kw):
    """Options go to the constructor, tensors to ``forward``."""
    tensors = {k: kw.pop(k) for k in TENSOR_ARGS if k in kw}
    return GKLLoss(**kw)(student, teacher, **tensors)


def call_pairwise(student, teacher, *, generator, **kw):
    kw.setdefault("weights", valid_weights(generator))
    return pairwise_wmse(student, teacher, kw.pop("weights"), **kw)


def call_dkl(student, teacher, *, GI=False, generator=None, **kw):
    """The authors' signature; GI=True gets a valid per-row (B, C) prior unless one is given."""
    options = dict(temperature=4.0, alpha=1.0, beta=16.0, gamma=0.5)
    options.update(kw)
    if GI:
        options.setdefault("CLASS_PRIOR", valid_prior(generator)[valid_labels(generator)])
    return compat.dkl_loss(student, teacher, GI=GI, **options)


def call_consistency(logits_, targets, name, *, generator=None, **kw):
    """``consistency_loss`` with a valid ``(B,)`` mask unless one is given; ``'ikl'`` with
    ``alpha`` and ``beta``."""
    kw.setdefault("mask", torch.rand(B, generator=generator))
    if name == "ikl":
        kw = dict(dict(alpha=1.0, beta=0.5), **kw)
    return compat.consistency_loss(logits_, targets, name, **kw)


ENTRIES = {  # every entry that reaches the op once
    "gkl_loss": lambda s, t, g, **kw: call_gkl_loss(s, t, **kw),
    "GKLLoss": lambda s, t, g, **kw: call_module(s, t, **kw),
    "pairwise_wmse": lambda s, t, g, **kw: call_pairwise(s, t, generator=g, **kw),
    "dkl_loss": lambda s, t, g, **kw: call_dkl(s, t, generator=g, **kw),
    "dkl_loss_GI": lambda s, t, g, **kw: call_dkl(s, t, GI=True, generator=g, **kw),
    "ikl_loss": lambda s, t, g, **kw: compat.ikl_loss(s, t, 4.0, 1.0, 4.0, **kw),
    "adv_dkl_loss": lambda s, t, g, **kw: compat.adv_dkl_loss(
        s, t, torch.rand(B, C, C, generator=g), 4.0, 20.0, **kw),
    "consistency_ikl": lambda s, t, g, **kw: call_consistency(s, t, "ikl", generator=g, **kw),
}
# consistency_loss's names computed with plain torch (no op), with logits (B, C) as targets
PLAIN_ENTRIES = {f"consistency_{name}": lambda s, t, g, n=name, **kw: call_consistency(
    s, t, n, generator=g, **kw) for name in ("mse", "kl")}
# the logits as the entries' signatures name them (first, second); others: student, teacher
LOGIT_NAMES = {"dkl_loss": ("logits_student", "logits_teacher"),
               "dkl_loss_GI": ("logits_student", "logits_teacher"),
               "ikl_loss": ("logits_student", "logits_teacher"),
               "adv_dkl_loss": ("logits_nat", "logits_adv"),
               **{entry: ("logits", "targets") for entry in ("consistency_ikl", *PLAIN_ENTRIES)}}


def caller_names(entry, message):
    """A ``names`` regex of ``student`` / ``teacher`` with the names of ``entry``'s signature."""
    first, second = LOGIT_NAMES.get(entry, ("student", "teacher"))
    return message.replace(r"\bstudent\b", rf"\b{first}\b").replace(r"\bteacher\b",
                                                                      rf"\b{second}\b")


# --------------------------------------------------------------------------- logits (every entry)


def _replace(student=None, teacher=None):
    """A case that transforms the valid (student, teacher) pair."""
    return lambda s, t: (student(s) if student else s, teacher(t) if teacher else t)


LOGIT_CASES = [
    pytest.param(_replace(student=lambda s: s.tolist()), TypeError, names("student"),
                 id="student_list"),
    pytest.param(_replace(teacher=lambda t: t.numpy()), TypeError, names("teacher"),
                 id="teacher_numpy"),
    pytest.param(_replace(student=lambda s: None), TypeError, names("student"),
                 id="student_None"),
    pytest.param(_replace(student=lambda s: s.long()), TypeError, names("student"),
                 id="student_int64"),
    pytest.param(_replace(teacher=lambda t: t.int()), TypeError, names("teacher"),
                 id="teacher_int32"),
    pytest.param(_replace(student=lambda s: s.to(torch.complex64)), TypeError, names("student"),
                 id="student_complex64"),
    pytest.param(_replace(teacher=lambda t: t.to(torch.complex64)), TypeError,
                 names("teacher"), id="teacher_complex64"),
    pytest.param(_replace(student=lambda s: s.bool()), TypeError, names("student"),
                 id="student_bool"),
    pytest.param(_replace(lambda s: s[0, 0], lambda t: t[0, 0]), ValueError, names("student"),
                 id="both_0d"),
    pytest.param(_replace(teacher=lambda t: t[0]), ValueError, names("teacher"),
                 id="teacher_1d"),
    pytest.param(_replace(student=lambda s: s[None]), ValueError, names("student"),
                 id="student_3d"),
    pytest.param(_replace(teacher=lambda t: t[:, :-1]), ValueError, names("student", "teacher"),
                 id="classes_differ"),
    pytest.param(_replace(teacher=lambda t: t[:-1]), ValueError, names("student", "teacher"),
                 id="rows_differ"),
    pytest.param(_replace(teacher=lambda t: t.reshape(C, B)), ValueError,
                 names("student", "teacher"), id="transposed_shape"),
    pytest.param(_replace(lambda s: s[:, :0], lambda t: t[:, :0]), ValueError,
                 names("student", "teacher"), id="zero_classes"),
    pytest.param(_replace(teacher=lambda t: torch.empty(B, C, device="meta")), ValueError,
                 names("student", "teacher"), id="teacher_on_meta_device"),
    pytest.param(_replace(student=lambda s: torch.empty(B, C, device="meta")), ValueError,
                 names("student", "teacher"), id="student_on_meta_device"),
]


@pytest.mark.parametrize("entry", [*ENTRIES, *PLAIN_ENTRIES])
@pytest.mark.parametrize("case, error, message", LOGIT_CASES)
def test_bad_logits(entry, case, error, message, generator, no_kernel):
    """The message names the logits as the entry's signature does."""
    student, teacher = case(*logits(generator))
    with pytest.raises(error, match=caller_names(entry, message)):
        {**ENTRIES, **PLAIN_ENTRIES}[entry](student, teacher, generator)


ROWS_ENTRIES = ("gkl_loss", "GKLLoss")  # logits (..., C), any number of rows
MATRIX_LOGIT_CASES = [  # the other entries take (B, C) logits with B > 0
    pytest.param(_replace(lambda s: s[0], lambda t: t[0]), ValueError, names("student"),
                 id="both_1d"),
    pytest.param(_replace(lambda s: s.reshape(2, 2, C), lambda t: t.reshape(2, 2, C)), ValueError,
                 names("student"), id="both_3d"),
    pytest.param(_replace(lambda s: s[:0], lambda t: t[:0]), ValueError,
                 names("student", "teacher"), id="empty_batch"),
]


@pytest.mark.parametrize("entry", [name for name in [*ENTRIES, *PLAIN_ENTRIES]
                                   if name not in ROWS_ENTRIES])
@pytest.mark.parametrize("case, error, message", MATRIX_LOGIT_CASES)
def test_bad_matrix_logits(entry, case, error, message, generator, no_kernel):
    student, teacher = case(*logits(generator))
    with pytest.raises(error, match=caller_names(entry, message)):
        {**ENTRIES, **PLAIN_ENTRIES}[entry](student, teacher, generator)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16),
                                    (torch.float64, torch.float32),
                                    (torch.bfloat16, torch.float64)],
                         ids=["f16_bf16", "bf16_f32", "f32_f16", "f64_f32", "bf16_f64"])
def test_accepted_logit_dtypes(entry, dtypes, generator, recorded_kernel):
    """The accepted dtypes, mixed: validation passes and the op is reached once."""
    student, teacher = logits(generator)
    ENTRIES[entry](student.to(dtypes[0]), teacher.to(dtypes[1]), generator)
    assert len(recorded_kernel) == 1


# --------------------------------------------------------------------------- gkl_loss and GKLLoss


def _prior_case(**replace):
    """Keyword arguments of the class-prior source, with some of them replaced."""
    def make(generator):
        kw = dict(labels=valid_labels(generator), class_prior=valid_prior(generator))
        for key, fn in replace.items():
            kw[key] = fn(kw[key], generator)
        return kw
    return make


def _weights_case(fn):
    return lambda generator: dict(weights=fn(valid_weights(generator), generator))


def _options(**kw):
    return lambda generator: dict(kw)


def _set(x, index, value):
    x = x.clone()
    x[index] = value
    return x


LABEL_CASES = [
    pytest.param(_prior_case(labels=lambda y, g: y.float()), TypeError, "labels",
                 id="labels_float32"),
    pytest.param(_prior_case(labels=lambda y, g: y.to(torch.int16)), TypeError, "labels",
                 id="labels_int16"),
    pytest.param(_prior_case(labels=lambda y, g: y.to(torch.uint8)), TypeError, "labels",
                 id="labels_uint8"),
    pytest.param(_prior_case(labels=lambda y, g: y.tolist()), TypeError, "labels",
                 id="labels_list"),
    pytest.param(_prior_case(labels=lambda y, g: y[:, None]), ValueError, "labels",
                 id="labels_B_by_1"),
    pytest.param(_prior_case(labels=lambda y, g: torch.cat([y, y[:1]])), ValueError, "labels",
                 id="labels_too_long"),
    pytest.param(_prior_case(labels=lambda y, g: y[:-1]), ValueError, "labels",
                 id="labels_too_short"),
    pytest.param(_prior_case(labels=lambda y, g: torch.empty(B, dtype=torch.int64,
                                                             device="meta")),
                 ValueError, "labels", id="labels_on_meta_device"),
]
LABEL_VALUE_CASES = [
    pytest.param(_prior_case(labels=lambda y, g: _set(y, 2, -1)), ValueError, "labels",
                 id="labels_negative"),
    pytest.param(_prior_case(labels=lambda y, g: _set(y, 1, C)), ValueError, "labels",
                 id="labels_equal_C"),
    pytest.param(_prior_case(labels=lambda y, g: _set(y, 0, 10 * C)), ValueError, "labels",
                 id="labels_far_above_C"),
]
PRIOR_CASES = [
    pytest.param(_prior_case(class_prior=lambda p, g: torch.rand(C, C + 1, generator=g)),
                 ValueError, "class_prior", id="prior_C_by_C_plus_1"),
    pytest.param(_prior_case(class_prior=lambda p, g: torch.rand(B, C, generator=g)),
                 ValueError, "class_prior", id="prior_per_row_B_by_C"),
    pytest.param(_prior_case(class_prior=lambda p, g: p[0]), ValueError, "class_prior",
                 id="prior_1d"),
    pytest.param(_prior_case(class_prior=lambda p, g: p[None]), ValueError, "class_prior",
                 id="prior_3d"),
    pytest.param(_prior_case(class_prior=lambda p, g: p.to(torch.complex64)), TypeError,
                 "class_prior", id="prior_complex64"),
    pytest.param(_prior_case(class_prior=lambda p, g: (p > 0.2).long()), TypeError,
                 "class_prior", id="prior_int64"),
    pytest.param(_prior_case(class_prior=lambda p, g: p.tolist()), TypeError, "class_prior",
                 id="prior_list"),
    pytest.param(_prior_case(class_prior=lambda p, g: torch.empty(C, C, device="meta")),
                 ValueError, "class_prior", id="prior_on_meta_device"),
    pytest.param(lambda g: dict(class_prior=valid_prior(g)), ValueError,
                 names("class_prior", "labels"), id="prior_without_labels"),
    pytest.param(lambda g: dict(class_prior=valid_prior(g), labels=valid_labels(g),
                                weights=valid_weights(g)),
                 ValueError, names("class_prior", "weights"), id="weights_and_prior"),
]
def _poisoned_prior_case(row, col, value):
    """A prior with one bad entry in a row that the first label picks."""
    return _prior_case(class_prior=lambda p, g: _set(p, (row, col), value),
                       labels=lambda y, g: _set(y, 0, row))


PRIOR_VALUE_CASES = [
    pytest.param(_poisoned_prior_case(1, 2, -0.25), ValueError, "class_prior", id="prior_negative"),
    pytest.param(_poisoned_prior_case(3, 0, math.nan), ValueError, "class_prior", id="prior_nan"),
    pytest.param(_poisoned_prior_case(0, 5, math.inf), ValueError, "class_prior", id="prior_inf"),
    pytest.param(_poisoned_prior_case(5, 5, -math.inf), ValueError, "class_prior",
                 id="prior_minus_inf"),
]
WEIGHT_CASES = [
    pytest.param(_weights_case(lambda w, g: torch.rand(B, C + 1, generator=g)), ValueError,
                 "weights", id="weights_B_by_C_plus_1"),
    pytest.param(_weights_case(lambda w, g: w.T.contiguous().reshape(C, B)), ValueError,
                 "weights", id="weights_transposed"),
    pytest.param(_weights_case(lambda w, g: w[0]), ValueError, "weights", id="weights_1d"),
    pytest.param(_weights_case(lambda w, g: w[:1, :, None] * w[:1, None, :]), ValueError,
                 "weights", id="weights_1_C_C"),
    pytest.param(_weights_case(lambda w, g: w.to(torch.complex64)), TypeError, "weights",
                 id="weights_complex64"),
    pytest.param(_weights_case(lambda w, g: (w > 0.5).int()), TypeError, "weights",
                 id="weights_int32"),
    pytest.param(_weights_case(lambda w, g: w > 0.5), TypeError, "weights", id="weights_bool"),
    pytest.param(_weights_case(lambda w, g: w.tolist()), TypeError, "weights",
                 id="weights_list"),
    pytest.param(_weights_case(lambda w, g: torch.empty(B, C, device="meta")), ValueError,
                 "weights", id="weights_on_meta_device"),
]
WEIGHT_VALUE_CASES = [
    pytest.param(_weights_case(lambda w, g: _set(w, (1, 1), -1e-3)), ValueError, "weights",
                 id="weights_negative"),
    pytest.param(_weights_case(lambda w, g: _set(w, (2, 4), math.nan)), ValueError, "weights",
                 id="weights_nan"),
    pytest.param(_weights_case(lambda w, g: _set(w, (3, 0), math.inf)), ValueError, "weights",
                 id="weights_inf"),
]

def _pair_case(shape, make=None, **kw):
    """Pair weights of ``shape`` (random, or ``make(weights)``) plus keyword arguments."""
    def case(generator):
        weights = torch.rand(shape, generator=generator)
        return dict(weights=make(weights) if make else weights, **kw)
    return case


PAIR_WEIGHT_CASES = [
    pytest.param(_pair_case((C, C + 1)), ValueError, "weights", id="weights_C_by_C_plus_1"),
    pytest.param(_pair_case((B, C, C + 1)), ValueError, "weights", id="weights_B_C_C_plus_1"),
    pytest.param(_pair_case((B + 1, C, C)), ValueError, "weights", id="weights_B_plus_1_C_C"),
    pytest.param(_pair_case((1, B, C, C)), ValueError, "weights", id="weights_4d"),
    pytest.param(_pair_case((C, C), weights_kind="factor"), ValueError, "weights",
                 id="weights_C_C_named_factor"),
    pytest.param(_pair_case((B, C), weights_kind="shared"), ValueError, "weights",
                 id="weights_B_C_named_shared"),
    pytest.param(_pair_case((C, C), weights_kind="per_row"), ValueError, "weights",
                 id="weights_C_C_named_per_row"),
    pytest.param(_pair_case((C, C), weights_kind="diagonal"), ValueError, "weights_kind",
                 id="weights_kind_unknown"),
    pytest.param(_pair_case((C, C), lambda w: w.to(torch.complex64)), TypeError, "weights",
                 id="shared_complex64"),
    pytest.param(_pair_case((B, C, C), lambda w: (w > 0.5).int()), TypeError, "weights",
                 id="per_row_int32"),
    pytest.param(_pair_case((B, C, C), lambda w: w.to("meta")), ValueError, "weights",
                 id="per_row_on_meta_device"),
    pytest.param(_pair_case((C, C), block_c=8), ValueError, "block_c", id="shared_block_c_8"),
    pytest.param(_options(dot_precision="fp16"), ValueError, "dot_precision",
                 id="dot_precision_fp16"),
    pytest.param(_options(dot_precision=None), ValueError, "dot_precision",
                 id="dot_precision_None"),
]
PAIR_WEIGHT_VALUE_CASES = [
    pytest.param(_pair_case((C, C), lambda w: _set(w, (1, 4), -1e-3)), ValueError, "weights",
                 id="shared_negative"),
    pytest.param(_pair_case((C, C), lambda w: _set(w, (5, 0), math.inf)), ValueError, "weights",
                 id="shared_inf"),
    pytest.param(_pair_case((B, C, C), lambda w: _set(w, (3, 2, 1), math.nan)), ValueError,
                 "weights", id="per_row_nan"),
    pytest.param(_pair_case((B, C, C), lambda w: _set(w, (0, 5, 5), -2.0)), ValueError,
                 "weights", id="per_row_negative"),
]
CHOICE_CASES = [
    pytest.param(_options(normalize="mean"), ValueError, "normalize", id="normalize_mean"),
    pytest.param(_options(normalize="Weights"), ValueError, "normalize", id="normalize_case"),
    pytest.param(_options(normalize=None), ValueError, "normalize", id="normalize_None"),
    pytest.param(_options(backend="cuda"), ValueError, "backend", id="backend_cuda"),
    pytest.param(_options(backend="Torch"), ValueError, "backend", id="backend_case"),
    pytest.param(_options(backend=None), ValueError, "backend", id="backend_None"),
]


def _scalar_cases(name, bad_values):
    return [pytest.param(_options(**{name: value}), error, name, id=f"{name}_{label}")
            for label, value, error in bad_values]


NOT_A_NUMBER = [("str", "1.0", TypeError), ("None", None, TypeError), ("bool", True, TypeError),
                ("tensor", torch.tensor(1.0), TypeError), ("complex", 1j, TypeError)]
NON_FINITE = [("nan", math.nan, ValueError), ("inf", math.inf, ValueError),
              ("minus_inf", -math.inf, ValueError)]
# 1 / T overflows float32 below 1 / float32 max (about 2.94e-39): tiny, subnormal, just below
TINY_TEMPERATURES = [("tiny", 1e-39, ValueError), ("subnormal", 5e-324, ValueError),
                     ("float32_subnormal", 1e-40, ValueError),
                     ("just_below_min", 2.9e-39, ValueError), ("huge_int", 10**400, ValueError)]
SCALAR_CASES = (
    _scalar_cases("temperature", [("zero", 0.0, ValueError), ("int_zero", 0, ValueError),
                                  ("negative", -1.0, ValueError)] + NON_FINITE + NOT_A_NUMBER
                  + TINY_TEMPERATURES)
    + _scalar_cases("weight_temperature", [("zero", 0.0, ValueError),
                                           ("negative", -4.0, ValueError)]
                    + NON_FINITE + NOT_A_NUMBER[:3] + TINY_TEMPERATURES)
    + _scalar_cases("gamma", [("negative", -0.5, ValueError), ("huge_int", 10**400, ValueError)]
                    + NON_FINITE + NOT_A_NUMBER[:3])
    + _scalar_cases("mse_weight", NON_FINITE + NOT_A_NUMBER[:3])
    + _scalar_cases("ce_weight", NON_FINITE + NOT_A_NUMBER[:3])
)
BLOCK_CASES = [
    pytest.param(_options(block_c=value), ValueError, "block_c", id=f"block_c_{label}")
    for label, value in [("zero", 0), ("three", 3), ("negative", -16), ("float", 16.0),
                         ("str", "16"), ("24", 24), ("bool", True)]
]

FLAG_CASES = [
    pytest.param(_options(**{name: value}), TypeError, name, id=f"{name}_{label}")
    for name in ("symmetric", "check_values")
    for label, value in [("str", "no"), ("int", 1), ("None", None)]
]

MODULE_ENTRIES = {"gkl_loss": call_gkl_loss, "GKLLoss": call_module}
OPTION_CASES = (LABEL_CASES + LABEL_VALUE_CASES + PRIOR_CASES + PRIOR_VALUE_CASES + WEIGHT_CASES
                + WEIGHT_VALUE_CASES + PAIR_WEIGHT_CASES + PAIR_WEIGHT_VALUE_CASES + CHOICE_CASES
                + SCALAR_CASES + FLAG_CASES)


@pytest.mark.parametrize("entry", MODULE_ENTRIES)
@pytest.mark.parametrize("case, error, message", OPTION_CASES)
def test_bad_options(entry, case, error, message, generator, no_kernel):
    student, teacher = logits(generator)
    with pytest.raises(error, match=message):
        MODULE_ENTRIES[entry](student, teacher, **case(generator))


@pytest.mark.parametrize("case, error, message", BLOCK_CASES)
def test_bad_block_c(case, error, message, generator, no_kernel):
    student, teacher = logits(generator)
    with pytest.raises(error, match=message):
        gkl_loss(student, teacher, **case(generator))
    with pytest.raises(error, match=message):
        pairwise_wmse(student, teacher, valid_weights(generator), **case(generator))


@pytest.mark.parametrize("block_c", [None, 1, 2, 16, 1024])
def test_good_block_c(block_c, generator, recorded_kernel):
    student, teacher = logits(generator)
    gkl_loss(student, teacher, block_c=block_c)
    pairwise_wmse(student, teacher, valid_weights(generator), block_c=block_c)
    assert [call["block_c"] for call in recorded_kernel] == [block_c or 0] * 2


# --------------------------------------------------------------------------- pairwise_wmse

PAIRWISE_CASES = [
    pytest.param(dict(weights=None), TypeError, "weights", id="weights_None"),
    pytest.param(dict(reduction="avg"), ValueError, "reduction", id="reduction_avg"),
    pytest.param(dict(reduction=None), ValueError, "reduction", id="reduction_None"),
    pytest.param(dict(backend="gpu"), ValueError, "backend", id="backend_gpu"),
]


@pytest.mark.parametrize("case, error, message",
                         PAIRWISE_CASES + WEIGHT_CASES + WEIGHT_VALUE_CASES + PAIR_WEIGHT_CASES
                         + PAIR_WEIGHT_VALUE_CASES)
def test_bad_pairwise_inputs(case, error, message, generator, no_kernel):
    student, teacher = logits(generator)
    kw = case(generator) if callable(case) else dict(case)
    with pytest.raises(error, match=message):
        call_pairwise(student, teacher, generator=generator, **kw)


# --------------------------------------------------------------------------- compat.dkl_loss


def _class_prior_case(fn):
    def make(generator):
        per_row = valid_prior(generator)[valid_labels(generator)]
        return dict(CLASS_PRIOR=fn(per_row, generator))
    return make


DKL_CASES = [
    pytest.param(True, lambda g: dict(CLASS_PRIOR=None), ValueError, "CLASS_PRIOR",
                 id="GI_without_CLASS_PRIOR"),
    pytest.param(True, _class_prior_case(lambda p, g: valid_prior(g)), ValueError, "CLASS_PRIOR",
                 id="CLASS_PRIOR_C_by_C_instead_of_B_by_C"),
    pytest.param(True, _class_prior_case(lambda p, g: p[0]), ValueError, "CLASS_PRIOR",
                 id="CLASS_PRIOR_1d"),
    pytest.param(True, _class_prior_case(lambda p, g: p.to(torch.complex64)), TypeError,
                 "CLASS_PRIOR", id="CLASS_PRIOR_complex64"),
    pytest.param(True, _class_prior_case(lambda p, g: p.tolist()), TypeError, "CLASS_PRIOR",
                 id="CLASS_PRIOR_list"),
    pytest.param(True, _class_prior_case(lambda p, g: torch.empty(B, C, device="meta")),
                 ValueError, "CLASS_PRIOR", id="CLASS_PRIOR_on_meta_device"),
    pytest.param(True, _class_prior_case(lambda p, g: _set(p, (0, 1), -0.5)), ValueError,
                 "CLASS_PRIOR", id="CLASS_PRIOR_negative"),
    pytest.param(True, _class_prior_case(lambda p, g: _set(p, (2, 3), math.nan)), ValueError,
                 "CLASS_PRIOR", id="CLASS_PRIOR_nan"),
    pytest.param(True, _class_prior_case(lambda p, g: _set(p, (3, 3), math.inf)), ValueError,
                 "CLASS_PRIOR", id="CLASS_PRIOR_inf"),
] + [
    pytest.param(gi, lambda g, v=value, n=name: {n: v}, error, name,
                 id=f"{'GI' if gi else 'teacher'}_{name}_{label}")
    for gi in (True, False)
    for name, label, value, error in [
        ("temperature", "zero", 0.0, ValueError), ("temperature", "nan", math.nan, ValueError),
        ("temperature", "str", "4", TypeError), ("gamma", "negative", -0.05, ValueError),
        ("gamma", "inf", math.inf, ValueError), ("gamma", "None", None, TypeError),
        ("alpha", "nan", math.nan, ValueError), ("beta", "inf", math.inf, ValueError),
        ("beta", "str", "1", TypeError), ("T2", "zero", 0.0, ValueError),
        ("T2", "negative", -1.0, ValueError), ("T2", "tiny", 1e-39, ValueError),
        ("temperature", "tiny", 1e-39, ValueError), ("GI", "str", "yes", TypeError)]
    if not (name == "GI" and gi is False)
]


@pytest.mark.parametrize("gi, case, error, message", DKL_CASES)
def test_bad_dkl_inputs(gi, case, error, message, generator, no_kernel):
    student, teacher = logits(generator)
    with pytest.raises(error, match=message):
        call_dkl(student, teacher, GI=gi, generator=generator, **case(generator))


@pytest.mark.parametrize("entry", MODULE_ENTRIES)
def test_weights_kind_needs_weights(entry, generator, no_kernel):
    student, teacher = logits(generator)
    with pytest.raises(ValueError, match="weights_kind"):
        MODULE_ENTRIES[entry](student, teacher, weights_kind="shared")


@pytest.mark.parametrize("entry", ["gkl_loss", "GKLLoss", "pairwise_wmse"])
def test_square_weights_are_ambiguous_when_b_equals_c(entry, generator, no_kernel):
    """With ``B == C`` a 2-D ``(C, C)`` tensor could be a factor or a shared matrix: the caller
    must say which (the message names ``weights_kind``)."""
    student, teacher = logits(generator, batch=C)
    with pytest.raises(ValueError, match=names("weights", "weights_kind")):
        ENTRIES[entry](student, teacher, generator,
                       weights=torch.rand(C, C, generator=generator))


# --------------------------------------------------------------------------- compat: the first paper


def call_ikl(student, teacher, *, GI=False, generator=None, **kw):
    """The authors' signature; GI=True gets a valid per-row (B, C) prior unless one is given."""
    options = dict(temperature=4.0, alpha=1.0, beta=4.0)
    options.update(kw)
    if GI:
        options.setdefault("CLASS_PRIOR", valid_prior(generator)[valid_labels(generator)])
    return compat.ikl_loss(student, teacher, GI=GI, **options)


# dkl_loss's cases without gamma, which ikl_loss does not take
IKL_CASES = [case for case in DKL_CASES if "gamma" not in case.id]


@pytest.mark.parametrize("gi, case, error, message", IKL_CASES)
def test_bad_ikl_inputs(gi, case, error, message, generator, no_kernel):
    student, teacher = logits(generator)
    with pytest.raises(error, match=message):
        call_ikl(student, teacher, GI=gi, generator=generator, **case(generator))


def _adv_case(make=None, **kw):
    """``adv_dkl_loss`` arguments: a valid (B, C, C) weight (or ``make(weight)``) and overrides."""
    def case(generator):
        weight = torch.rand(B, C, C, generator=generator)
        return dict(dict(weight=make(weight) if make else weight, alpha=4.0, beta=20.0), **kw)
    return case


ADV_CASES = [
    pytest.param(_adv_case(lambda w: None), TypeError, "weight", id="weight_None"),
    pytest.param(_adv_case(lambda w: w[:, 0]), ValueError, "weight", id="weight_B_C"),
    pytest.param(_adv_case(lambda w: w[0]), ValueError, "weight", id="weight_C_C"),
    pytest.param(_adv_case(lambda w: w[:, :, :-1]), ValueError, "weight",
                 id="weight_B_C_C_minus_1"),
    pytest.param(_adv_case(lambda w: w.to(torch.complex64)), TypeError, "weight",
                 id="weight_complex64"),
    pytest.param(_adv_case(lambda w: w.to("meta")), ValueError, "weight", id="weight_on_meta"),
    pytest.param(_adv_case(lambda w: _set(w, (1, 2, 3), -0.5)), ValueError, "weight",
                 id="weight_negative"),
    pytest.param(_adv_case(lambda w: _set(w, (0, 0, 1), math.nan)), ValueError, "weight",
                 id="weight_nan"),
    pytest.param(_adv_case(alpha=math.nan), ValueError, "alpha", id="alpha_nan"),
    pytest.param(_adv_case(beta="20"), TypeError, "beta", id="beta_str"),
]


@pytest.mark.parametrize("case, error, message", ADV_CASES)
def test_bad_adv_dkl_inputs(case, error, message, generator, no_kernel):
    logits_nat, logits_adv = logits(generator)
    with pytest.raises(error, match=message):
        compat.adv_dkl_loss(logits_nat, logits_adv, **case(generator))


# ------------------------------------------------------- compat.consistency_loss, ConsistencyLoss

CONSISTENCY_NAMES = ("ikl", "ce_hard", "ce_soft", "mse", "kl")


def consistency_targets(name, generator):
    """Valid targets of ``name``: logits, probabilities or class indices ``(B,)``."""
    raw = 3 * torch.randn(B, C, generator=generator)
    return {"ce_hard": valid_labels(generator), "ce_soft": torch.softmax(raw, 1),
            "mse": torch.softmax(raw, 1)}.get(name, raw)


def _mask_case(make, error, message, label):
    return pytest.param(lambda m: make(m), error, message, id=f"mask_{label}")


MASK_CASES = [  # a per-sample (B,) mask: nothing broadcast
    _mask_case(lambda m: m[:, None], ValueError, r"mask must have shape \(4,\), got \(4, 1\)",
               "B_by_1"),
    _mask_case(lambda m: m[None], ValueError, r"mask must have shape \(4,\), got \(1, 4\)",
               "1_by_B"),
    _mask_case(lambda m: m[:-1], ValueError, r"mask must have shape \(4,\), got \(3,\)",
               "short"),
    _mask_case(lambda m: m[:, None].expand(B, C), ValueError,
               r"mask must have shape \(4,\), got \(4, 6\)", "B_by_C"),
    _mask_case(lambda m: m[0], ValueError, r"mask must have shape \(4,\), got \(\)", "0d"),
    _mask_case(lambda m: (m > 0.5).long(), TypeError, r"mask must have dtype in .*torch.bool",
               "int64"),
    _mask_case(lambda m: m.to(torch.complex64), TypeError, "mask must have dtype", "complex64"),
    _mask_case(lambda m: m.tolist(), TypeError, "mask must be a torch.Tensor, got list", "list"),
    _mask_case(lambda m: 1.0, TypeError, "mask must be a torch.Tensor, got float", "float"),
    _mask_case(lambda m: torch.empty(B, device="meta"), ValueError, "mask must be on cpu",
               "on_meta_device"),
]


@pytest.mark.parametrize("module", [False, True], ids=["function", "module"])
@pytest.mark.parametrize("name", CONSISTENCY_NAMES)
@pytest.mark.parametrize("case, error, message", MASK_CASES)
def test_bad_consistency_mask(name, module, case, error, message, generator, no_kernel):
    """``(B, 1)`` used to broadcast to ``(B, B)`` (a wrong value), a short or ``(B, C)`` mask to
    fail after the kernels ran."""
    student, _ = logits(generator)
    mask = case(torch.rand(B, generator=generator))
    options = dict(alpha=1.0, beta=0.5) if name == "ikl" else {}
    loss = compat.ConsistencyLoss() if module else compat.consistency_loss
    with pytest.raises(error, match=message):
        loss(student, consistency_targets(name, generator), name.split("_")[0], mask, **options)


def _targets_case(make, error, message, label, logits_fn=None):
    """``name='ce'``: class-index targets ``(B,)`` (or ``make(targets)``), the logits
    ``logits_fn(logits)``."""
    return pytest.param(make, logits_fn or (lambda s: s), error, message, id=label)


CE_CASES = [
    _targets_case(lambda y: None, TypeError, "targets must be a torch.Tensor, got NoneType",
                  "targets_None"),
    _targets_case(lambda y: y.tolist(), TypeError, "targets must be a torch.Tensor, got list",
                  "targets_list"),
    _targets_case(lambda y: y.to(torch.int16), TypeError, "targets must have dtype",
                  "targets_int16"),
    _targets_case(lambda y: y.bool(), TypeError, "targets must have dtype", "targets_bool"),
    _targets_case(lambda y: y[:, None], ValueError, r"targets must have shape \(4,\), got "
                  r"\(4, 1\)", "targets_B_by_1"),
    _targets_case(lambda y: y[:-1], ValueError, r"targets must have shape \(4,\), got \(3,\)",
                  "targets_short"),
    _targets_case(lambda y: _set(y, 1, C), ValueError,
                  r"targets must lie in \[0, 6\) or equal ignore_index=-100, found 6",
                  "targets_C"),
    _targets_case(lambda y: _set(y, 2, -1), ValueError, r"targets must lie in \[0, 6\)",
                  "targets_negative"),
    _targets_case(lambda y: y.float(), ValueError, names("targets"), "targets_float_1d"),
    _targets_case(lambda y: torch.rand(B, C + 1), ValueError, names("logits", "targets"),
                  "soft_targets_C_plus_1"),
    _targets_case(lambda y: torch.empty(B, dtype=torch.int64, device="meta"), ValueError,
                  "targets must be on cpu", "targets_on_meta_device"),
    _targets_case(lambda y: y, TypeError, "logits must be a torch.Tensor, got NoneType",
                  "logits_None", lambda s: None),
    _targets_case(lambda y: y, TypeError, "logits must be float32", "logits_int64",
                  lambda s: s.long()),
    _targets_case(lambda y: y, ValueError, r"logits must be 2-D \(B, C\)", "logits_1d",
                  lambda s: s[0]),
    _targets_case(lambda y: y, ValueError, r"targets must have shape \(5,\), got \(4,\)",
                  "logits_longer", lambda s: torch.cat([s, s[:1]])),
]


@pytest.mark.parametrize("make_targets, make_logits, error, message", CE_CASES)
def test_bad_consistency_ce_inputs(make_targets, make_logits, error, message, generator):
    """``name='ce'``: targets are class indices ``(B,)`` (``-100`` ignored, as
    ``F.cross_entropy`` does) or probabilities ``(B, C)``."""
    student, _ = logits(generator)
    targets = make_targets(valid_labels(generator))
    with pytest.raises(error, match=message):
        compat.consistency_loss(make_logits(student), targets, "ce", torch.rand(B))


def _consistency_option(name, value, error, label, loss="ikl"):
    return pytest.param(loss, {name: value}, error, name, id=f"{loss}_{name}_{label}")


CONSISTENCY_OPTION_CASES = [
    _consistency_option("name", "IKL", ValueError, "upper_case"),
    _consistency_option("name", None, ValueError, "None"),
    _consistency_option("alpha", "1", TypeError, "str"),
    _consistency_option("alpha", math.nan, ValueError, "nan"),
    _consistency_option("beta", math.inf, ValueError, "inf"),
    _consistency_option("beta", None, ValueError, "None"),
    _consistency_option("temperature", 0.0, ValueError, "zero"),
    _consistency_option("temperature", "2", TypeError, "str"),
    _consistency_option("T2", -1.0, ValueError, "negative"),
    _consistency_option("T2", 1e-39, ValueError, "tiny"),
    _consistency_option("GI", "yes", TypeError, "str"),
    _consistency_option("CLASS_PRIOR", torch.rand(C, C), ValueError, "C_by_C"),
    _consistency_option("CLASS_PRIOR", _set(torch.rand(B, C), (0, 1), -1.0), ValueError,
                        "negative"),
    _consistency_option("teacher_weight_gradient", 1, TypeError, "int"),
    _consistency_option("teacher_weight_gradient", "no", TypeError, "str", loss="mse"),
]


@pytest.mark.parametrize("module", [False, True], ids=["function", "module"])
@pytest.mark.parametrize("loss_name, options, error, message", CONSISTENCY_OPTION_CASES)
def test_bad_consistency_options(loss_name, options, error, message, module, generator,
                                 no_kernel):
    student, teacher = logits(generator)
    kw = dict(name=loss_name, mask=torch.rand(B, generator=generator))
    if loss_name == "ikl":
        kw.update(alpha=1.0, beta=0.5, GI="CLASS_PRIOR" in options)
    kw.update(options)
    loss = compat.ConsistencyLoss() if module else compat.consistency_loss
    with pytest.raises(error, match=names(message)):
        loss(student, teacher, **kw)


@pytest.mark.parametrize("name", CONSISTENCY_NAMES)
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.bfloat16),
                                    (torch.float64, torch.float32)], ids=["f16_bf16", "f64_f32"])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.float16, torch.float64, torch.bool])
def test_accepted_consistency_inputs(name, dtypes, mask_dtype, generator):
    """Logits of any float dtype (mixed), float or bool masks: a finite 0-dim loss."""
    student, _ = logits(generator)
    targets = consistency_targets(name, generator)
    if targets.is_floating_point():
        targets = targets.to(dtypes[1])
    mask = (torch.rand(B, generator=generator) > 0.3).to(mask_dtype)
    options = dict(alpha=1.0, beta=0.5) if name == "ikl" else {}
    loss = compat.consistency_loss(student.to(dtypes[0]), targets, name.split("_")[0], mask,
                                   **options)
    assert loss.dim() == 0 and torch.isfinite(loss)


# --------------------------------------------------------------------------- backend resolution


@pytest.mark.parametrize("entry", ["gkl_loss", "GKLLoss", "pairwise_wmse"])
def test_triton_backend_on_cpu_without_interpreter(entry, generator, monkeypatch, no_kernel):
    monkeypatch.setattr(validation, "triton_interpreter_active", lambda: False)
    student, teacher = logits(generator)
    with pytest.raises(ValueError, match=names("backend")):
        ENTRIES[entry](student, teacher, generator, backend="triton")


@pytest.mark.parametrize("backend, interpreter", [  # triton without interpreter: the error above
    pytest.param(backend, interpreter, id=f"{backend}-{'' if interpreter else 'no_'}interpreter")
    for backend in ("auto", "torch", "triton") for interpreter in (True, False)
    if interpreter or backend != "triton"])
@pytest.mark.parametrize("entry", ["gkl_loss", "GKLLoss", "pairwise_wmse"])
def test_backend_resolution_on_cpu(entry, backend, interpreter, generator, monkeypatch,
                                   recorded_kernel):
    """CPU tensors: "auto" is Triton only under the interpreter, "torch" never, "triton" always."""
    monkeypatch.setattr(validation, "triton_interpreter_active", lambda: interpreter)
    student, teacher = logits(generator)
    ENTRIES[entry](student, teacher, generator, backend=backend)
    expected = {"auto": interpreter, "torch": False, "triton": True}[backend]
    assert [call["use_triton"] for call in recorded_kernel] == [expected]


# --------------------------------------------------------------------------- check_values=False

SKIPPED_VALUE_CASES = LABEL_VALUE_CASES + PRIOR_VALUE_CASES + WEIGHT_VALUE_CASES
KEPT_CASES = [
    pytest.param(_prior_case(labels=lambda y, g: y.float()), TypeError, "labels",
                 id="labels_float32"),
    pytest.param(_prior_case(labels=lambda y, g: y[:, None]), ValueError, "labels",
                 id="labels_B_by_1"),
    pytest.param(_prior_case(class_prior=lambda p, g: p.to(torch.complex64)), TypeError,
                 "class_prior", id="prior_complex64"),
    pytest.param(_prior_case(class_prior=lambda p, g: p[:, :-1]), ValueError, "class_prior",
                 id="prior_C_by_C_minus_1"),
    pytest.param(_weights_case(lambda w, g: w.int()), TypeError, "weights", id="weights_int32"),
    pytest.param(_weights_case(lambda w, g: w[:-1]), ValueError, "weights", id="weights_short"),
    pytest.param(_weights_case(lambda w, g: torch.empty(B, C, device="meta")), ValueError,
                 "weights", id="weights_on_meta_device"),
    pytest.param(_options(temperature=0.0), ValueError, "temperature", id="temperature_zero"),
    pytest.param(_options(gamma=math.nan), ValueError, "gamma", id="gamma_nan"),
    pytest.param(_options(normalize="sum"), ValueError, "normalize", id="normalize_sum"),
]


@pytest.mark.parametrize("entry", MODULE_ENTRIES)
@pytest.mark.parametrize("case, error, message", SKIPPED_VALUE_CASES)
def test_check_values_false_skips_value_checks(entry, case, error, message, generator,
                                               recorded_kernel):
    """The same inputs that ``test_bad_options`` rejects reach the op with check_values=False."""
    student, teacher = logits(generator)
    MODULE_ENTRIES[entry](student, teacher, check_values=False, **case(generator))
    assert len(recorded_kernel) == 1


@pytest.mark.parametrize("case, error, message", WEIGHT_VALUE_CASES)
def test_check_values_false_skips_value_checks_pairwise(case, error, message, generator,
                                                        recorded_kernel):
    student, teacher = logits(generator)
    call_pairwise(student, teacher, generator=generator, check_values=False, **case(generator))
    assert len(recorded_kernel) == 1


@pytest.mark.parametrize("entry", MODULE_ENTRIES)
@pytest.mark.parametrize("case, error, message", KEPT_CASES)
def test_check_values_false_keeps_shape_and_dtype_checks(entry, case, error, message, generator,
                                                         no_kernel):
    student, teacher = logits(generator)
    with pytest.raises(error, match=message):
        MODULE_ENTRIES[entry](student, teacher, check_values=False, **case(generator))


@pytest.mark.parametrize("case, error, message", LOGIT_CASES)
def test_check_values_false_keeps_logit_checks(case, error, message, generator, no_kernel):
    student, teacher = case(*logits(generator))
    with pytest.raises(error, match=message):
        gkl_loss(student, teacher, check_values=False)
    with pytest.raises(error, match=message):
        pairwise_wmse(student, teacher, valid_weights(generator), check_values=False)


# --------------------------------------------------------------------------- non-finite logits


def _poison(x, value, row):
    x = x.clone()
    x[row, 2] = value
    return x


POISON = [pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf")]
# -inf is a masked class (README): non-finite only where the student puts -inf under teacher mass
POISONED_SIDES = [pytest.param(value, side, id=f"{name}-{side}")
                  for value, name in ((math.nan, "nan"), (math.inf, "inf"))
                  for side in ("student", "teacher")] + [
    pytest.param(-math.inf, "student", id="minus_inf-student")]


@pytest.mark.parametrize("interpreter", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("value, side", POISONED_SIDES)
@pytest.mark.parametrize("entry", ["gkl_loss", "GKLLoss", "dkl_loss", "dkl_loss_GI"])
def test_non_finite_logits_propagate(entry, value, side, interpreter, generator, monkeypatch):
    """Not an error: a NaN/inf logit makes the loss non-finite, on both backends (the backend is
    picked through "auto", so that dkl_loss, which has no backend argument, is covered too)."""
    monkeypatch.setattr(validation, "triton_interpreter_active", lambda: interpreter)
    student, teacher = logits(generator)
    if side == "student":
        student = _poison(student, value, 1)
    else:
        teacher = _poison(teacher, value, 1)
    loss = ENTRIES[entry](student, teacher, generator)
    assert loss.dim() == 0 and not torch.isfinite(loss)


@pytest.mark.parametrize("interpreter", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("entry", ["gkl_loss", "GKLLoss", "dkl_loss", "dkl_loss_GI"])
def test_minus_inf_teacher_logit_is_a_masked_class(entry, interpreter, generator, monkeypatch):
    """-inf in the teacher: p = 0 there and the class leaves the wMSE; the loss stays finite."""
    monkeypatch.setattr(validation, "triton_interpreter_active", lambda: interpreter)
    student, teacher = logits(generator)
    loss = ENTRIES[entry](student, _poison(teacher, -math.inf, 1), generator)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", POISON)
@pytest.mark.parametrize("normalize", ["weights", "batch"])
def test_non_finite_logits_propagate_without_ce(normalize, value, side, backend, generator):
    """With ce_weight=0 the wMSE alone (and, for the teacher, the normaliser made from its
    softmax) must carry the NaN/inf of a logit."""
    student, teacher = logits(generator)
    if side == "student":
        student = _poison(student, value, 2)
    else:
        teacher = _poison(teacher, value, 2)
    loss = gkl_loss(student, teacher, ce_weight=0.0, normalize=normalize, backend=backend)
    assert not torch.isfinite(loss)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", POISON)
def test_non_finite_logits_propagate_per_row(value, side, backend, generator):
    """pairwise_wmse, reduction="none": exactly the poisoned row is non-finite."""
    student, teacher = logits(generator)
    row = 2
    if side == "student":
        student = _poison(student, value, row)
    else:
        teacher = _poison(teacher, value, row)
    rows = pairwise_wmse(student, teacher, valid_weights(generator), reduction="none",
                         backend=backend)
    finite = torch.isfinite(rows)
    assert not finite[row]
    assert finite[torch.arange(B) != row].all()


@pytest.mark.parametrize("case, error, message", CHOICE_CASES + SCALAR_CASES + FLAG_CASES
                         + BLOCK_CASES)
def test_module_checks_options_at_construction(case, error, message, generator):
    """A bad option fails when the module is built, not at its first forward call."""
    with pytest.raises(error, match=message):
        GKLLoss(**case(generator))


@pytest.mark.parametrize("value", [-0.25, math.nan, math.inf])
def test_prior_rows_no_label_picks_are_not_checked(value, generator):
    """Only the prior rows that the labels pick reach the loss, and only they are checked."""
    student, teacher = logits(generator)
    labels = torch.tensor([0, 1, 0, 1])
    prior = _set(valid_prior(generator), (4, 2), value)
    loss = gkl_loss(student, teacher, labels=labels, class_prior=prior)
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ value checks without a sync


def dispatch_counter():
    """``gkl_kernels.testing.dispatch.DispatchCounter``: counts ``aten._local_scalar_dense`` (a
    device-to-host read, a synchronisation on CUDA) as ``host_syncs``."""
    from gkl_kernels.testing.dispatch import DispatchCounter
    return DispatchCounter()


@pytest.fixture
def device_side(monkeypatch):
    """Value checks take the CUDA branch on CPU tensors: ``torch._assert_async``, which on CPU
    raises a ``RuntimeError`` at once; returns the messages it was given."""
    messages = []
    real = torch._assert_async

    def recorded(condition, message):
        messages.append(message)
        return real(condition, message)
    monkeypatch.setattr(validation, "asserts_on_device", lambda device: True)
    monkeypatch.setattr(torch, "_assert_async", recorded)
    return messages


CPU = torch.device("cpu")


def _checked_weights(generator, bad):
    weights = valid_weights(generator)
    validation.check_nonnegative_finite("weights", _set(weights, (1, 2), bad) if bad else weights,
                                        True)


def _checked_labels(generator, bad):
    labels = _set(valid_labels(generator), 0, -100)  # an ignored row
    validation.check_labels(_set(labels, 2, bad) if bad else labels, B, C, CPU, True,
                            ignore_index=-100)


def _checked_prior(generator, bad):
    labels = _set(valid_labels(generator), 1, 3)  # row 3 is picked
    prior = valid_prior(generator)
    validation.check_prior(_set(prior, (3, 4), bad) if bad else prior, labels, C, CPU, True)


# check name -> (check(generator, bad value or None), a bad value, the argument its message names)
VALUE_CHECKS = {
    "weights_negative": (_checked_weights, -1.0, "weights"),
    "weights_nan": (_checked_weights, math.nan, "weights"),
    "labels_equal_C": (_checked_labels, C, "labels"),
    "labels_negative": (_checked_labels, -1, "labels"),
    "prior_inf": (_checked_prior, math.inf, "class_prior"),
    "prior_negative": (_checked_prior, -0.5, "class_prior"),
}


@pytest.mark.parametrize("check", VALUE_CHECKS)
def test_value_checks_on_the_device_do_not_sync(check, generator, device_side):
    """The CUDA branch: a device-side assertion with the message, and no device-to-host read,
    whether the values are good or bad."""
    run, bad, name = VALUE_CHECKS[check]
    with dispatch_counter() as counter:
        run(generator, None)
    assert counter.host_syncs == 0
    assert len(device_side) == 1 and name in device_side[0]
    with pytest.raises(RuntimeError, match=names(name)) as info, dispatch_counter() as counter:
        run(generator, bad)
    assert counter.host_syncs == 0
    assert not isinstance(info.value, ValueError)
    assert str(info.value) == device_side[-1]


@pytest.mark.parametrize("check", VALUE_CHECKS)
def test_value_checks_on_the_host_read_and_raise_value_errors(check, generator):
    """The CPU branch (the counter sees its reads, so the test above can fail)."""
    run, bad, name = VALUE_CHECKS[check]
    with dispatch_counter() as counter:
        run(generator, None)
    assert counter.host_syncs >= 1
    with pytest.raises(ValueError, match=names(name)):
        run(generator, bad)


def test_assert_values_on_the_host():
    validation.assert_values(torch.tensor(True), "unused",
                             host_message=lambda: pytest.fail("host_message of a passed check"))
    with pytest.raises(ValueError, match="^the message$"):
        validation.assert_values(torch.tensor(False), "the message")
    with pytest.raises(ValueError, match="^the precise message$"):
        validation.assert_values(torch.tensor(False), "the message",
                                 host_message=lambda: "the precise message")


def test_assert_values_device_side_can_be_forced_either_way(monkeypatch):
    with pytest.raises(RuntimeError, match="^the message$"):
        validation.assert_values(torch.tensor(False), "the message", device_side=True)
    validation.assert_values(torch.tensor(True), "the message", device_side=True)
    monkeypatch.setattr(validation, "asserts_on_device", lambda device: True)
    with pytest.raises(RuntimeError, match="^the message$"):
        validation.assert_values(torch.tensor(False), "the message")
    with pytest.raises(ValueError, match="^the message$"):
        validation.assert_values(torch.tensor(False), "the message", device_side=False)


def test_asserts_on_device():
    assert not validation.asserts_on_device(torch.device("cpu"))
    assert validation.asserts_on_device(torch.device("cuda"))
    assert validation.asserts_on_device(torch.device("cuda", 1))


@pytest.mark.parametrize("device_side", [None, True, False])
def test_assert_values_checks_nothing_on_meta(device_side):
    validation.assert_values(torch.tensor(False, device="meta"), "the message",
                             host_message=lambda: pytest.fail("a meta tensor was read"),
                             device_side=device_side)


def test_device_side_message_fits_cuda_assert_async():
    """torch's CUDA ``_assert_async`` refuses messages of 255 characters or more."""
    with pytest.raises(RuntimeError) as info:
        validation.assert_values(torch.tensor(False), "labels " + "x" * 400, device_side=True)
    message = str(info.value)
    assert message.startswith("labels xx") and message.endswith("...")
    assert len(message) <= validation.DEVICE_MESSAGE_LIMIT < 255


@pytest.mark.parametrize("entry", MODULE_ENTRIES)
@pytest.mark.parametrize("case, error, message", LABEL_VALUE_CASES + PRIOR_VALUE_CASES
                         + WEIGHT_VALUE_CASES + PAIR_WEIGHT_VALUE_CASES)
def test_value_errors_on_the_device_are_assertions_before_the_kernel(entry, case, error, message,
                                                                     generator, device_side,
                                                                     no_kernel):
    student, teacher = logits(generator)
    with pytest.raises(RuntimeError, match=message):
        MODULE_ENTRIES[entry](student, teacher, **case(generator))
    assert device_side and message in device_side[-1]


class ReachedKernel(Exception):
    pass


@pytest.mark.parametrize("source", ["prior", "prior_ignore_index", "factor", "shared", "per_row"])
def test_checks_before_the_kernel_do_not_sync_on_the_device(source, generator, device_side,
                                                            monkeypatch):
    """Everything ``gkl_loss`` runs before its kernel, with the CUDA branch of the checks: no
    device-to-host read."""
    def reached(*args, **kwargs):
        raise ReachedKernel
    reached.apply = reached  # RowLoss.apply
    for name in KERNEL_ENTRIES:
        monkeypatch.setattr(functional, name, reached, raising=False)
    student, teacher = logits(generator)
    kwargs = {"prior": lambda: dict(labels=valid_labels(generator),
                                    class_prior=valid_prior(generator)),
              "prior_ignore_index": lambda: dict(labels=_set(valid_labels(generator), 1, -100),
                                                 class_prior=valid_prior(generator)),
              "factor": lambda: dict(weights=valid_weights(generator)),
              "shared": lambda: dict(weights=torch.rand(C, C, generator=generator)),
              "per_row": lambda: dict(weights=torch.rand(B, C, C, generator=generator)),
              }[source]()
    with pytest.raises(ReachedKernel), dispatch_counter() as counter:
        gkl_loss(student, teacher, **kwargs)
    assert counter.host_syncs == 0
    assert device_side  # the values were checked, on the device


def test_prior_check_gathers_no_batch_by_classes_rows(generator):
    """The picked rows' verdicts are gathered, not the rows: no op writes anything near B x C."""
    batch, classes = 256, 8
    prior = valid_prior(generator, classes)
    labels = valid_labels(generator, batch, classes)
    with dispatch_counter() as counter:
        validation.check_prior(prior, labels, classes, CPU, True)
    largest = max(op.bytes_written for op in counter.ops)
    assert largest < batch * classes * prior.element_size() // 4, counter.per_op()


def test_prior_check_skips_rows_outside_keep(generator):
    prior = _set(valid_prior(generator), (2, 0), math.nan)
    labels = torch.tensor([0, 2, 1, 2])
    with pytest.raises(ValueError, match=r"class_prior must be finite.*row 2"):
        validation.check_prior(prior, labels, C, CPU, True)
    validation.check_prior(prior, labels, C, CPU, True,
                           keep=torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match="class_prior"):
        validation.check_prior(prior, labels, C, CPU, True,
                               keep=torch.tensor([False, False, False, True]))


# --------------------------------------------------------------------------- temperatures


@pytest.mark.parametrize("value", [1e-39, 2.9e-39, 1e-40, 1.4e-45, 5e-324])
@pytest.mark.parametrize("name", ["temperature", "weight_temperature"])
def test_temperature_whose_inverse_overflows_float32_is_refused(name, value):
    assert math.isinf(torch.tensor(1.0 / value, dtype=torch.float32).item())  # the hazard
    with pytest.raises(ValueError, match=rf"{name} must be >= 1 / float32 max"):
        GKLOptions(**{name: value})


@pytest.mark.parametrize("name", ["temperature", "weight_temperature"])
def test_smallest_temperature_is_accepted(name, generator):
    value = validation.MIN_TEMPERATURE
    assert math.isfinite(torch.tensor(1.0 / value, dtype=torch.float32).item())
    GKLOptions(**{name: value})
    student, teacher = logits(generator)
    loss = gkl_loss(student, teacher, backend="torch", **{name: value})
    assert loss.dim() == 0  # it runs (logits / T may overflow: the loss need not be finite)


# --------------------------------------------------------------- TRITON_INTERPRET set too late


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("entry", ["gkl_loss", "GKLLoss", "pairwise_wmse"])
def test_interpreter_requested_but_not_in_effect_is_refused(entry, backend, generator,
                                                            monkeypatch, no_kernel):
    monkeypatch.setattr(validation, "triton_interpreter_active", lambda: True)
    monkeypatch.setattr(validation, "triton_functions_interpreted", lambda: False)
    student, teacher = logits(generator)
    with pytest.raises(ValueError, match=names("backend") + r"[\s\S]*TRITON_INTERPRET must be "
                       r"set before triton is imported"):
        ENTRIES[entry](student, teacher, generator, backend=backend)


def test_interpreter_requested_but_not_in_effect_leaves_torch_and_cuda_alone(generator,
                                                                           monkeypatch):
    monkeypatch.setattr(validation, "triton_interpreter_active", lambda: True)
    monkeypatch.setattr(validation, "triton_functions_interpreted", lambda: False)
    student, teacher = logits(generator)
    assert validation.use_triton_for("torch", CPU) is False
    assert torch.isfinite(gkl_loss(student, teacher, backend="torch"))
    for backend in ("auto", "triton"):  # GPU kernels are what CUDA tensors need
        assert validation.use_triton_for(backend, torch.device("cuda"))


def test_triton_functions_are_interpreted_under_the_test_setup(monkeypatch):
    """conftest sets TRITON_INTERPRET=1 before triton is imported."""
    assert validation.triton_functions_interpreted()
    from triton.language import standard
    monkeypatch.setattr(standard, "sigmoid", type("JITFunction", (), {})())
    assert not validation.triton_functions_interpreted()


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False),
                                             ("true", False), ("2", False)])
def test_interpreter_variable_without_triton_knobs(value, expected, monkeypatch):
    """triton < 3.4 has no ``triton.knobs``; its ``@jit`` interprets for TRITON_INTERPRET == "1"."""
    import triton
    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setitem(sys.modules, "triton.knobs", None)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert validation.triton_interpreter_active() is expected


LATE_INTERPRETER_SCRIPT = """
import json, os, sys
if sys.argv[1] == "triton":
    import triton
else:
    import gkl_kernels
outcome = {"triton imported": "triton" in sys.modules}
os.environ["TRITON_INTERPRET"] = "1"
import torch
import gkl_kernels
student, teacher = torch.randn(4, 10), torch.randn(4, 10)
labels, prior = torch.tensor([0, 3, 9, 2]), torch.full((10, 10), 0.1)
for backend in ("triton", "auto", "torch"):
    try:
        loss = gkl_kernels.gkl_loss(student, teacher, labels=labels, class_prior=prior,
                                    backend=backend)
        outcome[backend] = "finite" if bool(torch.isfinite(loss)) else "not finite"
    except Exception as error:
        outcome[backend] = f"{type(error).__name__}: {error}"
print(json.dumps(outcome))
"""


@pytest.mark.parametrize("first", ["triton", "gkl_kernels"])
def test_interpreter_set_after_triton_import_in_a_fresh_process(first):
    """The real thing: TRITON_INTERPRET=1 set after ``import triton``, then a CPU call; without
    the check it ends in "0 active drivers" or "Cannot call @triton.jit'd outside of the scope of
    a kernel". ``import gkl_kernels`` imports no triton (nor Dynamo, which would): the variable
    set after it takes effect, and the Triton path runs in the interpreter."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", LATE_INTERPRETER_SCRIPT, first], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome.pop("triton imported") == (first == "triton")
    if first == "gkl_kernels":
        assert outcome == {"triton": "finite", "auto": "finite", "torch": "finite"}
        return
    for backend in ("triton", "auto"):
        assert outcome[backend].startswith(f"ValueError: backend={backend!r}"), outcome[backend]
        assert "TRITON_INTERPRET must be set before triton is imported" in outcome[backend]
    assert outcome["torch"] == "finite"


def test_importing_the_package_leaves_dynamo_unimported():
    """``import gkl_kernels`` does not import Dynamo (most of a second of every import, and of
    every process a trainer spawns): the checks that compile as constants carry the mark of
    ``torch.compiler.assume_constant_result`` (which imports Dynamo) without it, and that mark
    is the one the decorator sets."""
    script = "import sys, gkl_kernels; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"

    def marked(decorate):
        def function():
            return 1
        before = dict(vars(function))
        decorate(function)
        return {key: value for key, value in vars(function).items() if before.get(key) != value}

    mark = marked(torch.compiler.assume_constant_result)
    assert marked(validation.constant_under_compile) == mark != {}
    for function in (validation.triton_installed, validation.triton_interpreter_active,
                     validation.triton_functions_interpreted):
        assert all(getattr(function, key) == value for key, value in mark.items())


# --------------------------------------------------------------------------- meta tensors


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


META_SOURCES = {
    "teacher": lambda: {},
    "prior": lambda: dict(labels=_meta(B, dtype=torch.int64), class_prior=_meta(C, C)),
    "prior_int32_labels": lambda: dict(labels=_meta(B, dtype=torch.int32),
                                       class_prior=_meta(C, C)),
    "labels_only": lambda: dict(labels=_meta(B, dtype=torch.int64)),
    "factor": lambda: dict(weights=_meta(B, C), weights_kind="factor"),
    "shared": lambda: dict(weights=_meta(C, C)),
    "per_row": lambda: dict(weights=_meta(B, C, C)),
}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("source", META_SOURCES)
@pytest.mark.parametrize("entry", MODULE_ENTRIES)
def test_meta_tensors_give_a_meta_loss_and_gradients(entry, source, backend):
    """Shapes without values (e.g. to plan memory): the torch path runs on meta tensors, labels
    and priors included; value checks are skipped, there are no values."""
    student = _meta(B, C).requires_grad_()
    teacher = _meta(B, C).requires_grad_()
    loss = MODULE_ENTRIES[entry](student, teacher, backend=backend, **META_SOURCES[source]())
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    for x in (student, teacher):
        assert x.grad.device.type == "meta" and x.grad.shape == (B, C)


def test_meta_tensors_in_pairwise_wmse_and_dkl_loss():
    rows = pairwise_wmse(_meta(B, C), _meta(B, C), _meta(B, C), reduction="none")
    assert rows.device.type == "meta" and rows.shape == (B,)
    loss = compat.dkl_loss(_meta(B, C), _meta(B, C), 4.0, 1.0, 16.0, 0.5,
                           CLASS_PRIOR=_meta(B, C), GI=True)
    assert loss.device.type == "meta"


@pytest.mark.parametrize("source", ["teacher", "prior"])
def test_meta_tensors_with_the_triton_backend_are_refused(source, no_kernel):
    with pytest.raises(ValueError, match=names("backend", "meta")):
        gkl_loss(_meta(B, C), _meta(B, C), backend="triton", **META_SOURCES[source]())
