"""Language-model distillation on a synthetic language whose true next-token distribution is
known: cross-entropy only, dense GKL through the fused hidden-state path, GKL on a cached top-k.

The language: ``V`` tokens, each sequence a Markov chain whose next token is drawn from
``P[previous]`` (``P`` = softmax of Gaussian logits, fixed by the seed). So the best possible
model is known, and each model's distance to it is measured exactly:
``KL(P[prev] || q(. | prev))``, averaged over the held-out contexts.

The models: ``ids -> tanh(embed(ids)) -> lm_head`` (a last hidden state, then an output layer).
The teacher (hidden size 96) is trained first with cross-entropy on the whole corpus; the
students (hidden size 16) see only its first ``student_sequences`` sequences, so that the
teacher's full distributions tell them more than the sampled next tokens do. Three students from
one initialisation and one batch order:

- ``cross-entropy``: the labels alone;
- ``GKL fused``: ``0.5 CE + 0.5 GKL`` with ``gkl_kernels.FusedLinearDistillationLoss`` on both
  models' hidden states (teacher weights, ``gamma`` 1, the logits never formed);
- ``GKL top-k``: the same with the teacher run once over the training set and only its top-``k``
  log-probabilities kept (``gkl_kernels.SparseTeacher``, ``rest="rest"``), through
  ``gkl_kernels.fused_linear_gkl_sparse``.

It prints each model's held-out perplexity, its KL to the true distribution, the training
tokens per second of the student runs (the whole step: forward, loss, backward, optimiser) and
the peak CPU memory of one step (``gkl_kernels.testing.memory``). Seeded; CPU only; run from the
repository root::

    python examples/lm_distillation.py            # the full run (about a minute on 2 cores)
    python examples/lm_distillation.py --quick    # seconds (the test's settings)
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gkl_kernels  # noqa: E402
from gkl_kernels.testing.memory import measure_peak_memory  # noqa: E402


@dataclass(frozen=True)
class Settings:
    vocabulary: int = 128
    length: int = 33  # tokens per sequence: 32 predictions
    train_sequences: int = 4096  # the teacher's corpus
    student_sequences: int = 64  # the students' part of it (the first ones)
    test_sequences: int = 256
    teacher_hidden: int = 96
    student_hidden: int = 16
    teacher_steps: int = 1500
    student_steps: int = 300
    batch: int = 32
    top_k: int = 8
    sharpness: float = 2.0  # scale of the true transition logits
    seed: int = 0


BACKEND = "torch"
QUICK = Settings(vocabulary=32, train_sequences=256, student_sequences=16, test_sequences=32,
                 teacher_steps=150, student_steps=40, batch=16)


class TinyLM(torch.nn.Module):
    """``ids -> tanh(embed(ids))`` (the last hidden state) ``-> lm_head`` (the logits)."""

    def __init__(self, vocabulary, hidden):
        super().__init__()
        self.embed = torch.nn.Embedding(vocabulary, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocabulary, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.embed(ids))

    def forward(self, ids):
        return self.lm_head(self.hidden(ids))


def language(settings, generator):
    """The true transition matrix ``P`` (V, V) and sampled train / test sequences."""
    v = settings.vocabulary
    transitions = torch.softmax(settings.sharpness * torch.randn(v, v, generator=generator), 1)

    def sample(count):
        tokens = torch.empty(count, settings.length, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, v, (count,), generator=generator)
        for position in range(1, settings.length):
            tokens[:, position] = torch.multinomial(transitions[tokens[:, position - 1]], 1,
                                                    generator=generator)[:, 0]
        return tokens

    return transitions, sample(settings.train_sequences), sample(settings.test_sequences)


def evaluate(model, transitions, test):
    """``(perplexity, KL to the true distribution)`` on the held-out sequences."""
    with torch.no_grad():
        contexts, targets = test[:, :-1].reshape(-1), test[:, 1:].reshape(-1)
        log_q = F.log_softmax(model(contexts), dim=-1)
        perplexity = F.nll_loss(log_q, targets).exp().item()
        p = transitions[contexts]
        kl = (p * (p.log() - log_q)).sum(-1).mean().item()
    return perplexity, kl


def batches(settings, sequences, steps, generator):
    """The index of each step's sequences among the first ``sequences``: one order for every
    run."""
    return [torch.randint(0, sequences, (settings.batch,), generator=generator)
            for _ in range(steps)]


def train_teacher(settings, train, generator):
    teacher = TinyLM(settings.vocabulary, settings.teacher_hidden)
    optimiser = torch.optim.Adam(teacher.parameters(), lr=3e-2)
    for rows in batches(settings, train.shape[0], settings.teacher_steps, generator):
        ids = train[rows]
        loss = F.cross_entropy(teacher(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return teacher.requires_grad_(False)


def cached_top_k(teacher, train, top_k):
    """The teacher's top-k log-probabilities and classes at every training position, once."""
    with torch.no_grad():
        values, indices = F.log_softmax(teacher(train[:, :-1]), dim=-1).topk(top_k, dim=-1)
    return values, indices


