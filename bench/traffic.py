"""Memory traffic and kernel launches of the loss per case, counted per pass, with a modelled H100
time (part 4 of ``python -m bench``); the launches per step of ``python -m bench``'s cases under
Triton's interpreter (its part 1) and the counted step of its modelled H100 step (part 3).

Each case is counted for three losses: ``gkl_loss`` on the Triton kernels, ``gkl_loss`` on its
plain-PyTorch path, and ``F.kl_div`` (plain KL distillation, as ``python -m bench`` times it), the
bar a user compares with; by the counters of ``gkl_kernels.testing``: ``TritonTrafficCounter``
(the Triton kernels' loads and stores, lane by lane, under Triton's interpreter) and
``DispatchCounter`` (the torch ops around them). Bytes and launches are counted, not estimated;
nothing runs on a GPU. The time ``modelled_h100_seconds`` (``tools.h100_model``) is a MODEL, not
a measurement: ``bytes / 3.35e12 B/s`` (the H100 SXM's HBM3 bandwidth) plus ``launches x 4 us``
(an assumed launch overhead).

A "transfer" is one read or write of a ``B x C`` tensor in the logits' dtype. The floor is what
the loss cannot avoid: forward read ``s`` and ``t``; backward read ``s`` and ``t`` and write the
gradients (of ``s``, and of ``t`` in adversarial cases). Weight inputs are left out of the floor
and counted in the measured bytes (``weight_bytes`` says how large they are).

Launches per step (``--steps``): ``gkl_kernels.testing.launches.count_step`` on each provider
``python -m bench`` counts under the interpreter (``gkl_loss[triton]``), and the MODELLED H100
time of one step at the ImageNet shape (``count_modelled_step``: the step counted here, with the
measured host time of a step, ``bench.overhead.host_seconds_per_step``, and modelled by
``tools.h100_model.modelled_step``).

Run from the repository root: ``python -m bench.traffic [--quick] [--json PATH]``, or
``python -m bench.traffic --steps [--quick] [--cases NAME ...] [--providers NAME ...] [--json
PATH]``. Without ``TRITON_INTERPRET=1`` it runs itself again in a subprocess with that variable
set.
"""

import os
import subprocess
import sys

INTERPRET_VARIABLE = "TRITON_INTERPRET"


def rerun_with_interpreter():
    """Run this module again with ``TRITON_INTERPRET=1``; returns its exit status."""
    env = {**os.environ, INTERPRET_VARIABLE: "1"}
    return subprocess.call([sys.executable, "-m", __spec__.name, *sys.argv[1:]], env=env)


# Triton picks its interpreter when it is imported: a command-line run without it starts again
# with it before importing torch and triton (seconds each time).
if __name__ == "__main__" and os.environ.get(INTERPRET_VARIABLE) != "1":
    sys.exit(rerun_with_interpreter())

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import gkl_kernels  # noqa: E402
from bench.cases import (CIFAR100_ADV, EXPLICIT, IMAGENET, PER_ROW, PRIOR, SHARED,  # noqa: E402
                         TEACHER, TOKEN_KD, Case, full_cases, make_inputs, quick_cases,
                         select_cases)
from bench.overhead import host_seconds_per_step  # noqa: E402
from bench.progress import Progress  # noqa: E402
from bench.providers import (KL_DIV, PACKAGE_TRITON, make_passes,  # noqa: E402
                             select_providers)
from bench.report import format_bytes, format_seconds  # noqa: E402
from gkl_kernels.testing.dispatch import DispatchCounter  # noqa: E402
from gkl_kernels.testing.launches import count_step, value_checks_as_on_a_gpu  # noqa: E402
from gkl_kernels.testing.traffic import KernelTraffic, TritonTrafficCounter  # noqa: E402
from tools.h100_model import (H100_BANDWIDTH_BYTES_PER_SECOND, H100_STEP_CASE,  # noqa: E402
                              LAUNCH_LATENCY_SECONDS, MODEL_LABEL, model_constants,
                              modelled_h100_seconds, modelled_step)

