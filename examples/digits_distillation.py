"""Knowledge distillation on scikit-learn's handwritten digits: no distillation, KL, GKL.

What it shows: a small MLP student distilled from a larger MLP teacher on real data, trained four
times from one initialisation and one batch order: (a) label cross-entropy only, (b) plus plain
KL distillation, (c) plus ``gkl_kernels.gkl_loss`` with a ``gkl_kernels.ClassPrior`` (the paper's
"global information" weights), (d) plus ``gkl_loss`` weighted by the teacher itself. It prints the
test accuracy of the teacher and of each student, the seconds spent inside each student's loss
function, and each run's wall time. Everything runs on the CPU in well under a minute.

Run it from the repository root, with the package and scikit-learn installed
(``pip install -e ".[examples]"``; from a checkout without installing, prefix ``PYTHONPATH=.``):

    python examples/digits_distillation.py            # the full run
    python examples/digits_distillation.py --quick    # a few seconds (the test's settings)

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes, shipped with scikit-learn),
one stratified 70/30 train/test split (1257 / 540 images, ``random_state=0`` whatever the seed),
pixels standardised with the training part's mean and deviation.

Teacher: MLP 64-256-256-10 (ReLU), cross-entropy on all 1257 training labels, Adam (lr 1e-3),
batch 32, 30 epochs: about 98% test accuracy.

Student: MLP 64-16-10 trained on 10 labelled images per class only (100 images, about 8% of the
training labels), 300 epochs (1200 steps) with the same optimiser and batch size. Why so few
labels: with all of them this student reaches about 96% by itself and the teacher has little left
to teach; with 100 it stays clearly below the teacher (about 87%), and what distillation adds is
the teacher's soft labels on those same 100 images (the teacher is frozen; its logits are computed
once). Short runs favour the undistilled student (it fits the hard labels first); the distilled
ones catch up and pass it later, hence the 300 epochs.

Losses (every distillation run adds the label cross-entropy with weight ``LABEL_CE_WEIGHT`` = 1,
as the authors' trainer does):
- KL: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` with ``T`` = 4 (``F.kl_div``, batch mean).
- GKL: docs/SPEC.md's CIFAR-100 distillation row as it stands: ``mse_weight`` (the code's beta) 16,
  ``ce_weight`` (alpha) 1, ``gamma`` 0.05, ``temperature`` T = 4, ``weight_temperature`` T2 = 4;
  the prior accumulates ``softmax(t / T2)`` per class at every step and turns it into the
  ``(C, C)`` prior at the end of every epoch (uniform during the first). With ``gamma`` = 0.05
  the pair weights ``P[y] ** gamma`` are close to uniform, so (c) and (d) barely differ here.

Reproducibility: ``torch.manual_seed(seed)`` before the models are built, batch order from a
generator seeded with the seed, one CPU thread and ``torch.use_deterministic_algorithms(True)``
(both restored afterwards): the same seed gives the same accuracies. ``gkl_loss`` runs with
``backend="torch"``, the package's plain-PyTorch path. The time in the loss is
``time.perf_counter`` around each forward call of the loss function (for (c) including the
prior's update); the backward pass is not in it.
"""

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

import gkl_kernels

NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.3
LABELLED_PER_CLASS = 10
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
TEACHER_SIZES = (64, 256, 256, NUM_CLASSES)
STUDENT_SIZES = (64, 16, NUM_CLASSES)

KL_TEMPERATURE = 4.0
LABEL_CE_WEIGHT = 1.0
GKL_SETTINGS = dict(mse_weight=16.0, ce_weight=1.0, gamma=0.05, temperature=4.0,
                    weight_temperature=4.0)

DEFAULT_EPOCHS = 300
DEFAULT_TEACHER_EPOCHS = 30
QUICK_EPOCHS = 100
QUICK_TEACHER_EPOCHS = 10


def load_data():
    """The digits as standardised float32 tensors: (x_train, y_train, x_test, y_test), split
    once, stratified, by ``SPLIT_SEED``; the scaler is fitted on the training part only."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=TEST_FRACTION, stratify=digits.target,
        random_state=SPLIT_SEED)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = (torch.tensor(scaler.transform(x), dtype=torch.float32)
                       for x in (x_train, x_test))
    y_train, y_test = (torch.tensor(y, dtype=torch.int64) for y in (y_train, y_test))
    return x_train, y_train, x_test, y_test


def labelled_subset(labels, per_class):
    """Indices of the first ``per_class`` samples of every class (the split is already shuffled)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class]
                      for c in range(NUM_CLASSES)])


def mlp(sizes):
    """Linear layers of the given widths with ReLU between them."""
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class TimedLoss:
    """A loss function ``(student_logits, teacher_logits, labels) -> loss`` and the seconds spent
    inside it (``time.perf_counter`` around the forward call; the backward pass is not counted)."""

    def __init__(self, loss_fn, on_epoch_end=None):
        self.loss_fn = loss_fn
        self.on_epoch_end = on_epoch_end or (lambda: None)
        self.seconds = 0.0

    def __call__(self, student_logits, teacher_logits, labels):
        start = time.perf_counter()
        loss = self.loss_fn(student_logits, teacher_logits, labels)
        self.seconds += time.perf_counter() - start
        return loss


def label_ce(student_logits, teacher_logits, labels):
    """No distillation: cross-entropy with the labels only."""
    return F.cross_entropy(student_logits, labels)


