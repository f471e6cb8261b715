"""Ahead-of-time compile report for the rank-one kernels on sm_80 (A100) and sm_90a (H100).

No GPU is needed. Each configuration is a call of ``rank1_rows_forward`` / ``rank1_rows_backward``
on ``meta`` tensors with the Triton kernel swapped for a recorder, so the tile width, the warp
count and every argument are the launchers' own choices (``pick_block_c``, ``pick_num_warps``).
The recorded launch is specialised as the JIT specialises a launch on contiguous torch tensors
(pointers 16-byte aligned, integers equal to 1 become constants, integers divisible by 16 get
``tt.divisibility``), compiled with ``triton.compile`` for each architecture, re-assembled with
``ptxas -v`` (registers, spills) and disassembled with ``nvdisasm -c`` (instruction count, widths of
global loads). The compiles run in a pool of forked processes; the ptxas / nvdisasm figures are
cached in Triton's cache, keyed by the kernel's hash and the measuring code.

Run from the repository root::

    python -m bench.compile_report [--arch 80 90] [--workers 2] [--json rows.json]

It prints one row per configuration and exits with status 1 when a configuration fails to
compile, spills registers, or needs more shared memory than one block may have. It needs compiled
Triton: with ``TRITON_INTERPRET`` set it runs itself again in a subprocess without that variable.
"""

import argparse
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends import compiler as backend_compiler
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia_compiler
from triton.compiler import ASTSource
from triton.runtime.cache import get_cache_manager

from gkl_kernels.rank1 import kernels


@dataclasses.dataclass(frozen=True)
class Arch:
    """A GPU target: Triton's compute capability, ptxas' name for it, and the most shared memory
    one block may opt in to (bytes)."""

    capability: int
    gpu_name: str
    shared_limit: int


ARCHS = {80: Arch(80, "sm_80", 166912), 90: Arch(90, "sm_90a", 232448)}
LOGIT_DTYPE_PAIRS = (  # (student, teacher)
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
)
FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CLASSES, MAX_CLASSES = 2, 262144
KERNEL_NAMES = {"forward": "gkl_rank1_fwd_kernel", "backward": "gkl_rank1_bwd_kernel"}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int64: "i64", torch.int32: "i32"}
INTERPRET_VARIABLE = "TRITON_INTERPRET"
MEASUREMENTS_FILE = "gkl_compile_report.json"