KL_DIV_BACKEND = "F.kl_div"  # plain KL distillation at the same shape, the bar to compare with
BACKENDS = ("triton", "torch", KL_DIV_BACKEND)
PASSES = ("forward", "backward", "total")
TOP_OPS = 5  # torch ops listed per pass in a row


def most_bytes(by_name, count):
    """The ``count`` entries of ``{name: KernelTraffic}`` that move the most bytes, largest
    first."""
    return sorted(by_name.items(), key=lambda item: -item[1].bytes)[:count]


# ---- one case ---------------------------------------------------------------------------------

@dataclasses.dataclass
class PassTraffic:
    """Counted traffic of one pass (or the sum of both): Triton kernels, torch ops, the floor."""

    triton: KernelTraffic
    torch: KernelTraffic
    host_syncs: int
    floor_bytes: int
    kernels: dict  # Triton kernel name -> KernelTraffic
    ops: dict  # torch op name -> KernelTraffic
    categories: dict  # Triton bytes by the argument accessed: category -> KernelTraffic
    unique: dict  # the same, distinct addresses per launch only

    @property
    def bytes(self):
        return self.triton.bytes + self.torch.bytes

    @property
    def launches(self):
        return self.triton.launches + self.torch.launches

    def __add__(self, other):
        return PassTraffic(_add(self.triton, other.triton), _add(self.torch, other.torch),
                           self.host_syncs + other.host_syncs,
                           self.floor_bytes + other.floor_bytes,
                           _add_by_name(self.kernels, other.kernels),
                           _add_by_name(self.ops, other.ops),
                           _add_by_name(self.categories, other.categories),
                           _add_by_name(self.unique, other.unique))

    def category_bytes(self, category, unique=False):
        """Bytes the Triton kernels moved in arguments of ``category`` (``unique``: distinct
        addresses per launch)."""
        return (self.unique if unique else self.categories).get(
            category, KernelTraffic(0, 0, 0)).bytes


def _add(first, second):
    return KernelTraffic(*(a + b for a, b in zip(first, second)))


def _add_by_name(first, second):
    return {name: _add(first.get(name, KernelTraffic(0, 0, 0)),
                       second.get(name, KernelTraffic(0, 0, 0)))
            for name in {**first, **second}}


@dataclasses.dataclass
class CaseTraffic:
    """A case's counted traffic per pass, for one backend. ``transfer_bytes``: one ``B x C``
    tensor in the logits' dtype; ``weight_bytes``: the pair-weight input (``weights`` or
    ``class_prior``), excluded from the floor."""

    case: Case
    backend: str
    transfer_bytes: int
    weight_bytes: int
    forward: PassTraffic
    backward: PassTraffic

    @property
    def total(self):
        return self.forward + self.backward


def argument_category(elements, weights):
    """A classifier for ``TritonTrafficCounter``: an argument in the storage of one of the
    ``weights`` tensors is ``"weights"``, else one of ``elements`` (``B x C``) elements is
    ``"B x C"`` (logits, gradients, float32 gradient accumulators), else ``"rows"`` (row
    statistics, labels, per-row outputs and partial sums)."""
    storages = [w.untyped_storage().data_ptr() for w in weights]

    def classify(tensor):
        if tensor is None:
            return "unknown"
        if tensor.untyped_storage().data_ptr() in storages:
            return "weights"
        return "B x C" if tensor.numel() == elements else "rows"
    return classify


def _counted_pass(run, floor_bytes, classify):
    """Run ``run()`` under both counters: ``(its result, PassTraffic)``."""
    with TritonTrafficCounter(classify) as triton_counter, DispatchCounter() as torch_counter:
        result = run()
    traffic = PassTraffic(KernelTraffic(triton_counter.launches, triton_counter.bytes_read,
                                        triton_counter.bytes_written),
                          KernelTraffic(torch_counter.launches, torch_counter.bytes_read,
                                        torch_counter.bytes_written),
                          torch_counter.host_syncs, floor_bytes, triton_counter.per_kernel,
                          torch_counter.per_op(), triton_counter.per_category,
                          triton_counter.unique_per_category)
    return result, traffic


