"""The language-model distillation example (examples/lm_distillation.py), in its reduced form:
on the synthetic language whose true next-token distribution is known, the distilled students
(dense GKL through the fused path, GKL on the cached top-k) end closer to it than the student
trained on the sampled tokens alone, and the run is seeded."""

import math

import pytest

from tests.conftest import load_example

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once

example = load_example("lm_distillation.py")


@pytest.fixture(scope="module")
def quick_rows():
    return example.run(example.QUICK)


def test_distilled_students_are_closer_to_the_true_distribution(quick_rows):
    kl = {name: row[1] for name, row in quick_rows.items()}
    assert kl["true distribution"] == 0.0
    assert kl["teacher"] < kl["GKL fused"] < kl["cross-entropy"]
    assert kl["GKL top-k"] < kl["cross-entropy"]
    true_perplexity = quick_rows["true distribution"][0]
    assert all(row[0] >= true_perplexity * (1 - 1e-6) for row in quick_rows.values())


def test_speed_and_memory_are_reported(quick_rows):
    for name in ("cross-entropy", "GKL fused", "GKL top-k"):
        perplexity, kl, speed, peak = quick_rows[name]
        assert math.isfinite(perplexity) and speed > 0 and peak > 0
    text = example.format_rows(quick_rows, example.QUICK)
    assert "KL to true" in text and "GKL top-k" in text


def test_the_run_is_seeded(quick_rows):
    again = example.run(example.QUICK)
    assert {name: row[:2] for name, row in again.items()} == \
        {name: row[:2] for name, row in quick_rows.items()}
