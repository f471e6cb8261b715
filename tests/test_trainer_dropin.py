"""The drop-in of docs/DROP_IN.md in the authors' trainers: ``compat.dkl_loss`` called exactly as
their ``GKL_KD`` distiller calls it (positional arguments, a warm-up factor, the trainer's
``.mean()`` and sum of the losses), and ``ClassPrior`` in place of their hand-rolled priors (the
distillation trainer's, fed the ``logits_teacher / T2`` that ``forward_train`` returns; the
adversarial trainers', with the first paper's ``--m`` blend), against both written out in float64
from docs/SPEC.md."""

import pytest
import torch
import torch.nn.functional as F

from gkl_kernels import ClassPrior, compat
from tests.conftest import assert_close_rel, relative_error

pytestmark = pytest.mark.entry_point  # the kernels through an entry point: CI runs it once

CLASSES, ROWS, STEPS = 7, 12, 4
# GKL_KD's settings on CIFAR-100 (temperature, alpha, beta, gamma, T2), warm-up 5 epochs
TEMPERATURE, ALPHA, BETA, GAMMA, T2, WARMUP, CE_WEIGHT = 4.0, 1.0, 16.0, 0.05, 4.0, 5, 1.0
ADV_T = 4.0  # the adversarial trainers' --T: the prior's softmax(logits_nat / T)


def authors_gkl_float64(student, teacher, class_prior):
    """docs/SPEC.md's GKL with rank-one weights ``v = CLASS_PRIOR ** gamma``, pairwise, float64:
    ``beta/4 * sum w (Dt - Ds)^2 / sum w + alpha * CE(softmax(t/T), log_softmax(s/T))``."""
    v = class_prior ** GAMMA
    w = v[:, :, None] * v[:, None, :]
    dt = teacher[:, :, None] - teacher[:, None, :]
    ds = student[:, :, None] - student[:, None, :]
    wmse = 0.25 * (w * (dt - ds) ** 2).sum() / w.sum()
    ce = -(F.softmax(teacher / TEMPERATURE, 1) * F.log_softmax(student / TEMPERATURE, 1)).sum(1)
    return BETA * wmse + ALPHA * ce.mean()


def accumulated_rows(batches, previous, temperature):
    """A trainer's epoch prior: ``PRIOR += onehot(y)^T @ softmax(x / temperature)`` per step,
    then each row divided by its sum; rows of unseen classes keep ``previous`` (where the
    trainers divide 0 by 0)."""
    accumulated = torch.zeros(CLASSES, CLASSES, dtype=torch.float64)
    for logits, labels in batches:
        onehot = F.one_hot(labels, CLASSES).double()
        accumulated += onehot.t() @ F.softmax(logits.double() / temperature, dim=1)
    sums = accumulated.sum(1, keepdim=True)
    return torch.where(sums > 0, accumulated / sums.clamp_min(1e-300), previous)


def kd_trainer_prior(teacher_feats, previous):
    """BaseTrainer.train_epoch: the distiller returns ``teacher_feat = logits_teacher / T2`` and
    the trainer adds ``softmax(teacher_feat)``: T2 is applied once, by the distiller."""
    return accumulated_rows(teacher_feats, previous, 1.0)


def batches_of(generator, labels_from):
    return [(3 * torch.randn(ROWS, CLASSES, generator=generator),
             torch.randint(0, labels_from, (ROWS,), generator=generator)) for _ in range(STEPS)]


UNIFORM = torch.full((CLASSES, CLASSES), 1.0 / CLASSES, dtype=torch.float64)


@pytest.mark.parametrize("recipe", ["teacher_feat", "teacher_feat_times_t2"])
def test_class_prior_replaces_the_trainers_accumulation(recipe, generator):
    """Inside train_epoch only ``teacher_feat = logits_teacher / T2`` is in scope: pass it to a
    ``ClassPrior(C)`` (weight_temperature 1), or ``teacher_feat * T2`` to
    ``ClassPrior(C, weight_temperature=T2)``."""
    if recipe == "teacher_feat":
        prior, scale = ClassPrior(CLASSES), 1.0
    else:
        prior, scale = ClassPrior(CLASSES, weight_temperature=T2), T2
    first = [(teacher / T2, labels) for teacher, labels in batches_of(generator, CLASSES)]
    for teacher_feat, labels in first:
        prior.update(teacher_feat * scale, labels)
    expected = kd_trainer_prior(first, UNIFORM)
    torch.testing.assert_close(prior.end_epoch().double(), expected, rtol=1e-5, atol=1e-7)
    # an epoch without the last two classes: their rows stay, the others are renewed
    second = [(teacher / T2, labels) for teacher, labels in batches_of(generator, CLASSES - 2)]
    for teacher_feat, labels in second:
        prior.update(teacher_feat * scale, labels)
    torch.testing.assert_close(prior.end_epoch().double(), kd_trainer_prior(second, expected),
                               rtol=1e-5, atol=1e-7)