def loss_function(backend):
    """``gkl_loss`` with ``backend`` ("triton" or "torch"), or ``F.kl_div`` (``KL_DIV_BACKEND``,
    the loss ``python -m bench`` times as plain distillation)."""
    if backend == KL_DIV_BACKEND:
        return select_providers([KL_DIV])[0].build()
    return functools.partial(gkl_kernels.gkl_loss, backend=backend)


def count_case(case, backend):
    """Count the loss of ``backend`` (``loss_function``) on ``make_inputs(case)``: the forward
    pass, then ``torch.autograd.grad`` w.r.t. the logits that require gradients. Needs Triton's
    interpreter (``TRITON_INTERPRET=1`` before triton is imported)."""
    student, teacher, loss_kwargs = make_inputs(case)
    needs_grad = [x for x in (student, teacher) if x.requires_grad]
    weights = [] if backend == KL_DIV_BACKEND else [
        loss_kwargs[name] for name in ("weights", "class_prior") if name in loss_kwargs]
    classify = argument_category(case.elements, weights)
    loss_fn = loss_function(backend)
    forward_floor, backward_floor = case.floor_bytes
    with value_checks_as_on_a_gpu(backend == "triton"):
        loss, forward = _counted_pass(lambda: loss_fn(student, teacher, **loss_kwargs),
                                      forward_floor, classify)
    _, backward = _counted_pass(lambda: torch.autograd.grad(loss, needs_grad), backward_floor,
                                classify)
    weight_bytes = sum(w.nbytes for w in weights)
    return CaseTraffic(case, backend, student.nbytes, weight_bytes, forward, backward)


def _pass_row(traffic, transfer_bytes, elements, batch):
    """The JSON form of a ``PassTraffic``; ``transfers`` count ``B x C`` logit tensors;
    ``triton_bxc_transfers`` only the Triton kernels' accesses to ``B x C`` arguments
    (``triton_bxc_unique_transfers``: distinct addresses per launch, the DRAM traffic when
    re-reads hit a cache), ``triton_row_bytes_per_row`` their accesses to per-row arguments per
    row."""
    return {
        "triton_bxc_transfers": traffic.category_bytes("B x C") / transfer_bytes,
        "triton_bxc_unique_transfers": traffic.category_bytes("B x C", unique=True)
        / transfer_bytes,
        "triton_row_bytes_per_row": traffic.category_bytes("rows") / batch,
        "triton_weight_bytes": traffic.category_bytes("weights"),
        "triton_unattributed_bytes": traffic.category_bytes("unknown"),
        "triton_bytes_read": traffic.triton.bytes_read,
        "triton_bytes_written": traffic.triton.bytes_written,
        "torch_bytes_read": traffic.torch.bytes_read,
        "torch_bytes_written": traffic.torch.bytes_written,
        "bytes": traffic.bytes,
        "bytes_per_element": traffic.bytes / elements,
        "transfers": traffic.bytes / transfer_bytes,
        "triton_transfers": traffic.triton.bytes / transfer_bytes,
        "torch_transfers": traffic.torch.bytes / transfer_bytes,
        "floor_bytes": traffic.floor_bytes,
        "floor_transfers": traffic.floor_bytes / transfer_bytes,
        "triton_launches": traffic.triton.launches,
        "torch_launches": traffic.torch.launches,
        "launches": traffic.launches,
        "host_syncs": traffic.host_syncs,
        "modelled_h100_seconds": modelled_h100_seconds(traffic.bytes, traffic.launches),
        "triton_kernels": {name: list(counts) for name, counts in traffic.kernels.items()},
        "top_torch_ops": [[name, *counts] for name, counts in most_bytes(traffic.ops, TOP_OPS)],
    }