@dataclasses.dataclass(frozen=True)
class LaunchCase:
    """One call of a launcher: the pass, the input dtypes, the class count and the flags."""

    kernel: str  # "forward" or "backward"
    student: torch.dtype
    teacher: torch.dtype
    num_classes: int
    source: int = kernels.SOURCE_TEACHER
    factor: torch.dtype = None  # dtype of the explicit factor or the class prior
    with_ce: bool = True
    symmetric: bool = True
    need_ds: bool = True
    need_dt: bool = True


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """Everything ``triton.compile`` needs for one kernel specialisation on one architecture, as
    plain data (it is sent to the worker processes)."""

    case: LaunchCase
    kernel_name: str
    arg_types: tuple  # per kernel argument: "*fp32", "i32", "fp32", ... or "constexpr"
    constants: tuple  # (argument index, value): constexpr arguments and integers equal to 1
    aligned: tuple  # indices of the arguments that are divisible by 16
    options: tuple  # (name, value): the launcher's options, num_stages as the JIT defaults it
    block_c: int
    arch: Arch


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` stores the bound
    arguments and the launch options instead of running anything."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.arguments = self.options = None

    def __getitem__(self, grid):
        return self.record

    def record(self, *args, **kwargs):
        """Split ``kwargs`` into kernel arguments and launch options (``num_warps``) and bind."""
        signature = inspect.signature(self.kernel.fn)
        self.options = {k: kwargs.pop(k) for k in list(kwargs) if k not in signature.parameters}
        self.arguments = signature.bind(*args, **kwargs).arguments


def class_count_range_per_block():
    """``{BLOCK_C: (smallest, largest) class count}`` for which the launcher picks ``BLOCK_C``,
    over ``MIN_CLASSES..MAX_CLASSES``."""
    counts = {}
    for num_classes in range(MIN_CLASSES, MAX_CLASSES + 1):
        block = kernels.pick_block_c(num_classes)
        counts[block] = (counts.get(block, (num_classes,))[0], num_classes)
    return counts


def sweep_cases():
    """The report's launch cases.

    1. Every tile width the launcher picks, at the largest class count it picks it for (a
       multiple of 16 from tile 16 on, so rows are known to be aligned), for each logits dtype
       pair and both passes, with the heaviest flags: teacher weights, cross-entropy, symmetric,
       both gradients.
    2. At the widest tile and the largest class count: every weight source with its factor in each
       dtype, then every other flag value (float32 logits, teacher weights).
    3. At the widest tile and the smallest class count, which is not a multiple of 16 (so rows are
       not known to be aligned, as for C = 100, 1000, 21841): each dtype pair, heaviest flags.
    """
    counts = class_count_range_per_block()
    fewest, most = counts[max(counts)]
    cases = [LaunchCase(kernel, student, teacher, largest)
             for _, largest in counts.values()
             for student, teacher in LOGIT_DTYPE_PAIRS
             for kernel in KERNEL_NAMES]
    cases += [LaunchCase(kernel, torch.float32, torch.float32, most, source=source, factor=factor)
              for source in (kernels.SOURCE_PRIOR, kernels.SOURCE_EXPLICIT)
              for factor in FACTOR_DTYPES
              for kernel in KERNEL_NAMES]
    cases.append(LaunchCase("forward", torch.float32, torch.float32, most, with_ce=False))
    cases += [LaunchCase("backward", torch.float32, torch.float32, most, with_ce=with_ce,
                         symmetric=symmetric, need_ds=need_ds, need_dt=need_dt)
              for with_ce, symmetric, need_ds, need_dt in itertools.product((True, False), repeat=4)
              if (need_ds or need_dt) and not (with_ce and symmetric and need_ds and need_dt)]
    cases += [LaunchCase(kernel, student, teacher, fewest)
              for student, teacher in LOGIT_DTYPE_PAIRS
              for kernel in KERNEL_NAMES]
    return cases


def record_launch(case, batch=2):
    """Call the case's launcher on ``meta`` tensors; returns the kernel, its arguments by name and
    the launch options, as the launcher passed them."""
    def empty(*shape, dtype=torch.float32):
        return torch.empty(shape, dtype=dtype, device="meta")

    student = empty(batch, case.num_classes, dtype=case.student)
    teacher = empty(batch, case.num_classes, dtype=case.teacher)
    factor = labels = None
    if case.source == kernels.SOURCE_PRIOR:
        factor = empty(case.num_classes, case.num_classes, dtype=case.factor)
        labels = empty(batch, dtype=torch.int64)
    elif case.source == kernels.SOURCE_EXPLICIT:
        factor = empty(batch, case.num_classes, dtype=case.factor)
    gamma = temperature = weight_temperature = 1.0
    if case.kernel == "forward":
        launch = functools.partial(
            kernels.rank1_rows_forward, student, teacher, factor, labels, case.source, gamma,
            temperature, weight_temperature, case.with_ce)
    else:
        row_grad = empty(batch)
        launch = functools.partial(
            kernels.rank1_rows_backward, row_grad, row_grad, student, teacher, factor, labels,
            empty(batch, kernels.NUM_STATS), case.source, gamma, temperature, weight_temperature,
            case.with_ce, case.symmetric, case.need_ds, case.need_dt)
    name = KERNEL_NAMES[case.kernel]
    recorder = LaunchRecorder(getattr(kernels, name))
    with mock.patch.object(kernels, name, recorder):
        launch()
    return recorder.kernel, recorder.arguments, recorder.options


def specialise(value):
    """``(type, divisible by 16, constant)`` of a runtime argument as the JIT sees it: tensors are
    pointers (torch allocations are 16-byte aligned), integers equal to 1 become constants."""
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype], True, False
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0, value == 1
    return "fp32", False, False


def compile_job(case, arch):
    """The compile job of one launch case on one architecture."""
    kernel, arguments, launch_options = record_launch(case)
    arg_types, constants, aligned = [], [], []
    for index, (param, value) in enumerate(zip(kernel.params, arguments.values())):
        if param.is_constexpr:
            arg_types.append("constexpr")
            constants.append((index, value))
            continue
        arg_type, divisible, constant = specialise(value)
        arg_types.append(arg_type)
        if constant:
            constants.append((index, value))
        elif divisible:
            aligned.append(index)
    options = {"num_stages": nvidia_compiler.CUDAOptions.num_stages, **launch_options}
    return CompileJob(case, kernel.__name__, tuple(arg_types), tuple(constants), tuple(aligned),
                      tuple(sorted(options.items())), arguments["BLOCK_C"], arch)


def ast_source(job):
    """``ASTSource`` of the job in the installed Triton's format. triton >= 3.3: every argument in
    the signature, ``constexprs`` keyed by argument index, attributes as lists; triton 3.2: only
    runtime arguments, ``constants`` keyed by name, an ``AttrsDescriptor`` built from hints."""
    kernel = getattr(kernels, job.kernel_name)
    names = kernel.arg_names
    if "constexprs" in inspect.signature(ASTSource).parameters:
        signature = dict(zip(names, job.arg_types))
        constexprs = {(index,): value for index, value in job.constants}
        attrs = {(index,): [["tt.divisibility", 16]] for index in job.aligned}
        return ASTSource(kernel, signature, constexprs, attrs)
    signature = {name: arg_type for name, arg_type in zip(names, job.arg_types)
                 if arg_type != "constexpr"}
    constants = {names[index]: value for index, value in job.constants}
    hints = {index: 16 for index in job.aligned}
    hints.update({index: 1 for index, _ in job.constants if job.arg_types[index] != "constexpr"})
    return ASTSource(kernel, signature, constants,
                     backend_compiler.AttrsDescriptor.from_hints(hints))


def ptxas_path(arch):
    """The ptxas Triton runs for ``arch``: ``get_ptxas(arch)`` (an object with ``.path`` from
    triton 3.4, a ``(path, version)`` pair in 3.3), or triton 3.2's single ``_path_to_binary``."""
    if hasattr(nvidia_compiler, "get_ptxas"):
        tool = nvidia_compiler.get_ptxas(arch.capability)
    else:
        tool = nvidia_compiler._path_to_binary("ptxas")
    return tool.path if hasattr(tool, "path") else tool[0]


def ptxas_usage(ptx, arch, workdir):
    """Registers and spill bytes reported by ``ptxas -v`` for the PTX."""
    ptx_file = Path(workdir, "kernel.ptx")
    ptx_file.write_text(ptx)
    log = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={arch.gpu_name}", str(ptx_file),
                          "-o", str(Path(workdir, "reassembled.cubin"))],
                         capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def global_load_bits(opcode):
    """Bits one ``LDG`` reads, from its modifiers: ``LDG.E.128`` 128, ``LDG.E.U16`` 16, ``LDG.E``
    32."""
    modifiers = opcode.split(".")
    for modifier in modifiers[1:]:
        if modifier in ("128", "64"):
            return int(modifier)
        if modifier in ("U16", "S16", "U8", "S8"):
            return int(modifier[1:])
    return 32


def sass_summary(cubin, arch, workdir):
    """From ``nvdisasm -c`` on Triton's cubin: the instruction count (NOP padding left out), the
    local-memory accesses (``LDL``/``STL``), the widths of the global loads and whether any of
    them is a 64- or 128-bit (vector) load."""
    cubin_file = Path(workdir, "kernel.cubin")
    cubin_file.write_bytes(cubin)
    nvdisasm = Path(ptxas_path(arch)).with_name("nvdisasm")
    # -ndf: no dataflow annotations (the same instructions, a third less time on sm_90a)
    sass = subprocess.run([str(nvdisasm), "-c", "-ndf", str(cubin_file)], capture_output=True,
                          text=True, check=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    load_bits = sorted({global_load_bits(op) for op in opcodes if op.startswith("LDG")},
                       reverse=True)
    return {"sass_instructions": sum(op != "NOP" for op in opcodes),
            "local_accesses": sum(op.startswith(("LDL", "STL")) for op in opcodes),
            "ldg_bits": load_bits, "vectorised": any(bits >= 64 for bits in load_bits)}


@functools.cache
def measuring_code_hash():
    """Hash of the functions that measure a kernel: a change to them invalidates cached results."""
    source = "".join(inspect.getsource(f) for f in (ptxas_usage, global_load_bits, sass_summary))
    return hashlib.sha256(source.encode()).hexdigest()


def measurements(compiled, arch):
    """``ptxas_usage`` and ``sass_summary`` of a compiled kernel, cached in Triton's cache under
    the kernel's hash and ``measuring_code_hash``."""
    key = hashlib.sha256(f"{compiled.hash}-{measuring_code_hash()}".encode()).hexdigest()
    cache = get_cache_manager(key)
    cached = cache.get_file(MEASUREMENTS_FILE)
    if cached:
        return json.loads(Path(cached).read_text())
    with tempfile.TemporaryDirectory() as workdir:
        found = {**ptxas_usage(compiled.asm["ptx"], arch, workdir),
                 **sass_summary(compiled.asm["cubin"], arch, workdir)}
    cache.put(json.dumps(found), MEASUREMENTS_FILE, binary=False)
    return found


def dtype_name(dtype):
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def describe(job):
    """The identifying columns of a report row."""
    case = job.case
    flags = [f"SOURCE={case.source}", "CE" if case.with_ce else "noCE"]
    if case.kernel == "backward":
        flags.append("SYM" if case.symmetric else "noSYM")
        flags += [name for name, needed in (("DS", case.need_ds), ("DT", case.need_dt)) if needed]
    options = dict(job.options)
    return {"kernel": job.kernel_name, "arch": job.arch.gpu_name,
            "student": dtype_name(case.student), "teacher": dtype_name(case.teacher),
            "factor": dtype_name(case.factor) if case.factor else "-", "flags": " ".join(flags),
            "C": case.num_classes, "BLOCK_C": job.block_c, "num_warps": options["num_warps"],
            "num_stages": options["num_stages"]}


def run_job(job):
    """Compile and measure one job; a failure is kept in the row's ``error``."""
    row = describe(job)
    try:
        compiled = triton.compile(ast_source(job),
                                  target=GPUTarget("cuda", job.arch.capability, 32),
                                  options=dict(job.options))
        row.update(measurements(compiled, job.arch), shared=compiled.metadata.shared,
                   shared_limit=job.arch.shared_limit, error=None)
    except Exception as error:  # one failing configuration must not hide the others
        row["error"] = f"{type(error).__name__}: {error}".strip()[:2000]
    return row


def problems(row):
    """Why a row fails the check; empty when it passes."""
    if row["error"]:
        return ["compile error"]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append("spills")
    if row["shared"] > row["shared_limit"]:
        found.append("shared memory over the limit")
    return found


def compile_report(capabilities=tuple(ARCHS), workers=2):
    """Compile every case of ``sweep_cases`` for each architecture in ``capabilities`` on
    ``workers`` forked processes; returns the rows (dicts), in sweep order."""
    if not isinstance(kernels.gkl_rank1_fwd_kernel, triton.runtime.JITFunction):
        raise RuntimeError(f"the kernels are interpreted: unset {INTERPRET_VARIABLE} to compile")
    jobs = [compile_job(case, ARCHS[capability])
            for capability in capabilities for case in sweep_cases()]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(run_job, jobs))


COLUMNS = {"kernel": "kernel", "arch": "arch", "student": "student", "teacher": "teacher",
           "factor": "factor", "flags": "flags", "C": "C", "BLOCK_C": "BLOCK_C",
           "num_warps": "warps", "num_stages": "stages", "registers": "regs",
           "spill_stores": "spill_st", "spill_loads": "spill_ld", "shared": "smem",
           "sass_instructions": "sass", "local_accesses": "lmem_ops", "ldg_bits": "ldg_bits",
           "vectorised": "vec"}  # row key: header


def table_cell(row, key):
    """One cell of the printed table."""
    value = row.get(key)
    if value is None:
        return "-"
    if key == "ldg_bits":
        return "/".join(map(str, value)) or "-"
    if key == "vectorised":
        return "yes" if value else "no"
    return str(value)


def format_table(rows):
    """The rows as text in aligned columns with a check column, then the compile errors."""
    lines = [[*COLUMNS.values(), "check"]]
    lines += [[table_cell(row, key) for key in COLUMNS] + [", ".join(problems(row)) or "ok"]
              for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip()
            for line in lines]
    text += [f"{row['kernel']} {row['arch']} {row['flags']} C={row['C']}: {row['error']}"
             for row in rows if row["error"]]
    return "\n".join(text)


def rerun_without_interpreter():
    """Run this module again with ``TRITON_INTERPRET`` removed; returns its exit status."""
    env = {k: v for k, v in os.environ.items() if k != INTERPRET_VARIABLE}
    return subprocess.call([sys.executable, "-m", __spec__.name, *sys.argv[1:]], env=env)


def parse_args():
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(ARCHS),
                        default=sorted(ARCHS), help="compute capabilities (default: 80 90)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default: 2)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    return parser.parse_args()


def main():
    """Print the report; exit status 1 when a configuration fails the check."""
    if INTERPRET_VARIABLE in os.environ:
        return rerun_without_interpreter()
    args = parse_args()
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    start = time.perf_counter()
    rows = compile_report(tuple(args.arch), args.workers)
    elapsed = time.perf_counter() - start
    print(format_table(rows))
    failing = [row for row in rows if problems(row)]
    archs = ", ".join(ARCHS[capability].gpu_name for capability in args.arch)
    print(f"\n{len(rows)} configurations for {archs} in {elapsed:.1f} s with {args.workers} "
          f"workers (triton {triton.__version__}); {len(failing)} failing the check")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
