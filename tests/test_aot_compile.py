"""Ahead-of-time compile of the rank-one kernels for A100 (sm_80) and H100 (sm_90a), no GPU needed.

This test process runs Triton's interpreter (conftest.py), and one process is either interpreter
or compiler, so ``python -m bench.compile_report`` runs in a subprocess without
``TRITON_INTERPRET``. The report's results are cached in Triton's cache: a first run compiles
the whole sweep (minutes on 2 cores), later runs take seconds while the kernels are unchanged.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gkl_kernels.rank1.kernels import MAX_BLOCK_C

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MEMORY_LIMITS = {"sm_80": 166912, "sm_90a": 232448}  # opt-in bytes per block, A100 / H100
DTYPES = {"float32", "float16", "bfloat16"}


@pytest.fixture(scope="module")
def report_rows(tmp_path_factory):
    """Rows of the compile report for both architectures; prints the report (``pytest -s``)."""
    rows_file = tmp_path_factory.mktemp("compile_report") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "bench.compile_report", "--json", str(rows_file)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=1800)
    print(result.stdout, result.stderr, sep="\n")
    assert rows_file.exists(), f"the report wrote no rows (exit status {result.returncode})"
    return json.loads(rows_file.read_text())


def failures(row, shared_limit):
    """What is wrong with one configuration: compile error, spills, shared memory."""
    if row["error"]:
        return [row["error"]]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills {row['spill_stores']} B stored, {row['spill_loads']} B loaded")
    if row["shared"] > shared_limit:
        found.append(f"{row['shared']} B shared memory, limit {shared_limit} B")
    return found


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS))
def test_every_configuration_compiles_without_spills(report_rows, arch):
    rows = [row for row in report_rows if row["arch"] == arch]
    assert rows
    found = [f"{row['kernel']} {row['student']}/{row['teacher']} {row['flags']} C={row['C']} "
             f"BLOCK_C={row['BLOCK_C']}: {problem}"
             for row in rows for problem in failures(row, SHARED_MEMORY_LIMITS[arch])]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS))
def test_every_block_size_and_dtype_is_covered(report_rows, arch):
    rows = [row for row in report_rows if row["arch"] == arch]
    block_sizes = [2 ** k for k in range(1, MAX_BLOCK_C.bit_length())]
    for kernel in ("gkl_rank1_fwd_kernel", "gkl_rank1_bwd_kernel"):
        kernel_rows = [row for row in rows if row["kernel"] == kernel]
        for student in DTYPES:
            covered = {row["BLOCK_C"] for row in kernel_rows
                       if row["student"] == row["teacher"] == student}
            assert covered >= set(block_sizes), f"{kernel} {student}: {sorted(covered)}"
        mixed = {row["BLOCK_C"] for row in kernel_rows if row["student"] != row["teacher"]}
        assert mixed >= set(block_sizes), f"{kernel} mixed dtypes: {sorted(mixed)}"
        assert {row["factor"] for row in kernel_rows} >= DTYPES
        assert {row["flags"].split()[0] for row in kernel_rows} == {"SOURCE=0", "SOURCE=1",
                                                                     "SOURCE=2"}