def traffic_row(counted):
    """The JSON row of a ``CaseTraffic``: the case, per pass the counts, and the model's
    constants."""
    case = counted.case
    return {
        "case": case.name, "shape": case.shape, "batch": case.batch, "classes": case.classes,
        "weights": case.weights, "adversarial": case.adversarial, "dtype": case.dtype,
        "backend": counted.backend, "transfer_bytes": counted.transfer_bytes,
        "weight_bytes": counted.weight_bytes,
        "weight_transfers": counted.weight_bytes / counted.transfer_bytes,
        **{name: _pass_row(getattr(counted, name), counted.transfer_bytes, case.elements,
                           case.batch)
           for name in PASSES},
        "model": model_constants(),
    }


# ---- the run ----------------------------------------------------------------------------------

def traffic_cases(quick):
    """The counted cases: rank-one weights (class prior, teacher, explicit factor; the teacher
    at C=1000 and at a 128k vocabulary, where the weights add no reads), shared ``(C, C)`` and
    per-row ``(B, C, C)`` weights, bfloat16 logits, adversarial training. Bytes per element do
    not depend on ``B``, so the batch is cut where Triton's interpreter is slow: the 128k
    vocabulary at B=8 (about 5 s), the shared matrix at B=64 (about 15 s; B=256 takes a minute).
    ``quick``: tiny shapes of the same kinds."""
    if quick:
        return [
            Case("prior", 16, 100, PRIOR, IMAGENET),
            Case("teacher", 4, 2000, TEACHER, TOKEN_KD),
            Case("explicit factor", 16, 100, EXPLICIT, IMAGENET),
            Case("shared", 16, 64, SHARED, IMAGENET),
            Case("adv per-row", 8, 32, PER_ROW, CIFAR100_ADV, adversarial=True),
            Case("prior bf16", 16, 100, PRIOR, IMAGENET, dtype="bfloat16"),
            Case("adv prior", 16, 100, PRIOR, CIFAR100_ADV, adversarial=True),
        ]
    return [
        Case("imagenet prior", 256, 1000, PRIOR, IMAGENET),
        Case("imagenet teacher", 256, 1000, TEACHER, IMAGENET),
        Case("token-kd 128k teacher", 8, 131072, TEACHER, TOKEN_KD),
        Case("explicit factor", 256, 1000, EXPLICIT, IMAGENET),
        Case("shared C=1000", 64, 1000, SHARED, IMAGENET),
        Case("cifar100-adv per-row", 128, 100, PER_ROW, CIFAR100_ADV, adversarial=True),
        Case("imagenet prior bf16", 256, 1000, PRIOR, IMAGENET, dtype="bfloat16"),
        Case("cifar100-adv prior", 128, 100, PRIOR, CIFAR100_ADV, adversarial=True),
    ]


def case_line(row, seconds):
    """One line printed per counted case and backend."""
    total = row["total"]
    return (f"{row['case']} ({row['shape']}, {row['dtype']}) {row['backend']}: "
            f"{total['transfers']:.2f} transfers (floor {total['floor_transfers']:.0f}), "
            f"{total['launches']} launches, counted in {seconds:.1f} s")


# the plan of a count (bench.progress): Triton's interpreter runs each program in Python, so a
# rank-one count grows with B x C, a pair-weight count with B x C^2 (2-core CPU, seconds)
INTERPRETER_SECONDS = 3.0
INTERPRETER_SECONDS_PER_ELEMENT = 3e-5
INTERPRETER_SECONDS_PER_PAIR = {SHARED: 7e-6, PER_ROW: 2.5e-5}
TORCH_COUNT_SECONDS = 0.3


def planned_count_seconds(case, backend):
    """The plan's seconds for counting ``case`` on ``backend``."""
    if backend != "triton":
        return TORCH_COUNT_SECONDS
    if case.weights in INTERPRETER_SECONDS_PER_PAIR:
        return INTERPRETER_SECONDS + INTERPRETER_SECONDS_PER_PAIR[case.weights] * case.pairs
    return INTERPRETER_SECONDS + INTERPRETER_SECONDS_PER_ELEMENT * case.elements


def planned_traffic_seconds(quick):
    """The plan's seconds for ``run_traffic(quick)``."""
    return sum(planned_count_seconds(case, backend) for case in traffic_cases(quick)
               for backend in BACKENDS)


