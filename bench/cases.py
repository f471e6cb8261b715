"""Benchmark cases: a shape, the loss options, and which logits need gradients.

Loss options follow docs/SPEC.md's paper settings (``mse_weight`` is the authors' code's beta,
``ce_weight`` its alpha). ``series`` groups cases that differ only in ``C`` (and ``B``, where
``B x C`` would not fit): the plot draws time and memory against ``C`` for the series
``PLOT_SERIES``.
"""

import dataclasses

import torch

PRIOR = "prior"
TEACHER = "teacher"
EXPLICIT = "explicit"
SHARED = "shared"
PER_ROW = "per_row"
PLOT_SERIES = "sweep"
HEADLINE_SHAPE = (256, 1000)  # (B, C) at which the ratios' targets are set
# the sweep of C: CIFAR-10, CIFAR-100, ImageNet-1k, ImageNet-21k, and language-model vocabularies
SWEEP_CLASSES = (10, 100, 1000, 21841, 32000, 131072, 262144)
SWEEP_BATCH = 256
SWEEP_ELEMENTS = 2**23  # at most this many logits per tensor (32 MiB in float32): fewer rows

IMAGENET = dict(mse_weight=0.5, ce_weight=1.0, gamma=0.6, temperature=1.0, weight_temperature=1.0)
CIFAR100_KD = dict(mse_weight=16.0, ce_weight=1.0, gamma=0.05, temperature=4.0,
                   weight_temperature=4.0)
CIFAR100_ADV = dict(mse_weight=20.0, ce_weight=4.0, gamma=0.4, temperature=4.0,
                    weight_temperature=1.0)
TOKEN_KD = dict(mse_weight=1.0, ce_weight=1.0, gamma=0.6, temperature=2.0, weight_temperature=2.0)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point. ``weights``: ``"prior"`` (labels and a ``(C, C)`` class prior),
    ``"teacher"`` (``softmax(t / T2) ** gamma``), ``"explicit"`` (a given ``(B, C)`` factor),
    ``"shared"`` (one ``(C, C)`` class-similarity matrix for every row) or ``"per_row"`` (a
    ``(B, C, C)`` tensor). ``adversarial``: the teacher logits need gradients too (adversarial
    training), else only the student's. ``dtype``: of both logits, ``"float32"`` or
    ``"bfloat16"`` (weights stay float32)."""

    name: str
    batch: int
    classes: int
    weights: str
    options: dict
    adversarial: bool = False
    series: str = ""
    dtype: str = "float32"

    @property
    def pairs(self):
        """``B * C * C``, the size of each pairwise tensor of the reference."""
        return self.batch * self.classes * self.classes

    @property
    def shape(self):
        return f"B={self.batch} C={self.classes}"

    @property
    def elements(self):
        """``B * C``, the size of each logit tensor."""
        return self.batch * self.classes

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def floor_bytes(self):
        """``(forward, backward)`` bytes that SPEC-level arithmetic cannot avoid: forward reads
        ``s`` and ``t``; backward reads them again and writes the student's gradient (and the
        teacher's, in adversarial cases). Weights are not counted."""
        logits = self.elements * torch.empty(0, dtype=self.torch_dtype).element_size()
        return 2 * logits, (4 if self.adversarial else 3) * logits

    @property
    def group(self):
        """The kernels the case runs: ``"rank-one"`` (prior and teacher weights), ``"shared"`` or
        ``"per_row"``; the headline ratios are given per group."""
        return self.weights if self.weights in (SHARED, PER_ROW) else "rank-one"


def make_inputs(case, seed=0):
    """``(student, teacher, loss_kwargs)`` for ``case``: logits ``3 * N(0, 1)`` in the case's
    dtype, leaves with ``requires_grad`` set as the case says; ``loss_kwargs`` has the case's
    options and, for the prior source, ``labels`` and a row-stochastic ``(C, C)`` prior (softmax
    of random rows, diagonal boosted, as a trained teacher's class means look); for shared weights
    the same kind of matrix (not symmetric) as ``weights``; for an explicit factor uniform random
    ``(B, C)`` weights; for per-row weights a uniform random ``(B, C, C)`` tensor."""
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.classes)
    student = (3.0 * torch.randn(shape, generator=generator)).to(case.torch_dtype)
    teacher = (3.0 * torch.randn(shape, generator=generator)).to(case.torch_dtype)
    student.requires_grad_()
    teacher.requires_grad_(case.adversarial)
    kwargs = dict(case.options)
    if case.weights in (PRIOR, SHARED):
        prior_logits = torch.randn(case.classes, case.classes, generator=generator)
        prior_logits.diagonal().add_(4.0)
        class_matrix = torch.softmax(prior_logits, dim=1)
    if case.weights == PRIOR:
        kwargs["class_prior"] = class_matrix
        kwargs["labels"] = torch.randint(0, case.classes, (case.batch,), generator=generator)
    elif case.weights == SHARED:
        kwargs.update(weights=class_matrix, weights_kind=SHARED)
    elif case.weights == EXPLICIT:
        kwargs.update(weights=torch.rand(shape, generator=generator), weights_kind="factor")
    elif case.weights == PER_ROW:
        weights = torch.rand(case.batch, case.classes, case.classes, generator=generator)
        kwargs.update(weights=weights, weights_kind=PER_ROW)
    return student, teacher, kwargs