def kl_distillation(student_logits, teacher_logits, labels):
    """Label cross-entropy plus Hinton's ``T^2 KL(softmax(t/T) || softmax(s/T))``."""
    t = KL_TEMPERATURE
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                  reduction="batchmean")
    return LABEL_CE_WEIGHT * F.cross_entropy(student_logits, labels) + t * t * kl


def gkl_with_prior_loss():
    """Label cross-entropy plus GKL weighted by a ``ClassPrior`` that every call updates with the
    teacher's logits and labels; the prior's ``end_epoch`` runs at the end of each epoch."""
    prior = gkl_kernels.ClassPrior(NUM_CLASSES,
                                   weight_temperature=GKL_SETTINGS["weight_temperature"])

    def loss_fn(student_logits, teacher_logits, labels):
        prior.update(teacher_logits, labels)
        gkl = gkl_kernels.gkl_loss(student_logits, teacher_logits, labels=labels,
                                   class_prior=prior.matrix(), backend="torch", **GKL_SETTINGS)
        return LABEL_CE_WEIGHT * F.cross_entropy(student_logits, labels) + gkl

    return TimedLoss(loss_fn, prior.end_epoch), prior


def gkl_teacher_weights(student_logits, teacher_logits, labels):
    """Label cross-entropy plus GKL weighted by the teacher's own ``softmax(t/T2) ** gamma``."""
    gkl = gkl_kernels.gkl_loss(student_logits, teacher_logits, backend="torch", **GKL_SETTINGS)
    return LABEL_CE_WEIGHT * F.cross_entropy(student_logits, labels) + gkl


def train(model, inputs, labels, loss, epochs, seed, teacher_logits=None):
    """Adam on shuffled mini-batches (order drawn from ``seed``); ``loss`` is a ``TimedLoss``,
    called with the batch's teacher logits (None without ``teacher_logits``)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=order).split(BATCH_SIZE):
            batch_teacher = None if teacher_logits is None else teacher_logits[batch]
            value = loss(model(inputs[batch]), batch_teacher, labels[batch])
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        loss.on_epoch_end()
    return model


@torch.no_grad()
def accuracy(model, inputs, labels):
    """The fraction of ``inputs`` whose largest logit is at its label."""
    model.eval()
    return (model(inputs).argmax(1) == labels).float().mean().item()


@contextlib.contextmanager
def reproducible_cpu():
    """One thread and deterministic algorithms for the duration; the previous state after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def student_losses():
    """The student runs: name -> (``TimedLoss``, the ``ClassPrior`` it uses or None)."""
    gkl_prior, prior = gkl_with_prior_loss()
    return {
        "no distillation": (TimedLoss(label_ce), None),
        "KL": (TimedLoss(kl_distillation), None),
        "GKL + ClassPrior": (gkl_prior, prior),
        "GKL, teacher weights": (TimedLoss(gkl_teacher_weights), None),
    }


def run(epochs=DEFAULT_EPOCHS, teacher_epochs=DEFAULT_TEACHER_EPOCHS, seed=0):
    """Train the teacher, then the student once per loss from one initialisation. Returns
    ``{"teacher_accuracy", "teacher_seconds", "class_prior", "class_prior_epochs", "students":
    {name: {"accuracy", "loss_seconds", "wall_seconds"}}}``: the GKL run's final (C, C) prior and
    the number of epochs it ended."""
    with reproducible_cpu():
        x_train, y_train, x_test, y_test = load_data()
        torch.manual_seed(seed)
        start = time.perf_counter()
        teacher = train(mlp(TEACHER_SIZES), x_train, y_train, TimedLoss(label_ce),
                        teacher_epochs, seed)
        result = {"teacher_accuracy": accuracy(teacher, x_test, y_test),
                  "teacher_seconds": time.perf_counter() - start, "students": {}}
        subset = labelled_subset(y_train, LABELLED_PER_CLASS)
        x_student, y_student = x_train[subset], y_train[subset]
        with torch.no_grad():
            teacher_logits = teacher.eval()(x_student)
        initial = mlp(STUDENT_SIZES).state_dict()
        for name, (loss, prior) in student_losses().items():
            student = mlp(STUDENT_SIZES)
            student.load_state_dict(initial)
            start = time.perf_counter()
            train(student, x_student, y_student, loss, epochs, seed + 1, teacher_logits)
            result["students"][name] = {"accuracy": accuracy(student, x_test, y_test),
                                        "loss_seconds": loss.seconds,
                                        "wall_seconds": time.perf_counter() - start}
            if prior is not None:
                result["class_prior"] = prior.matrix().clone()
                result["class_prior_epochs"] = prior.epochs
    return result


def print_table(result):
    """The accuracies and times of ``run``'s result, one row per model."""
    print(f"{'model':<30} {'test accuracy':>13} {'time in loss':>13} {'run wall time':>14}")
    print(f"{'teacher':<30} {result['teacher_accuracy']:>13.3f} {'-':>13} "
          f"{result['teacher_seconds']:>13.2f}s")
    for name, row in result["students"].items():
        print(f"{'student, ' + name:<30} {row['accuracy']:>13.3f} {row['loss_seconds']:>12.3f}s "
              f"{row['wall_seconds']:>13.2f}s")


def main(argv=None):
    """Parse the options, run, print the table and the total wall time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=DEFAULT_TEACHER_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} student and {QUICK_TEACHER_EPOCHS} teacher epochs "
                        "(overrides --epochs and --teacher-epochs)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.teacher_epochs = QUICK_EPOCHS, QUICK_TEACHER_EPOCHS
    start = time.perf_counter()
    print_table(run(args.epochs, args.teacher_epochs, args.seed))
    print(f"total wall time {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