def test_teacher_feat_with_weight_temperature_t2_divides_twice(generator):
    """The misreading: ``ClassPrior(C, weight_temperature=T2).update(teacher_feat, ...)`` applies
    T2 a second time, a different prior."""
    batches = [(teacher / T2, labels) for teacher, labels in batches_of(generator, CLASSES)]
    prior = ClassPrior(CLASSES, weight_temperature=T2)
    for teacher_feat, labels in batches:
        prior.update(teacher_feat, labels)
    assert (prior.end_epoch().double() - kd_trainer_prior(batches, UNIFORM)).abs().max() > 1e-2


def adversarial_epochs(generator, epochs, bt):
    """Each step: ``logits_nat`` of ``2 * bt`` rows (the augmented copies after the first ``bt``),
    of which the trainers accumulate the first ``bt``."""
    return [[(3 * torch.randn(2 * bt, CLASSES, generator=generator),
              torch.randint(0, CLASSES, (2 * bt,), generator=generator)) for _ in range(STEPS)]
            for _ in range(epochs)]


@pytest.mark.parametrize("m", [1.0, 0.9, 0.3])
def test_class_prior_replaces_the_first_papers_adversarial_blend(m, generator):
    """train_dkl_cifar*.py (first paper): ``WEIGHT / WEIGHT.sum(1) * m + weight * (1 - m)`` at the
    end of each epoch, ``WEIGHT`` summing ``softmax(logits_nat[:bt] / T)``: that is
    ``ClassPrior(C, weight_temperature=T, momentum=1 - m)`` (m = 1, the default: momentum 0)."""
    bt = ROWS // 2
    prior = ClassPrior(CLASSES, weight_temperature=ADV_T, momentum=1 - m)
    weight = UNIFORM
    for epoch in adversarial_epochs(generator, 3, bt):
        for logits_nat, target in epoch:
            prior.update(logits_nat[:bt], target[:bt])
        epoch_rows = accumulated_rows([(x[:bt], y[:bt]) for x, y in epoch], weight, ADV_T)
        weight = epoch_rows * m + weight * (1 - m)
        torch.testing.assert_close(prior.end_epoch().double(), weight, rtol=1e-5, atol=1e-7)


def test_second_papers_adversarial_trainer(generator):
    """train_dkl_cifar*.py (second paper): the epoch's rows, no blend; the loss
    ``dkl_loss(logits_adv, logits_nat, CLASS_PRIOR=onehot(y) @ weight, alpha=, beta=, gamma=)``
    (its default temperature 1), both logits from the trained model."""
    bt, alpha, beta, gamma = ROWS // 2, 4.0, 20.0, 0.4
    prior = ClassPrior(CLASSES, weight_temperature=ADV_T)
    (epoch,) = adversarial_epochs(generator, 1, bt)
    for logits_nat, target in epoch:
        prior.update(logits_nat[:bt], target[:bt])
    weight = accumulated_rows([(x[:bt], y[:bt]) for x, y in epoch], UNIFORM, ADV_T)
    torch.testing.assert_close(prior.end_epoch().double(), weight, rtol=1e-5, atol=1e-7)

    nat, target = epoch[0]
    adv = nat + torch.randn(nat.shape, generator=generator)
    sample_weight = F.one_hot(target, CLASSES).float() @ prior.matrix()
    ours = [x.clone().requires_grad_() for x in (adv, nat)]
    loss = compat.dkl_loss(ours[0], ours[1], CLASS_PRIOR=sample_weight, alpha=alpha, beta=beta,
                           gamma=gamma)
    theirs = [x.double().requires_grad_() for x in (adv, nat)]
    v = sample_weight.double() ** gamma
    w = v[:, :, None] * v[:, None, :]
    d = [x[:, :, None] - x[:, None, :] for x in theirs]
    expected = beta * 0.25 * (w * (d[1] - d[0]) ** 2).sum() / w.sum() + alpha * -(
        F.softmax(theirs[1].detach(), 1) * F.log_softmax(theirs[0], 1)).sum(1).mean()
    assert_close_rel(loss.detach(), expected.detach(), 2e-5, "loss")
    for name, grad, want in zip(("adv", "nat"), torch.autograd.grad(loss, ours),
                                torch.autograd.grad(expected, theirs)):
        assert relative_error(grad, want) <= 2e-5, f"{name} gradient"


def test_dkl_loss_as_the_gkl_kd_distiller_calls_it(generator):
    prior = ClassPrior(CLASSES)
    for teacher, labels in batches_of(generator, CLASSES):
        prior.update(teacher / T2, labels)  # the distiller's third output, as the trainer sees it
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