def student_losses(teacher, cache):
    """The three students' losses: ``(student, ids, rows) -> loss``."""
    # the CPU's plain-PyTorch path, also where TRITON_INTERPRET is set (as in the tests)
    distill = gkl_kernels.FusedLinearDistillationLoss(weight_hard_loss=0.5, weight_soft_loss=0.5,
                                                      backend=BACKEND)

    def cross_entropy(student, ids, rows):
        return F.cross_entropy(student(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())

    def gkl_fused(student, ids, rows):
        with torch.no_grad():
            teacher_hidden = teacher.hidden(ids[:, :-1])
        return distill(student.hidden(ids[:, :-1]), student.lm_head.weight, teacher_hidden,
                       teacher.lm_head.weight, ids[:, 1:])

    def gkl_top_k(student, ids, rows):
        values, indices = (x[rows].flatten(0, 1) for x in cache)
        hidden = student.hidden(ids[:, :-1]).flatten(0, 1)
        labels = ids[:, 1:].flatten()
        soft = gkl_kernels.fused_linear_gkl_sparse(
            hidden, student.lm_head.weight, gkl_kernels.SparseTeacher(indices, values,
                                                                      rest="rest"),
            backend=BACKEND)
        hard = F.cross_entropy(hidden @ student.lm_head.weight.t(), labels)
        return 0.5 * hard + 0.5 * soft

    return {"cross-entropy": cross_entropy, "GKL fused": gkl_fused, "GKL top-k": gkl_top_k}


def train_student(settings, loss_fn, train, order):
    """``(student, tokens per second, peak bytes of one step)``, from the seed's
    initialisation."""
    torch.manual_seed(settings.seed + 1)
    student = TinyLM(settings.vocabulary, settings.student_hidden)
    optimiser = torch.optim.Adam(student.parameters(), lr=3e-2)

    def step(rows):
        loss = loss_fn(student, train[rows], rows)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    peak, _ = measure_peak_memory(lambda: step(order[0]))
    start = time.perf_counter()
    for rows in order[1:]:
        step(rows)
    seconds = time.perf_counter() - start
    tokens = (len(order) - 1) * settings.batch * (settings.length - 1)
    return student, tokens / seconds, peak


def run(settings):
    """The rows ``{name: (perplexity, KL, tokens/s, peak bytes)}`` (teacher: no speed)."""
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    transitions, train, test = language(settings, generator)
    teacher = train_teacher(settings, train, generator)
    rows = {"teacher": (*evaluate(teacher, transitions, test), None, None)}
    order = batches(settings, settings.student_sequences, settings.student_steps, generator)
    cache = cached_top_k(teacher, train[:settings.student_sequences], settings.top_k)
    for name, loss_fn in student_losses(teacher, cache).items():
        student, speed, peak = train_student(settings, loss_fn, train, order)
        rows[name] = (*evaluate(student, transitions, test), speed, peak)
    true_entropy = -(transitions * transitions.log()).sum(-1)
    contexts = test[:, :-1].reshape(-1)
    rows["true distribution"] = (true_entropy[contexts].mean().exp().item(), 0.0, None, None)
    return rows


def format_rows(rows, settings):
    lines = [f"synthetic Markov language: V={settings.vocabulary}, sequences of "
             f"{settings.length - 1} predictions, seed {settings.seed}; teacher: hidden "
             f"{settings.teacher_hidden}, {settings.train_sequences} sequences; students: hidden "
             f"{settings.student_hidden}, {settings.student_sequences} sequences, "
             f"{settings.student_steps} steps of {settings.batch}; top-k {settings.top_k}",
             f"{'model':<18} {'perplexity':>10} {'KL to true':>10} {'tokens/s':>10} "
             f"{'peak step memory':>17}"]
    for name, (perplexity, kl, speed, peak) in rows.items():
        speed_text = "-" if speed is None else f"{speed:,.0f}"
        peak_text = "-" if peak is None else f"{peak / 2**20:.2f} MiB"
        lines.append(f"{name:<18} {perplexity:>10.3f} {kl:>10.4f} {speed_text:>10} "
                     f"{peak_text:>17}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = QUICK if args.quick else Settings()
    settings = Settings(**{**vars(settings), "seed": args.seed})
    print(format_rows(run(settings), settings))


if __name__ == "__main__":
    main()
