"""The drop-in of README.md in the authors' mdistiller-based trainer: ``compat.dkl_loss`` called
exactly as their ``GKL_KD`` distiller calls it (positional arguments, a warm-up factor, the
trainer's ``.mean()`` and sum of the losses), and ``ClassPrior`` in place of the trainer's
hand-rolled prior, against both written out in float64 from SPEC.md."""

import torch
import torch.nn.functional as F

from gkl_kernels import ClassPrior, compat
from tests.conftest import assert_close_rel

CLASSES, ROWS, STEPS = 7, 12, 4
# GKL_KD's settings on CIFAR-100 (temperature, alpha, beta, gamma, T2), warm-up 5 epochs
TEMPERATURE, ALPHA, BETA, GAMMA, T2, WARMUP, CE_WEIGHT = 4.0, 1.0, 16.0, 0.05, 4.0, 5, 1.0


def authors_gkl_float64(student, teacher, class_prior):
    """SPEC.md's GKL with rank-one weights ``v = CLASS_PRIOR ** gamma``, pairwise, float64:
    ``beta/4 * sum w (Dt - Ds)^2 / sum w + alpha * CE(softmax(t/T), log_softmax(s/T))``."""
    v = class_prior ** GAMMA
    w = v[:, :, None] * v[:, None, :]
    dt = teacher[:, :, None] - teacher[:, None, :]
    ds = student[:, :, None] - student[:, None, :]
    wmse = 0.25 * (w * (dt - ds) ** 2).sum() / w.sum()
    ce = -(F.softmax(teacher / TEMPERATURE, 1) * F.log_softmax(student / TEMPERATURE, 1)).sum(1)
    return BETA * wmse + ALPHA * ce.mean()


def authors_prior(batches, previous):
    """The trainer's prior: ``PRIOR += onehot(y)^T @ softmax(t / T2)`` per step, then each row
    divided by its sum; rows of unseen classes keep ``previous`` (where the trainer divides 0 by
    0)."""
    accumulated = torch.zeros(CLASSES, CLASSES, dtype=torch.float64)
    for teacher, labels in batches:
        onehot = F.one_hot(labels, CLASSES).double()
        accumulated += onehot.t() @ F.softmax(teacher.double() / T2, dim=1)
    sums = accumulated.sum(1, keepdim=True)
    return torch.where(sums > 0, accumulated / sums.clamp_min(1e-300), previous)


def batches_of(generator, labels_from):
    return [(3 * torch.randn(ROWS, CLASSES, generator=generator),
             torch.randint(0, labels_from, (ROWS,), generator=generator)) for _ in range(STEPS)]


def test_class_prior_replaces_the_trainers_accumulation(generator):
    uniform = torch.full((CLASSES, CLASSES), 1.0 / CLASSES, dtype=torch.float64)
    prior = ClassPrior(CLASSES, weight_temperature=T2)
    first = batches_of(generator, CLASSES)
    for teacher, labels in first:
        prior.update(teacher, labels)
    expected = authors_prior(first, uniform)
    torch.testing.assert_close(prior.end_epoch().double(), expected, rtol=1e-5, atol=1e-7)
    # an epoch without the last two classes: their rows stay, the others are renewed
    second = batches_of(generator, CLASSES - 2)
    for teacher, labels in second:
        prior.update(teacher, labels)
    torch.testing.assert_close(prior.end_epoch().double(), authors_prior(second, expected),
                               rtol=1e-5, atol=1e-7)


def test_dkl_loss_as_the_gkl_kd_distiller_calls_it(generator):
    prior = ClassPrior(CLASSES, weight_temperature=T2)
    for teacher, labels in batches_of(generator, CLASSES):
        prior.update(teacher, labels)
    prior.end_epoch()
    student = 3 * torch.randn(ROWS, CLASSES, generator=generator)
    teacher = 3 * torch.randn(ROWS, CLASSES, generator=generator)
    target = torch.randint(0, CLASSES, (ROWS,), generator=generator)
    epoch = 2  # inside the warm-up: the factor is 2 / 5

    # the distiller's forward_train and the trainer's train_iter, as they are written
    logits_student = student.clone().requires_grad_()
    loss_ce = CE_WEIGHT * F.cross_entropy(logits_student, target)
    class_prior = F.one_hot(target, CLASSES).float() @ prior.matrix()
    loss_dkl = min(epoch / WARMUP, 1.0) * compat.dkl_loss(
        logits_student, teacher, TEMPERATURE, ALPHA, BETA, GAMMA, class_prior, True, T2)
    losses_dict = {"loss_ce": loss_ce, "loss_kd": loss_dkl}
    loss = sum(value.mean() for value in losses_dict.values())
    loss.backward()

    s64 = student.double().requires_grad_()
    expected = CE_WEIGHT * F.cross_entropy(s64, target) + min(epoch / WARMUP, 1.0) * \
        authors_gkl_float64(s64, teacher.double(), class_prior.double())
    expected.backward()
    assert_close_rel(loss.detach(), expected.detach(), 2e-5, "loss")
    assert_close_rel(logits_student.grad, s64.grad, 2e-5, "student gradient")
    # the same rows without the one-hot product
    torch.testing.assert_close(prior.matrix()[target], class_prior)
