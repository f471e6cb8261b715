"""The digits distillation example (examples/digits_distillation.py), in its reduced form: the
GKL + ClassPrior student learns, and the prior that reaches ``gkl_loss`` is the trained one."""

import pytest
import torch

import gkl_kernels
from tests.conftest import load_example

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once

CHANCE = 1 / 10

example = load_example("digits_distillation.py")


@pytest.fixture(scope="module")
def quick_run():
    """``run`` with the ``--quick`` settings, and every ``class_prior`` given to ``gkl_loss``
    (cloned at the call: the prior is updated in place)."""
    priors_seen = []
    real_gkl_loss = gkl_kernels.gkl_loss

    def recording_gkl_loss(*args, **kwargs):
        if kwargs.get("class_prior") is not None:
            priors_seen.append(kwargs["class_prior"].clone())
        return real_gkl_loss(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gkl_kernels, "gkl_loss", recording_gkl_loss)
        result = example.run(example.QUICK_EPOCHS, example.QUICK_TEACHER_EPOCHS, seed=0)
    return result, priors_seen


def test_teacher_and_gkl_student_learn(quick_run):
    result, _ = quick_run
    assert result["teacher_accuracy"] > 0.9
    assert result["students"]["GKL + ClassPrior"]["accuracy"] > 0.5
    for row in result["students"].values():
        assert row["accuracy"] > 2 * CHANCE
        assert 0 < row["loss_seconds"] < row["wall_seconds"]


def test_class_prior_is_uniform_first_then_learned(quick_run):
    result, priors_seen = quick_run
    steps_per_epoch = -(-example.NUM_CLASSES * example.LABELLED_PER_CLASS // example.BATCH_SIZE)
    assert len(priors_seen) == example.QUICK_EPOCHS * steps_per_epoch
    uniform = torch.full((example.NUM_CLASSES, example.NUM_CLASSES), CHANCE)
    for prior in priors_seen[:steps_per_epoch]:  # the first epoch: nothing accumulated yet
        torch.testing.assert_close(prior, uniform)
    final = result["class_prior"]
    assert result["class_prior_epochs"] == example.QUICK_EPOCHS
    torch.testing.assert_close(final.sum(1), torch.ones(example.NUM_CLASSES))
    # The teacher classifies its students' training images: each row peaks at its own class.
    assert torch.equal(final.argmax(1), torch.arange(example.NUM_CLASSES))
    assert (final.diagonal() > 2 * CHANCE).all()
    # The teacher is frozen and every epoch sees the same images, so every epoch ends with the same
    # prior up to rounding: the one the last steps used (built an epoch earlier) is the final one.
    torch.testing.assert_close(priors_seen[-1], final, atol=1e-6, rtol=0)


def test_seeded_runs_repeat_and_leave_torch_settings_alone():
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    first, second = (example.run(epochs=3, teacher_epochs=2, seed=5) for _ in range(2))
    accuracies = [{name: row["accuracy"] for name, row in run["students"].items()}
                  for run in (first, second)]
    assert accuracies[0] == accuracies[1]
    assert first["teacher_accuracy"] == second["teacher_accuracy"]
    assert torch.equal(first["class_prior"], second["class_prior"])
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_main_prints_one_row_per_model(capsys):
    example.main(["--epochs", "1", "--teacher-epochs", "1", "--seed", "1"])
    lines = capsys.readouterr().out.splitlines()
    names = ["teacher"] + [f"student, {name}" for name in example.student_losses()]
    assert [line.split("  ")[0].strip() for line in lines[1:-1]] == names
    assert lines[-1].startswith("total wall time")
