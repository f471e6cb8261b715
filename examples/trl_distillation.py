"""On-policy distillation with TRL's ``DistillationTrainer`` and the package's losses, offline.

The student and the teacher are small randomly initialised ``LlamaForCausalLM`` models built from
configs (hidden sizes 64 and 128, a vocabulary of ``--vocabulary`` made-up words with a word-level
tokenizer trained in memory): nothing is downloaded. Three runs from the same seed, each a few
optimizer steps in which the student samples completions of the prompts and learns the
teacher's distribution on them:

- ``trl``: the stock ``trl.DistillationTrainer`` (its chunked generalized JSD, ``beta`` 0.5);
- ``gkl``: ``gkl_kernels.integrations.trl.GKLDistillationTrainer`` with its default loss (GKL,
  teacher weights, ``gamma`` 1);
- ``jsd``: the same trainer with ``FusedLinearDistillationLoss(divergence="jsd", beta=0.5,
  weight_hard_loss=0, weight_soft_loss=1)``: TRL's divergence, so its losses are ``trl``'s.

Each prints its logged losses and the trainer's tokens per second (prompt and completion tokens
seen over the training time, generation included). CPU; run from the repository root with
``pip install -e ".[trl]"``::

    python examples/trl_distillation.py            # about ten seconds on 2 cores
    python examples/trl_distillation.py --quick    # seconds (the test's settings)
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

import gkl_kernels  # noqa: E402
from gkl_kernels.integrations.trl import GKLDistillationTrainer  # noqa: E402

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer(vocabulary):
    """A word-level tokenizer of ``vocabulary`` tokens: the specials and words ``w0``, ``w1``..."""
    words = {token: i for i, token in enumerate(
        SPECIALS + [f"w{i}" for i in range(vocabulary - len(SPECIALS))])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", padding_side="left")


def make_model(tokenizer, hidden, seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False))


def prompts(count, words, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, words, (count, 8), generator=generator)
    return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def train(name, settings, output_dir):
    """``(logged losses, tokens per second)`` of one run."""
    tokenizer = make_tokenizer(settings.vocabulary)
    student = make_model(tokenizer, 64, seed=1)
    teacher = make_model(tokenizer, 128, seed=2)
    args = trl.DistillationConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        gradient_checkpointing=False, max_steps=settings.steps,
        per_device_train_batch_size=settings.batch, max_completion_length=settings.completion,
        logging_steps=1, learning_rate=1e-3, seed=0, beta=0.5, disable_tqdm=True)
    options = dict(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                   train_dataset=datasets.Dataset.from_dict(
                       {"prompt": prompts(4 * settings.batch, settings.vocabulary - 4, 0)}))
    if name == "trl":
        trainer = trl.DistillationTrainer(**options)
    elif name == "gkl":
        trainer = GKLDistillationTrainer(**options)
    else:
        trainer = GKLDistillationTrainer(**options, loss=gkl_kernels.FusedLinearDistillationLoss(
            divergence="jsd", beta=0.5, weight_hard_loss=0.0, weight_soft_loss=1.0))
    metrics = trainer.train().metrics
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    tokens = max(entry.get("num_tokens", 0) for entry in history)
    return losses, tokens / metrics["train_runtime"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: the test's settings")
    parser.add_argument("--vocabulary", type=int, default=None, help="tokens (default 8192)")
    settings = parser.parse_args(argv)
    quick = settings.quick
    settings.vocabulary = settings.vocabulary or (512 if quick else 8192)
    settings.steps, settings.batch, settings.completion = (2, 2, 4) if quick else (6, 8, 32)
    results = {}
    with tempfile.TemporaryDirectory() as output_dir:
        for name in ("trl", "gkl", "jsd"):
            losses, speed = train(name, settings, output_dir)
            results[name] = losses, speed
            print(f"{name:4s} losses {' '.join(f'{x:.5f}' for x in losses)}   "
                  f"{speed:8.1f} tokens/s", flush=True)
    return results


if __name__ == "__main__":
    main()
