"""Benchmark cases: a shape, the loss options, and which logits need gradients.

Loss options follow SPEC.md's table of paper settings (``mse_weight`` is the authors' code's beta,
``ce_weight`` its alpha). ``series`` groups cases that differ only in ``C``: the plot draws time and
memory against ``C`` for the series ``PLOT_SERIES``.
"""

import dataclasses

import torch

PRIOR = "prior"
TEACHER = "teacher"
SHARED = "shared"
PER_ROW = "per_row"
PLOT_SERIES = "imagenet-prior"
HEADLINE_SHAPE = (256, 1000)  # (B, C) at which the ratios' targets are set

IMAGENET = dict(mse_weight=0.5, ce_weight=1.0, gamma=0.6, temperature=1.0, weight_temperature=1.0)
CIFAR100_KD = dict(mse_weight=16.0, ce_weight=1.0, gamma=0.05, temperature=4.0,
                   weight_temperature=4.0)
CIFAR100_ADV = dict(mse_weight=20.0, ce_weight=4.0, gamma=0.4, temperature=4.0,
                    weight_temperature=1.0)
TOKEN_KD = dict(mse_weight=1.0, ce_weight=1.0, gamma=0.6, temperature=2.0, weight_temperature=2.0)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark point. ``weights``: ``"prior"`` (labels and a ``(C, C)`` class prior),
    ``"teacher"`` (``softmax(t / T2) ** gamma``), ``"shared"`` (one ``(C, C)`` class-similarity
    matrix for every row) or ``"per_row"`` (a ``(B, C, C)`` tensor). ``adversarial``: the teacher
    logits need gradients too (adversarial training), else only the student's."""

    name: str
    batch: int
    classes: int
    weights: str
    options: dict
    adversarial: bool = False
    series: str = ""

    @property
    def pairs(self):
        """``B * C * C``, the size of each pairwise tensor of the reference."""
        return self.batch * self.classes * self.classes

    @property
    def shape(self):
        return f"B={self.batch} C={self.classes}"

    @property
    def group(self):
        """The kernels the case runs: ``"rank-one"`` (prior and teacher weights), ``"shared"`` or
        ``"per_row"``; the headline ratios are given per group."""
        return self.weights if self.weights in (SHARED, PER_ROW) else "rank-one"


def make_inputs(case, seed=0):
    """Float32 ``(student, teacher, loss_kwargs)`` for ``case``: logits ``3 * N(0, 1)``, leaves
    with ``requires_grad`` set as the case says; ``loss_kwargs`` has the case's options and, for
    the prior source, ``labels`` and a row-stochastic ``(C, C)`` prior (softmax of random rows,
    diagonal boosted, as a trained teacher's class means look); for shared weights the same kind
    of matrix (not symmetric) as ``weights``; for per-row weights a uniform random ``(B, C, C)``
    tensor."""
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.classes)
    student = (3.0 * torch.randn(shape, generator=generator)).requires_grad_()
    teacher = (3.0 * torch.randn(shape, generator=generator)).requires_grad_(case.adversarial)
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
    elif case.weights == PER_ROW:
        weights = torch.rand(case.batch, case.classes, case.classes, generator=generator)
        kwargs.update(weights=weights, weights_kind=PER_ROW)
    return student, teacher, kwargs


def full_cases():
    """The cases of ``python -m bench``: SPEC.md's CIFAR-100 settings, a teacher-weighted KD case,
    the ImageNet options at B=256 for C = 10 ... 10 000 (C=1000 gives the headline ratios), the
    ImageNet paper shape B=512, token-level distillation at vocabulary sizes, a shared ``(C, C)``
    matrix at B=256, C=1000 (its own headline) and CIFAR-100 adversarial training with a
    ``(B, C, C)`` weight."""
    sweep = [Case(f"imagenet C={c}", 256, c, PRIOR, IMAGENET, series=PLOT_SERIES)
             for c in (10, 100, 1000, 10000)]
    return [
        Case("cifar100-kd", 64, 100, PRIOR, CIFAR100_KD),
        Case("cifar100-adv", 128, 100, PRIOR, CIFAR100_ADV, adversarial=True),
        Case("teacher-weights", 64, 1000, TEACHER, IMAGENET),
        *sweep,
        Case("imagenet-kd", 512, 1000, PRIOR, IMAGENET),
        Case("token-kd 32k", 512, 32000, TEACHER, TOKEN_KD),
        Case("token-kd 128k", 256, 131072, TEACHER, TOKEN_KD),
        Case("shared C=1000", 256, 1000, SHARED, IMAGENET),
        Case("cifar100-adv per-row", 128, 100, PER_ROW, CIFAR100_ADV, adversarial=True),
    ]


def quick_cases():
    """Small shapes for ``--quick`` (tests, CI): every weight source, adversarial cases and a
    two-point series for the plot."""
    return [
        Case("imagenet C=10", 32, 10, PRIOR, IMAGENET, series=PLOT_SERIES),
        Case("imagenet C=100", 32, 100, PRIOR, IMAGENET, series=PLOT_SERIES),
        Case("adv teacher-weights", 16, 100, TEACHER, CIFAR100_ADV, adversarial=True),
        Case("shared C=100", 32, 100, SHARED, IMAGENET),
        Case("adv per-row C=50", 16, 50, PER_ROW, CIFAR100_ADV, adversarial=True),
    ]


def headline_cases(cases, groups):
    """The cases the ratios are printed for, one for each of ``groups`` present in ``cases``: the
    group's case at B=256, C=1000 when there is one, else its largest case."""
    chosen = []
    for group in groups:
        members = [case for case in cases if case.group == group]
        if members:
            at_shape = [case for case in members if (case.batch, case.classes) == HEADLINE_SHAPE]
            chosen.append(at_shape[0] if at_shape else max(members, key=lambda c: c.pairs))
    return chosen
