"""``GKLDistillationTrainer`` in real TRL runs, offline on CPU: tiny randomly initialised
``LlamaForCausalLM`` models from configs, a word-level tokenizer made in memory, a prompt dataset,
a few optimizer steps with on-policy generation. The network is not touched (a connection
attempt fails the test); the student's weights move; with TRL's own divergence as the loss the
logged losses are the stock ``DistillationTrainer``'s; with GKL they are the package's loss of
the hidden states the trainer projected."""

import math
import socket

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import gkl_kernels  # noqa: E402
from gkl_kernels.integrations.trl import GKLDistillationTrainer  # noqa: E402

pytestmark = pytest.mark.torch_only  # CPU runs of the plain-PyTorch rows: once in CI

PROMPTS = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today",
           "birds sing in the morning", "we read a good book", "rain falls on the town"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: Hugging Face libraries offline, and any connection attempt fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def tokenizer():
    words = sorted({word for prompt in PROMPTS for word in prompt.split()})
    vocabulary = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", padding_side="left")


def model(tok, hidden, seed, **config):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **config))


def run(tmp_path, trainer_class=GKLDistillationTrainer, steps=3, beta=0.5, teacher_config=None,
        **trainer_options):
    """``(trainer, logged losses, the student's weights before)`` of ``steps`` optimizer steps."""
    tok = tokenizer()
    student = model(tok, 32, seed=1)
    teacher = model(tok, 48, seed=2, **(teacher_config or {}))
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    args = trl.DistillationConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", gradient_checkpointing=False, max_steps=steps,
        per_device_train_batch_size=2, max_completion_length=6, logging_steps=1,
        learning_rate=1e-2, seed=0, beta=beta, disable_tqdm=True)
    trainer = trainer_class(model=student, teacher_model=teacher, args=args,
                            train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                            processing_class=tok, **trainer_options)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps
    return trainer, losses, before


def test_trains_offline_and_the_weights_move(tmp_path):
    trainer, losses, before = run(tmp_path)
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    moved = [name for name, p in trainer.model.named_parameters()
             if not torch.equal(p.detach(), before[name])]
    assert "lm_head.weight" in moved and len(moved) == len(before)
    entropies = [entry.get("entropy") for entry in trainer.state.log_history if "loss" in entry]
    assert entropies == [None] * len(losses)  # not computed: NaN, left out by TRL's logger


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_trl_divergence_as_the_loss_gives_trls_logged_losses(beta, tmp_path):
    _, stock, _ = run(tmp_path / "stock", trl.DistillationTrainer, beta=beta)
    loss = gkl_kernels.FusedLinearDistillationLoss(divergence="jsd", beta=beta,
                                                   weight_hard_loss=0.0, weight_soft_loss=1.0)
    _, ours, _ = run(tmp_path / "ours", loss=loss, beta=beta)
    for step, (a, b) in enumerate(zip(ours, stock)):
        assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)


def test_each_models_scale_and_softcap_are_read_from_its_config(tmp_path):
    """A teacher whose config has ``logit_scale`` and ``final_logit_softcapping`` (TRL reads both
    per model): TRL's own divergence and the package's JSD log the same loss at the first step
    (the same weights; the next steps' weights differ by the two gradients' float32 rounding)."""
    teacher_config = dict(logit_scale=0.7, final_logit_softcapping=3.0)
    _, stock, _ = run(tmp_path / "stock", trl.DistillationTrainer, steps=1,
                      teacher_config=teacher_config)
    loss = gkl_kernels.FusedLinearDistillationLoss(divergence="jsd", beta=0.5,
                                                   weight_hard_loss=0.0, weight_soft_loss=1.0)
    _, ours, _ = run(tmp_path / "ours", steps=1, loss=loss, teacher_config=teacher_config)
    assert abs(ours[0] - stock[0]) <= 1e-5 * abs(stock[0]), (ours, stock)
    _, plain, _ = run(tmp_path / "plain", steps=1, loss=loss)
    assert abs(plain[0] - ours[0]) > 1e-3 * abs(ours[0])  # the teacher's transform mattered


def test_gkl_is_the_package_loss_of_the_projected_hidden_states(tmp_path, monkeypatch):
    """The default loss (GKL, ``weight_hard_loss=0``) and a hard cross-entropy on the sampled
    tokens: each step's loss is the package's loss of the hidden states, heads and labels the
    trainer passed, written with the logits (``gkl_loss`` per token, summed, over
    ``num_items_in_batch``)."""
    calls = []
    forward = gkl_kernels.FusedLinearDistillationLoss.forward

    def recorded(self, *args, **kwargs):
        value = forward(self, *args, **kwargs)
        calls.append((self, [a.detach().clone() if isinstance(a, torch.Tensor) else a
                             for a in args], kwargs, value.detach()))
        return value

    monkeypatch.setattr(gkl_kernels.FusedLinearDistillationLoss, "forward", recorded)
    loss = gkl_kernels.FusedLinearDistillationLoss(weight_hard_loss=0.3, weight_soft_loss=1.0)
    _, logged, _ = run(tmp_path, steps=2, loss=loss)
    assert len(calls) == 2
    for (criterion, args, kwargs, value), step_loss in zip(calls, logged):
        hs, ws, ht, wt, labels, bs, bt = args
        assert criterion.weight_hard_loss == 0.3 and labels.shape == hs.shape[:-1]
        s = torch.nn.functional.linear(hs.double(), ws.double())
        t = torch.nn.functional.linear(ht.double(), wt.double())
        flat = labels.reshape(-1)
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        soft = gkl_kernels.gkl_loss(s, t, labels=flat, reduction="none").sum()
        hard = torch.nn.functional.cross_entropy(s, flat, reduction="sum")
        expected = (soft + 0.3 * hard) / kwargs["num_items_in_batch"]
        assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item())
        assert abs(step_loss - value.item()) <= 1e-6 * abs(value.item())


def test_what_the_trainer_refuses(tmp_path):
    with pytest.raises(TypeError, match="loss must be a FusedLinearDistillationLoss"):
        run(tmp_path, loss=torch.nn.KLDivLoss())
    with pytest.raises(ValueError, match="no logit_scale or final_logit_softcapping"):
        run(tmp_path, loss=gkl_kernels.FusedLinearDistillationLoss(logit_scale=2.0))
    with pytest.raises(ValueError, match="temperature"):
        run(tmp_path, loss=gkl_kernels.FusedLinearDistillationLoss(temperature=2.0))


def test_a_changed_trl_is_refused_with_the_supported_versions(monkeypatch):
    from gkl_kernels.integrations import trl as integration

    def changed(student_hidden_states, teacher_hidden_states, mask):
        return None

    monkeypatch.setattr(integration.trl_distillation, "_chunked_divergence_loss", changed)
    with pytest.raises(RuntimeError, match="supports TRL 1.16"):
        integration.check_trl_supported()
