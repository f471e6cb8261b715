"""The TRL example (examples/trl_distillation.py) in its quick form: three offline runs from one
seed; the package's JSD as the loss logs the stock trainer's losses, and each run reports its
tokens per second."""

import math

import pytest

from tests.conftest import load_example

pytest.importorskip("trl")
pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once


def test_the_example_runs_and_the_jsd_run_is_trls():
    results = load_example("trl_distillation.py").main(["--quick"])
    assert set(results) == {"trl", "gkl", "jsd"}
    for losses, speed in results.values():
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses) and speed > 0
    for ours, stock in zip(results["jsd"][0], results["trl"][0]):
        assert abs(ours - stock) <= 1e-5 * abs(stock)