def run_traffic(quick, progress=print):
    """Count every case of ``traffic_cases(quick)`` on both backends: the rows (dicts), with one
    ``progress`` line per row (with the time elapsed and left). Needs Triton's interpreter."""
    cases = traffic_cases(quick)
    plan = {(case.name, backend): planned_count_seconds(case, backend)
            for case in cases for backend in BACKENDS}
    progress(f"counting {len(cases)} cases x {len(BACKENDS)} losses ({', '.join(BACKENDS)})")
    tracker = Progress(plan, out=progress)
    rows = []
    for index, case in enumerate(cases, 1):
        for backend in BACKENDS:
            start = time.perf_counter()
            rows.append(traffic_row(count_case(case, backend)))
            tracker.finish((case.name, backend), f"[{index}/{len(cases)}] "
                           + case_line(rows[-1], time.perf_counter() - start))
    return rows


COLUMNS = ("case", "shape", "dtype", "backend", "fwd B/el", "fwd tr", "bwd B/el", "bwd tr",
           "total tr (triton+torch)", "floor tr", "kernels: BxC tr (distinct)", "row B/row",
           "launches f/b", "syncs", "weights", "H100 model f+b")


def _table_line(row):
    forward, backward, total = (row[name] for name in PASSES)
    weights = format_bytes(row["weight_bytes"]) if row["weight_bytes"] else "-"
    return [row["case"], row["shape"], row["dtype"], row["backend"],
            f"{forward['bytes_per_element']:.2f}", f"{forward['transfers']:.2f}",
            f"{backward['bytes_per_element']:.2f}", f"{backward['transfers']:.2f}",
            f"{total['transfers']:.2f} ({total['triton_transfers']:.2f}+"
            f"{total['torch_transfers']:.2f})",
            f"{total['floor_transfers']:.0f}",
            f"{total['triton_bxc_transfers']:.3f} ({total['triton_bxc_unique_transfers']:.3f})"
            if row["backend"] == "triton" else "-",
            f"{total['triton_row_bytes_per_row']:.0f}" if row["backend"] == "triton" else "-",
            f"{forward['launches']}/{backward['launches']}", str(total["host_syncs"]), weights,
            format_seconds(total["modelled_h100_seconds"])]


