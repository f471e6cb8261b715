"""Ahead-of-time compile of the Triton kernels for A100 (sm_80) and H100 (sm_90a), no GPU needed:
the rank-one kernels, the pair-weight kernels for shared ``(C, C)`` and per-row ``(B, C, C)``
weights, the generalized JSD's and the fused losses' counted products.

This test process runs Triton's interpreter (conftest.py), and one process is either interpreter
or compiler, so ``python -m tools.compile_report`` runs in a subprocess without
``TRITON_INTERPRET``. The report's results are cached in Triton's cache: a first run compiles
the whole sweep (minutes on 2 cores), later runs take seconds while the kernels are unchanged.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkl_kernels.pairs.per_row_kernels import pick_per_row_blocks
from gkl_kernels.pairs.shared_kernels import pick_shared_blocks
from gkl_kernels.rank1.kernels import MAX_BLOCK_C, MAX_BLOCK_C_FLOAT64
from gkl_kernels.validation import DOT_PRECISIONS
from tools.compile_report import local_memory

# Asserted with the newest triton only: with triton 3.2 every configuration compiles, but five
# spill 4 to 8 bytes (fp16 rank-one backward at C=2049 and per-row backward at C=1024 on sm_80,
# shared backward tf32x3 16x32x32 on sm_80 and ieee 16x16x16 on sm_90a, the counted products'
# float32 ieee logits 64x64x32 on sm_90a), where the newest triton spills nothing.
pytestmark = pytest.mark.newest_triton

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MEMORY_LIMITS = {"sm_80": 166912, "sm_90a": 232448}  # opt-in bytes per block, A100 / H100
DTYPES = {"float32", "float16", "bfloat16", "float64"}
LOGIT_DTYPE_PAIRS = {(dtype, dtype) for dtype in DTYPES} | {("bfloat16", "float32")}
WIDEST_TILE = {"float64": MAX_BLOCK_C_FLOAT64}  # the others: MAX_BLOCK_C
KERNELS = {  # family: (forward, backward)
    "rank1": ("row_stats_kernel", "loss_backward_kernel", "finish_loss_kernel"),
    "shared": ("wmse_shared_fwd_kernel", "wmse_shared_bwd_kernel"),
    "per_row": ("wmse_per_row_fwd_kernel", "wmse_per_row_bwd_kernel"),
    "jsd": ("jsd_row_stats_kernel", "jsd_backward_kernel"),
    "matmul": ("counted_matmul_kernel",),
}
PAIR_CLASSES = range(2, 1025)  # class counts and batches whose pair-weight tiles must be covered
PAIR_BATCHES = range(1, 257)
MATRIX_UNIT_PRECISIONS = {"tf32", "tf32x3"}  # tl.dot on the tensor cores; "ieee" is fp32 FMA
DISASSEMBLED = ("shared", "matmul")  # SASS read (matrix units asserted); the rest: ptxas alone


@pytest.fixture(scope="module")
def report_rows(tmp_path_factory):
    """Rows of the compile report for both architectures; prints the report (``pytest -s``)."""
    rows_file = tmp_path_factory.mktemp("compile_report") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "tools.compile_report", "--sass", *DISASSEMBLED, "--json",
               str(rows_file)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=1800)
    print(result.stdout, result.stderr, sep="\n")
    assert rows_file.exists(), f"the report wrote no rows (exit status {result.returncode})"
    return json.loads(rows_file.read_text())


def select(rows, arch, kernel=None, family=None):
    """The rows of one architecture, and of one kernel or one family when given."""
    return [row for row in rows if row["arch"] == arch
            and kernel in (None, row["kernel"]) and family in (None, row["family"])]


def label(row):
    """A configuration in one line, for failure messages."""
    tile = "x".join(map(str, row["tile"].values()))
    return (f"{row['kernel']} {row['arch']} {row['student']}/{row['teacher']} "
            f"weights={row['weights']} {row['flags']} dot={row['dot_precision']} B={row['B']} "
            f"C={row['C']} tile={tile}")


def failures(row, shared_limit):
    """What is wrong with one configuration: compile error, spills or any local memory
    (``tools.compile_report.local_memory``), shared memory."""
    if row["error"]:
        return [row["error"]]
    found = []
    if row["spill_stores"] or row["spill_loads"] or local_memory(row):
        found.append(f"spills {row['spill_stores']} B stored, {row['spill_loads']} B loaded, "
                     f"{row['stack_frame']} B stack frame, {row.get('local_accesses', '-')} "
                     f"local memory instructions")
    if row["shared"] > shared_limit:
        found.append(f"{row['shared']} B shared memory, limit {shared_limit} B")
    return found


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS))
def test_the_sass_is_read_where_asserted_and_ptxas_sees_its_local_memory(report_rows, arch):
    """The SASS is read for the families whose matrix units are asserted below, not for the
    others (``nvdisasm`` is a third of the sweep); there ptxas's stack frame stands for local
    memory, an upper bound where both are known: a row with local-memory instructions in its
    SASS has a stack frame."""
    rows = [row for row in select(report_rows, arch) if not row["error"]]
    assert {row["family"] for row in rows if "sass_instructions" in row} == set(DISASSEMBLED)
    for row in rows:
        if row.get("local_accesses"):
            assert row["stack_frame"] > 0, label(row)


@pytest.mark.parametrize("family", KERNELS)
@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS))
def test_every_configuration_compiles_without_spills(report_rows, arch, family):
    rows = select(report_rows, arch, family=family)
    assert {row["kernel"] for row in rows} == set(KERNELS[family])
    found = [f"{label(row)}: {problem}"
             for row in rows for problem in failures(row, SHARED_MEMORY_LIMITS[arch])]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS))
def test_every_block_size_and_dtype_is_covered(report_rows, arch):
    def block_sizes(dtype):
        return {2 ** k for k in range(1, WIDEST_TILE.get(dtype, MAX_BLOCK_C).bit_length())}

    for kernel in KERNELS["rank1"][:2]:  # the tiled row kernels (finishing: one program)
        rows = select(report_rows, arch, kernel)
        for student in DTYPES:
            covered = {row["tile"]["BLOCK_C"] for row in rows
                       if row["student"] == row["teacher"] == student}
            assert covered >= block_sizes(student), f"{kernel} {student}: {sorted(covered)}"
        mixed = {row["tile"]["BLOCK_C"] for row in rows if row["student"] != row["teacher"]}
        assert mixed >= block_sizes("float32"), f"{kernel} mixed dtypes: {sorted(mixed)}"
        assert {row["weights"] for row in rows} >= DTYPES
        assert {row["flags"].split()[0] for row in rows} == {"SOURCE=0", "SOURCE=1", "SOURCE=2"}


def expected_pair_tiles(family, dtype=torch.float32):
    """The tiles the report must cover for logits of ``dtype``: every ``(BLOCK_B, BLOCK_C)`` the
    shared launcher picks (``BLOCK_B`` follows the batch, ``BLOCK_C`` the class count); the
    smallest and the widest tile the per-row launcher picks."""
    if family == "shared":
        block_rows = {pick_shared_blocks(batch, PAIR_CLASSES[0], dtype=dtype)[0]
                      for batch in PAIR_BATCHES}
        block_classes = {pick_shared_blocks(PAIR_BATCHES[0], count, dtype=dtype)[1]
                         for count in PAIR_CLASSES}
        return {(rows, classes) for rows in block_rows for classes in block_classes}
    tiles = {pick_per_row_blocks(num_classes, dtype=dtype) for num_classes in PAIR_CLASSES}
    return {min(tiles), max(tiles)}


@pytest.mark.parametrize("family", ["shared", "per_row"])
@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS))
def test_pair_weight_sweep_covers_tiles_dtypes_and_flags(report_rows, arch, family):
    forward, backward = KERNELS[family]
    for kernel in (forward, backward):
        rows = select(report_rows, arch, kernel)
        for dtype in (torch.float32, torch.float64):
            tiles = {tuple(row["tile"].values())[:2] for row in rows  # (rows, classes) of a tile
                     if row["student"] == str(dtype).removeprefix("torch.")}
            assert tiles >= expected_pair_tiles(family, dtype), f"{kernel} {dtype}: {tiles}"
        assert {(row["student"], row["teacher"]) for row in rows} >= LOGIT_DTYPE_PAIRS, kernel
        assert {row["weights"] for row in rows} >= DTYPES, kernel
        assert {row["C"] % 16 == 0 for row in rows} == {True, False}, f"{kernel}: aligned rows"
        if family == "shared":
            assert {row["dot_precision"] for row in rows} == set(DOT_PRECISIONS), kernel
    flags = {row["flags"] for row in select(report_rows, arch, backward)}
    assert flags == {"DS DT", "DS", "DT"}, f"{backward}: {flags}"


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS))
def test_tf32_dots_run_on_the_matrix_units(report_rows, arch):
    """``tf32`` / ``tf32x3`` configurations contain matrix-unit instructions (``HMMA``; on sm_90a
    ``HGMMA`` where Triton uses warpgroup MMA); ``ieee`` ones none (float32 FMA)."""
    rows = [row for row in select(report_rows, arch, family="shared") if not row["error"]]
    assert {row["dot_precision"] for row in rows} == set(DOT_PRECISIONS)
    wrong = [f"{label(row)}: {row['mma'] or 'no matrix-unit instructions'}" for row in rows
             if bool(row["mma"]) != (row["dot_precision"] in MATRIX_UNIT_PRECISIONS)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("arch", sorted(SHARED_MEMORY_LIMITS))
def test_counted_products_run_on_the_matrix_units(report_rows, arch):
    """The fused losses' products: half-precision and tf32 operands on the matrix units
    (warpgroup ``HGMMA`` on sm_90a, ``HMMA`` on sm_80), full float32 (``ieee``, torch's default)
    on the FMA units; every use of the kernel compiled for float32 and bfloat16 heads, float16's
    and tf32's logits (``tools.compile_report.matmul_cases``)."""
    rows = select(report_rows, arch, family="matmul")
    assert {(row["student"], row["dot_precision"], row["flags"]) for row in rows} >= {
        *((dtype, precision, product) for dtype, precision in (("float32", "ieee"),
                                                               ("bfloat16", None))
          for product in ("logits", "dh", "dW")),
        ("float32", "tf32", "logits"), ("float32", "tf32", "dW"), ("float16", None, "logits")}
    unit = "HGMMA" if arch == "sm_90a" else "HMMA"
    wrong = [f"{label(row)}: {row['mma'] or 'no matrix-unit instructions'}" for row in rows
             if (unit in row["mma"]) != (row["dot_precision"] != "ieee")]
    assert not wrong, "\n".join(wrong)