def sweep_batch(num_classes):
    """The sweep's ``B`` at ``C = num_classes``: ``SWEEP_BATCH`` rows, fewer where ``B x C`` would
    pass ``SWEEP_ELEMENTS`` (rows of tokens for the large vocabularies)."""
    return max(1, min(SWEEP_BATCH, SWEEP_ELEMENTS // num_classes))


def full_cases():
    """The cases of ``python -m bench``: docs/SPEC.md's paper settings (CIFAR-100 KD and adversarial
    training, ImageNet at B=256 in float32 and bfloat16 (the headline ratios) and at the paper's
    B=512), the sweep of ``C`` with teacher weights, an explicit ``(B, C)`` factor, token-level
    distillation at a 128k vocabulary in bfloat16, a shared ``(C, C)`` matrix at B=256, C=1000
    (its own headline) and CIFAR-100 adversarial training with a ``(B, C, C)`` weight."""
    sweep = [Case(f"sweep C={c}", sweep_batch(c), c, TEACHER, IMAGENET, series=PLOT_SERIES)
             for c in SWEEP_CLASSES]
    return [
        Case("cifar100-kd", 64, 100, PRIOR, CIFAR100_KD),
        Case("cifar100-adv", 128, 100, PRIOR, CIFAR100_ADV, adversarial=True),
        Case("imagenet", 256, 1000, PRIOR, IMAGENET),
        Case("imagenet bf16", 256, 1000, PRIOR, IMAGENET, dtype="bfloat16"),
        Case("imagenet-kd B=512", 512, 1000, PRIOR, IMAGENET),
        Case("explicit factor", 64, 1000, EXPLICIT, IMAGENET),
        *sweep,
        Case("token-kd 128k bf16", sweep_batch(131072), 131072, TEACHER, TOKEN_KD,
             dtype="bfloat16"),
        Case("shared C=1000", 256, 1000, SHARED, IMAGENET),
        Case("cifar100-adv per-row", 128, 100, PER_ROW, CIFAR100_ADV, adversarial=True),
    ]


def quick_cases():
    """Small shapes for ``--quick`` (tests, CI): every weight source and shape, adversarial
    cases, bfloat16, and a two-point series for the plot."""
    return [
        Case("sweep C=10", 32, 10, TEACHER, IMAGENET, series=PLOT_SERIES),
        Case("sweep C=100", 32, 100, TEACHER, IMAGENET, series=PLOT_SERIES),
        Case("prior bf16", 32, 100, PRIOR, IMAGENET, dtype="bfloat16"),
        Case("adv explicit", 16, 100, EXPLICIT, CIFAR100_ADV, adversarial=True),
        Case("shared C=100", 32, 100, SHARED, IMAGENET),
        Case("adv per-row C=50", 16, 50, PER_ROW, CIFAR100_ADV, adversarial=True),
    ]


DEFAULT_CASES = ("imagenet",)  # python -m bench without --full: the headline shape only
QUICK_DEFAULT_CASES = ("sweep C=100",)  # and with --quick


def planned_cases(quick, full, names):
    """The cases a run times: those named in ``names`` from the full (or ``quick``) list, else
    all of them with ``full``, else the default ones."""
    cases = quick_cases() if quick else full_cases()
    if not names and not full:
        names = QUICK_DEFAULT_CASES if quick else DEFAULT_CASES
    return select_cases(cases, names)


def select_cases(cases, names):
    """The cases named in ``names`` (all when ``names`` is empty), in their order."""
    unknown = set(names) - {case.name for case in cases}
    if unknown:
        raise ValueError(f"unknown cases {sorted(unknown)}; known: {[c.name for c in cases]}")
    return [case for case in cases if not names or case.name in names]


def headline_cases(cases, groups):
    """The cases the ratios are printed for, one for each of ``groups`` and dtype present in
    ``cases``: the first of the group's cases at B=256, C=1000 when there is one, else its
    largest case."""
    chosen = []
    for group in groups:
        for dtype in dict.fromkeys(case.dtype for case in cases):
            members = [case for case in cases if case.group == group and case.dtype == dtype]
            if members:
                at_shape = [case for case in members
                            if (case.batch, case.classes) == HEADLINE_SHAPE]
                chosen.append(at_shape[0] if at_shape else max(members, key=lambda c: c.pairs))
    return chosen