def format_traffic_table(rows):
    """The rows as an aligned text table, with a legend."""
    lines = [list(COLUMNS)] + [_table_line(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in lines]
    text.append(
        "B/el: bytes per B x C element; tr: transfers, bytes / one B x C tensor in the logits' "
        "dtype; floor: read s, t forward, read s, t and write the gradients backward (weights "
        "excluded; their size in 'weights'); kernels: the Triton kernels' accesses to B x C "
        "arguments (logits, gradients) in transfers, requested (distinct addresses per launch: "
        "the DRAM traffic when re-reads hit a cache), and to per-row arguments in bytes per row; "
        "launches: Triton + torch kernels; syncs: host "
        f"synchronisations; H100 model f+b: {MODEL_LABEL} "
        f"({H100_BANDWIDTH_BYTES_PER_SECOND:.3g} B/s, {LAUNCH_LATENCY_SECONDS * 1e6:g} us).")
    return "\n".join(text)


# ---- launches per step of python -m bench's cases, and the counted step of the H100 model -------

STEP_COUNT_ROWS = 8  # the interpreter counts a case's launches at most at this many rows
STEP_COUNT_ELEMENTS = 4096  # and at fewer where B x C would be larger than this


def step_count_batch(case):
    """The ``B`` at which the interpreter counts a case's launches: the case's own, or fewer rows
    (``C`` kept): at most ``STEP_COUNT_ROWS``, and fewer (at least 2) where ``B x C`` would pass
    ``STEP_COUNT_ELEMENTS``. Triton's interpreter runs each program of a grid in Python (tens of
    milliseconds per row), and the launches (the number of kernels and of torch ops around them,
    not their grids) do not depend on ``B`` (``tests/test_bench_traffic.py`` checks it)."""
    return min(case.batch, STEP_COUNT_ROWS, max(2, STEP_COUNT_ELEMENTS // case.classes))


def count_provider_step(case, provider_name, batch=None):
    """``StepLaunches`` of the provider named ``provider_name`` (``bench.providers``) on
    ``make_inputs(case)`` at ``batch`` rows (default: the case's), after a warm-up step."""
    student, teacher, loss_kwargs = make_inputs(dataclasses.replace(case,
                                                                    batch=batch or case.batch))
    passes = make_passes(select_providers([provider_name])[0].build(), student, teacher,
                         loss_kwargs)
    with value_checks_as_on_a_gpu(provider_name == PACKAGE_TRITON):
        passes.step()
        return count_step(passes.forward, passes.backward)


def step_line(prefix, fields):
    """``fwd 2 + bwd 1 launches, 0 syncs`` after ``prefix``."""
    return (f"{prefix}: fwd {fields['forward_launches']} + bwd {fields['backward_launches']} "
            f"launches, {fields['host_syncs']} syncs")


def run_steps(cases, provider_names, progress=print):
    """Launches per step of each provider named in ``provider_names`` on each case, at
    ``step_count_batch(case)`` rows: rows ``{case, provider, batch, seconds,
    **StepLaunches.fields()}``, one ``progress`` line each."""
    rows = []
    for case in cases:
        batch = step_count_batch(case)
        for name in provider_names:
            start = time.perf_counter()
            fields = count_provider_step(case, name, batch).fields()
            rows.append({"case": case.name, "provider": name, "batch": batch,
                         "seconds": time.perf_counter() - start, **fields})
            progress(step_line(f"  {name} on {case.name} at B={batch} C={case.classes}", fields)
                     + f" (counted in {rows[-1]['seconds']:.1f} s)")
    return rows


def count_modelled_step(case=H100_STEP_CASE):
    """The modelled H100 step (``tools.h100_model.modelled_step``, a MODEL) of ``gkl_loss[triton]``
    and ``F.kl_div`` on ``case``: the bytes and launches of the whole step (forward and backward)
    that ``count_case`` counts at the case's shape, and beside them each one's measured host time
    of a step at ``HOST_STEP_CASE``'s shape (``bench.overhead``'s goal)."""
    return modelled_step(case, [(provider, count_case(case, backend),
                                 host_seconds_per_step(provider))
                                for provider, backend in ((PACKAGE_TRITON, "triton"),
                                                          (KL_DIV, KL_DIV_BACKEND))])


def main_steps(args):
    """``--steps``: the launches of ``--providers`` (default: gkl_loss[triton]) on python -m
    bench's cases (``--quick``'s list, those named by ``--cases``), and the modelled H100
    step; the JSON ``{"launches": rows, "modelled_h100_step": row}``."""
    listed = quick_cases() if args.quick else full_cases()
    if args.cases is None:
        cases = listed
    else:
        cases = select_cases(listed, args.cases) if args.cases else []
    rows = run_steps(cases, args.providers, progress=lambda line: print(line, flush=True))
    step = count_modelled_step()
    if args.json:
        args.json.write_text(json.dumps({"launches": rows, "modelled_h100_step": step},
                                        indent=1))
    return 0


def parse_args():
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (tests, CI)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--steps", action="store_true",
                        help="instead: launches per step of python -m bench's cases, and the "
                        "modelled H100 step")
    parser.add_argument("--cases", nargs="*", metavar="NAME",
                        help="--steps: these of python -m bench's cases (default: all; none "
                        "when given without a name)")
    parser.add_argument("--providers", nargs="+", default=[PACKAGE_TRITON], metavar="NAME",
                        help=f"--steps: count these providers (default: {PACKAGE_TRITON})")
    return parser.parse_args()


def main():
    """Count, print one line per case and the table, write the JSON rows."""
    args = parse_args()
    # masked-off lanes compute on placeholder values (log(0), ...): numpy warns, nothing is wrong
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    if args.steps:
        return main_steps(args)
    start = time.perf_counter()
    rows = run_traffic(args.quick, progress=lambda line: print(line, flush=True))
    print()
    print(format_traffic_table(rows))
    print(f"\n{len(rows)} rows counted in {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
