"""Memory traffic and kernel launches of the loss, counted per pass; a modelled H100 time.

Two counters, used together by ``count_case``:

- ``TritonTrafficCounter``: the bytes that every ``tl.load`` / ``tl.store`` (and atomic) of a
  Triton kernel moves, counted lane by lane (masked-off lanes move nothing) while the kernel runs
  in Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported), and the kernel
  launches, in total and per kernel. These are the bytes the kernels' memory instructions ask
  for: on a GPU a re-read of a tile can be served by L1/L2 (the shared ``(C, C)`` and per-row
  ``(B, C, C)`` kernels re-read logit tiles by design), so for those kernels the count is an upper
  bound on DRAM traffic; for the rank-one kernels, which touch each element once per pass, it is
  the DRAM traffic.
- ``DispatchCounter``: a ``TorchDispatchMode`` that counts, per aten op that runs a kernel, the
  bytes it reads and writes and one launch; ``.item()`` (``aten._local_scalar_dense``) counts as
  a launch and a host synchronisation. Composite ops (those without a kernel of their own for the
  tensors' device, e.g. ``logsumexp``, ``linalg_vecdot``, ``clone``) and ops outside ``aten``
  (the package's ``torch.library`` custom ops) are counted through the ops they run. A Triton
  launch is opaque to it: the torch ops around a kernel are its share, the kernel the Triton
  counter's, so the two add up without counting anything twice.

Kernel launches are those of PyTorch's CPU dispatch tables and of the Triton launchers; bytes are
counted, not estimated. The time ``modelled_h100_seconds`` is a MODEL, not a measurement:
``bytes / 3.35e12 B/s`` (the H100 SXM's HBM3 bandwidth) plus ``launches x 4 us`` (an assumed
launch overhead). Nothing here runs on a GPU.

Each case is counted for three losses: ``gkl_loss`` on the Triton kernels, ``gkl_loss`` on its
plain-PyTorch path, and ``F.kl_div`` (plain KL distillation, as ``python -m bench`` times it), the
bar a user compares with.

A "transfer" is one read or write of a ``B x C`` tensor in the logits' dtype. The floor is what
the loss cannot avoid: forward read ``s`` and ``t``; backward read ``s`` and ``t`` and write the
gradients (of ``s``, and of ``t`` in adversarial cases). Weight inputs are left out of the floor
and counted in the measured bytes (``weight_bytes`` says how large they are).

Launches per training step (``count_step``): the counters above and ``InductorKernelCounter``
(the kernels ``torch.compile`` generated) around one forward and one backward pass of any loss.
``python -m bench`` counts each provider on each case it times this way: in its own process, or
for ``gkl_loss[triton]`` under the interpreter by ``--steps`` (also the MODELLED H100 time of one
step at the ImageNet shape, ``modelled_step``).

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
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch._C import DispatchKey  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import gkl_kernels  # noqa: E402
from gkl_kernels import functional as gkl_functional  # noqa: E402
from bench.cases import (CIFAR100_ADV, EXPLICIT, IMAGENET, PER_ROW, PRIOR, SHARED,  # noqa: E402
                         TEACHER, TOKEN_KD, Case, full_cases, make_inputs, quick_cases,
                         select_cases)
from bench.measure import format_bytes, format_seconds  # noqa: E402
from bench.progress import Progress  # noqa: E402
from bench.providers import (KL_DIV, PACKAGE_TRITON, make_passes,  # noqa: E402
                             select_providers)
from bench.report import speed  # noqa: E402
from gkl_kernels.validation import triton_interpreter_active  # noqa: E402

H100_BANDWIDTH_BYTES_PER_SECOND = 3.35e12  # H100 SXM, HBM3
LAUNCH_LATENCY_SECONDS = 4e-6
MODEL_LABEL = ("model, not a measurement: counted bytes / H100 HBM3 bandwidth + counted launches "
               "x assumed launch latency")
KL_DIV_BACKEND = "F.kl_div"  # plain KL distillation at the same shape, the bar to compare with
BACKENDS = ("triton", "torch", KL_DIV_BACKEND)
PASSES = ("forward", "backward", "total")
TOP_OPS = 5  # torch ops listed per pass in a row


def modelled_h100_seconds(nbytes, launches):
    """A MODEL of an H100's time for ``nbytes`` of DRAM traffic in ``launches`` kernels:
    ``nbytes / H100_BANDWIDTH_BYTES_PER_SECOND + launches * LAUNCH_LATENCY_SECONDS``.
    ``LAUNCH_LATENCY_SECONDS`` (4 us) is an assumption of the model, typical of CUDA kernel
    launch overhead; no GPU was timed."""
    return nbytes / H100_BANDWIDTH_BYTES_PER_SECOND + launches * LAUNCH_LATENCY_SECONDS


class KernelTraffic(NamedTuple):
    """Launches and bytes of one kernel (or aten op) name."""

    launches: int
    bytes_read: int
    bytes_written: int

    @property
    def bytes(self):
        """Bytes read plus bytes written."""
        return self.bytes_read + self.bytes_written


def most_bytes(by_name, count):
    """The ``count`` entries of ``{name: KernelTraffic}`` that move the most bytes, largest
    first."""
    return sorted(by_name.items(), key=lambda item: -item[1].bytes)[:count]


class _Tally:
    """Launches, bytes read and bytes written per name."""

    def __init__(self):
        self._by_name = defaultdict(lambda: [0, 0, 0])

    def add(self, name, launches=0, read=0, written=0):
        entry = self._by_name[name]
        entry[0] += launches
        entry[1] += read
        entry[2] += written

    def by_name(self):
        """``{name: KernelTraffic}``."""
        return {name: KernelTraffic(*entry) for name, entry in self._by_name.items()}

    def total(self):
        """``KernelTraffic`` summed over every name."""
        entries = list(self._by_name.values())
        return KernelTraffic(*(sum(entry[column] for entry in entries) for column in range(3)))


# ---- hooks in Triton's interpreter -----------------------------------------------------------

# Builder methods that move memory themselves: (pointer parameter, mask parameter or None,
# reads, writes). Atomics read and write every active lane.
_ACCESSES = {
    "create_load": ("ptr", None, True, False),
    "create_masked_load": ("ptrs", "mask", True, False),
    "create_store": ("ptr", None, False, True),
    "create_masked_store": ("ptrs", "mask", False, True),
    "create_atomic_rmw": ("ptr", "mask", True, True),
    "create_atomic_cas": ("ptr", None, True, True),
}
# Builder methods (of some triton versions) that move memory through the ones above: each call
# must reach one of them, else the counter raises rather than miss bytes.
_DELEGATING_ACCESSES = (
    "create_tensor_pointer_load", "create_tensor_pointer_store", "create_descriptor_load",
    "create_descriptor_store", "create_descriptor_gather", "create_descriptor_scatter",
    "create_atomic_load", "create_atomic_store", "create_atomic_poll",
)


def _parameter_index(function, name):
    """Position of parameter ``name`` among ``function``'s arguments after ``self``."""
    return list(inspect.signature(function).parameters).index(name) - 1


def _argument(args, kwargs, index, name):
    """The value of parameter ``name`` (position ``index``) in a call."""
    return args[index] if index < len(args) else kwargs[name]


def _access(pointers, mask):
    """``(element bytes, addresses)`` of a load or store through the ``TensorHandle``
    ``pointers``: the element size (from the pointer's element type) and the addresses of the
    lanes whose ``mask`` is true (a flat array)."""
    element_bits = pointers.get_element_ty().primitive_bitwidth
    addresses = np.asarray(pointers.data).reshape(-1)
    if mask is not None:
        addresses = addresses[np.broadcast_to(mask.data, np.shape(pointers.data)).reshape(-1)]
    return max(1, element_bits // 8), addresses


def _launch_tensors(args, kwargs):
    """The tensors among a launch's arguments (in tuples too)."""
    return [leaf for leaf in tree_leaves((list(args), kwargs)) if isinstance(leaf, torch.Tensor)]


def _owner(tensors, addresses):
    """The tensor among ``tensors`` whose storage holds the first of ``addresses`` (``None``:
    none does, or no address)."""
    if not addresses.size:
        return None
    address = int(addresses[0])
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() <= address < storage.data_ptr() + storage.nbytes():
            return tensor
    return None


class _InterpreterHooks:
    """Wraps the interpreter builder's memory operations, ``GridExecutor.__call__`` (one grid
    launch, on every supported triton version) and ``GridExecutor._init_args_hst`` (the launch's
    tensors as the kernel sees them) while at least one observer is registered, and reports to
    every observer: ``launch_started(name)``, ``launch_finished()`` and ``accessed(read, written,
    tensor, addresses, element_bytes)``: bytes, the launch argument the access falls in (``None``:
    none), the addresses of the active lanes and their element size.
    Nested builder calls (a load that delegates to a masked load) are counted once, at the
    outermost one."""

    def __init__(self):
        self.observers = []
        self._originals = {}  # (owner, attribute) -> original
        self._depth = 0  # builder memory calls in progress
        self._accesses = 0  # counted memory calls so far
        self._tensors = []  # the tensor arguments of the launch in progress

    def register(self, observer):
        if not self.observers:
            self._install()
        self.observers.append(observer)

    def unregister(self, observer):
        self.observers.remove(observer)
        if not self.observers:
            for (owner, attribute), original in self._originals.items():
                setattr(owner, attribute, original)
            self._originals.clear()

    def _patch(self, owner, attribute, make_wrapper):
        original = getattr(owner, attribute)
        self._originals[(owner, attribute)] = original
        setattr(owner, attribute, make_wrapper(original))

    def _install(self):
        builder = interpreter.InterpreterBuilder
        for name, access in _ACCESSES.items():
            if hasattr(builder, name):
                self._patch(builder, name, lambda original, a=access: self._counted(original, *a))
        for name in _DELEGATING_ACCESSES:
            if hasattr(builder, name):
                self._patch(builder, name, lambda original, n=name: self._delegating(original, n))
        self._patch(interpreter.GridExecutor, "__call__", self._launch)
        self._patch(interpreter.GridExecutor, "_init_args_hst", self._host_arguments)

    def _host_arguments(self, original):
        """A wrapper of ``GridExecutor._init_args_hst`` that keeps the launch's tensors."""

        def host_arguments(executor, *args, **kwargs):
            args_hst, kwargs_hst = original(executor, *args, **kwargs)
            self._tensors = _launch_tensors(args_hst, kwargs_hst)
            return args_hst, kwargs_hst

        return host_arguments

    def _counted(self, original, pointer_name, mask_name, reads, writes):
        """A wrapper of a builder method that moves memory itself."""
        pointer_index = _parameter_index(original, pointer_name)
        mask_index = mask_name and _parameter_index(original, mask_name)

        def counted(builder, *args, **kwargs):
            self._depth += 1
            try:
                result = original(builder, *args, **kwargs)
            finally:
                self._depth -= 1
            if self._depth == 0:
                mask = mask_name and _argument(args, kwargs, mask_index, mask_name)
                element_bytes, addresses = _access(
                    _argument(args, kwargs, pointer_index, pointer_name), mask)
                nbytes = element_bytes * addresses.size
                tensor = _owner(self._tensors, addresses)
                self._accesses += 1
                for observer in self.observers:
                    observer.accessed(nbytes if reads else 0, nbytes if writes else 0, tensor,
                                      addresses, element_bytes)
            return result

        return counted

    def _delegating(self, original, name):
        """A wrapper that checks that ``name`` reached a counted memory operation."""

        def checked(builder, *args, **kwargs):
            before = self._accesses
            result = original(builder, *args, **kwargs)
            if self._depth == 0 and self._accesses == before:
                raise NotImplementedError(
                    f"TritonTrafficCounter cannot count InterpreterBuilder.{name} in this triton "
                    f"version: it moved memory without a load or store that the counter sees")
            return result

        return checked

    def _launch(self, original):
        """A wrapper of ``GridExecutor.__call__`` that reports the launch of ``fn``."""

        def launch(executor, *args, **kwargs):
            if kwargs.get("warmup"):  # triton 3.2 passes warm-up calls here; they run nothing
                return original(executor, *args, **kwargs)
            observers = list(self.observers)
            for observer in observers:
                observer.launch_started(executor.fn.__name__)
            try:
                return original(executor, *args, **kwargs)
            finally:
                for observer in observers:
                    observer.launch_finished()

        return launch


_HOOKS = _InterpreterHooks()


class TritonTrafficCounter:
    """While active (``with TritonTrafficCounter() as counter:``), counts the bytes that Triton
    kernels' loads, stores and atomics move (active lanes only) and their launches, for kernels
    run by Triton's interpreter; ``per_kernel`` has them per kernel name, ``per_category`` per
    ``classify(tensor)`` of the launch argument each access falls in (``classify(None)`` for an
    access outside them), and ``unique_per_category`` the bytes of the distinct addresses each
    launch read and wrote there: what DRAM must move when every re-read within a launch hits a
    cache. Restores the interpreter on exit."""

    def __init__(self, classify=lambda tensor: "argument" if tensor is not None else "unknown"):
        self._tally = _Tally()
        self._categories = _Tally()
        self._unique = _Tally()
        self._launch_addresses = defaultdict(list)  # (category, written, element bytes) -> arrays
        self._classify = classify
        self._kernel = None

    @property
    def per_kernel(self):
        """``{kernel name: KernelTraffic(launches, bytes_read, bytes_written)}``."""
        return self._tally.by_name()

    @property
    def per_category(self):
        """``{category: KernelTraffic(0, bytes_read, bytes_written)}``."""
        return self._categories.by_name()

    @property
    def unique_per_category(self):
        """``{category: KernelTraffic(0, distinct bytes read, distinct bytes written)}``, summed
        over launches."""
        return self._unique.by_name()

    @property
    def bytes_read(self):
        return self._tally.total().bytes_read

    @property
    def bytes_written(self):
        return self._tally.total().bytes_written

    @property
    def launches(self):
        return self._tally.total().launches

    def __enter__(self):
        if not triton_interpreter_active():
            raise RuntimeError(f"TritonTrafficCounter counts kernels run by Triton's interpreter: "
                               f"set {INTERPRET_VARIABLE}=1 before triton is imported")
        _HOOKS.register(self)
        return self

    def __exit__(self, *exc_info):
        _HOOKS.unregister(self)

    def launch_started(self, kernel):
        self._kernel = kernel
        self._tally.add(kernel, launches=1)
        self._launch_addresses.clear()

    def launch_finished(self):
        self._count_unique()
        self._kernel = None

    def accessed(self, read, written, tensor, addresses, element_bytes):
        category = self._classify(tensor)
        self._tally.add(self._kernel, read=read, written=written)
        self._categories.add(category, read=read, written=written)
        for direction, moved in (("read", read), ("written", written)):
            if moved:
                self._launch_addresses[category, direction, element_bytes].append(addresses)

    def _count_unique(self):
        """Add the distinct addresses of the launch that ends to ``unique_per_category``."""
        for (category, direction, element_bytes), arrays in self._launch_addresses.items():
            nbytes = element_bytes * np.unique(np.concatenate(arrays)).size
            self._unique.add(category, **{direction: nbytes})
        self._launch_addresses.clear()


# ---- torch ops --------------------------------------------------------------------------------

aten = torch.ops.aten
_BELOW_PYTHON = torch._C._dispatch_keyset_full_after(DispatchKey.Python)
# no kernel: allocations without a fill, and changes of a tensor's metadata
_NO_KERNEL = {aten.empty, aten.empty_strided, aten.empty_like, aten.empty_permuted, aten.new_empty,
              aten.new_empty_strided, aten.set_, aten.resize_}
_WRITE_ONLY_SELF = {aten.fill_, aten.zero_, aten.copy_}  # overwrite ``self`` without reading it
# read only the elements they pick from their first argument: as many as they write
_GATHERS = {aten.index_select, aten.gather, aten.index, aten.take, aten.embedding}
_DEVICE_TO_HOST = aten._local_scalar_dense.default


def _stored_bytes(tensor):
    """Bytes of the distinct elements a tensor view addresses (an expanded, stride-0 dimension
    holds one element)."""
    if tensor.numel() == 0:
        return 0
    distinct = math.prod(size for size, stride in zip(tensor.shape, tensor.stride()) if stride)
    return distinct * tensor.element_size()


def _tensors_bytes(value):
    """``_stored_bytes`` summed over the tensors in ``value`` (a tensor, a list, None...)."""
    return sum(_stored_bytes(leaf) for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor))


def _schema_arguments(func, args, kwargs):
    """``(schema argument, value)`` for each argument given to ``func``."""
    for index, argument in enumerate(func._schema.arguments):
        if index < len(args):
            yield argument, args[index]
        elif argument.name in kwargs:
            yield argument, kwargs[argument.name]


def _storages(value):
    """Addresses of the storages of the tensors in ``value``."""
    return {leaf.untyped_storage().data_ptr() for leaf in tree_leaves(value)
            if isinstance(leaf, torch.Tensor)}


def _op_bytes(func, args, kwargs, out):
    """``(read, written)`` of one op: it reads its tensor arguments (not an ``out=`` argument, nor
    ``self`` of a fill or copy; of a gather's source only what it picks) and writes its mutated
    arguments and its outputs that do not share storage with an input (a view writes nothing;
    ``to`` or ``reshape`` may copy or not)."""
    read = written = 0
    packet = func.overloadpacket
    for index, (argument, value) in enumerate(_schema_arguments(func, args, kwargs)):
        mutated = argument.alias_info is not None and argument.alias_info.is_write
        write_only = argument.kwarg_only or (index == 0 and packet in _WRITE_ONLY_SELF)
        if not (mutated and write_only or index == 0 and packet in _GATHERS):
            read += _tensors_bytes(value)
        if mutated:
            written += _tensors_bytes(value)
    inputs = _storages((args, kwargs))
    written += sum(_stored_bytes(leaf) for leaf in tree_leaves(out)
                   if isinstance(leaf, torch.Tensor)
                   and leaf.untyped_storage().data_ptr() not in inputs)
    if packet in _GATHERS:
        read += written
    return read, written


def _dispatch_keys(args, kwargs):
    """The dispatch keys below Python's that the op is dispatched to: its tensors' keys, or for a
    factory op the ``device`` argument's backend (CPU when none is given)."""
    keys = None
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            leaf_keys = torch._C._dispatch_keys(leaf)
            keys = leaf_keys if keys is None else keys | leaf_keys
    if keys is None:
        device = torch.device(kwargs.get("device") or "cpu")
        keys = torch._C.DispatchKeySet(getattr(DispatchKey,
                                               torch._C._dispatch_key_for_device(device.type)))
    return keys & _BELOW_PYTHON


def _has_own_kernel(func, keys):
    """Whether ``func`` (an aten or prims op) has a kernel of its own for ``keys``' backend rather
    than a composite implementation made of other ops."""
    return func.namespace in ("aten", "prims") and torch._C._dispatch_has_kernel_for_dispatch_key(
        func.name(), keys.highestPriorityTypeId())


class OpTraffic(NamedTuple):
    """One kernel launched by an aten op: its name, bytes, and whether it synchronises with the
    host (a device-to-host copy)."""

    name: str
    bytes_read: int
    bytes_written: int
    host_sync: bool


class DispatchCounter(TorchDispatchMode):
    """While active, records one ``OpTraffic`` per kernel that an aten op launches (``ops``, in
    order): an op launches a kernel when it writes memory (views, aliases, allocations and
    metadata queries write none), reading its tensor inputs and writing its new outputs or
    mutated arguments (a fill or copy does not read what it overwrites). ``.item()`` is a
    one-element device-to-host copy and a host sync. Composite ops and ops outside
    ``aten``/``prims`` are run with the counter active and counted through the ops they run;
    one that runs none counts as a kernel itself. Ops inside a Triton launch (the interpreter's
    own copies of the arguments) are not counted."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self._entered = 0
        self._launches_in_progress = 0
        self._running = []  # [op, whether it dispatched an op] per composite op being run

    @property
    def launches(self):
        return len(self.ops)

    @property
    def bytes_read(self):
        return sum(op.bytes_read for op in self.ops)

    @property
    def bytes_written(self):
        return sum(op.bytes_written for op in self.ops)

    @property
    def host_syncs(self):
        return sum(op.host_sync for op in self.ops)

    def per_op(self):
        """``{op name: KernelTraffic(launches, bytes_read, bytes_written)}``."""
        tally = _Tally()
        for op in self.ops:
            tally.add(op.name, 1, op.bytes_read, op.bytes_written)
        return tally.by_name()

    def __enter__(self):
        # entered again (``with self``) while it runs a composite op: register once
        if self._entered == 0:
            _HOOKS.register(self)
        self._entered += 1
        try:
            return super().__enter__()
        except BaseException:
            self._leave()
            raise

    def __exit__(self, *exc_info):
        try:
            super().__exit__(*exc_info)
        finally:
            self._leave()

    def _leave(self):
        self._entered -= 1
        if self._entered == 0:
            _HOOKS.unregister(self)

    def launch_started(self, kernel):
        if self._running:
            self._running[-1][1] = True
        self._launches_in_progress += 1

    def launch_finished(self):
        self._launches_in_progress -= 1

    def accessed(self, read, written, tensor, addresses, element_bytes):
        """Triton's loads and stores belong to ``TritonTrafficCounter``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reentered = bool(self._running) and self._running[-1][0] is func
        if self._running:
            self._running[-1][1] = True
        if self._launches_in_progress or func.overloadpacket in _NO_KERNEL:
            return func(*args, **kwargs)
        if func == _DEVICE_TO_HOST:
            self.ops.append(OpTraffic(str(func), _tensors_bytes(args), 0, True))
            return func(*args, **kwargs)
        keys = _dispatch_keys(args, kwargs)
        # a composite op that dispatches itself again (detach does) is run as one op
        if reentered or _has_own_kernel(func, keys):
            out = func(*args, **kwargs)
            self._record(func, args, kwargs, out)
            return out
        return self._run_composite(func, keys, args, kwargs)

    def _run_composite(self, func, keys, args, kwargs):
        """Run ``func``'s own implementation below the Python key with the counter active, so that
        the ops it runs are counted; count ``func`` itself when it runs none."""
        self._running.append([func, False])
        try:
            with self:
                out = func.redispatch(keys, *args, **kwargs)
        finally:
            ran_ops = self._running.pop()[1]
        if not ran_ops:
            self._record(func, args, kwargs, out)
        return out

    def _record(self, func, args, kwargs, out):
        """One kernel for ``func`` when it writes memory."""
        read, written = _op_bytes(func, args, kwargs, out)
        if written:
            self.ops.append(OpTraffic(str(func), read, written, False))


class CompiledCodeDispatchCounter(DispatchCounter):
    """A ``DispatchCounter`` that ``torch.compile``'s code runs under. Under a plain one Dynamo
    runs the compiled function eagerly (a dispatch mode sees every op of eager execution), and
    skips it for good from then on (later calls run eagerly too); this one asks it
    (``ignore_compile_internals``) to be off while Dynamo compiles and on while the compiled
    graphs run, so it counts the aten ops they call (extern kernels such as ``mm``, fallbacks).
    The kernels inductor generated are no aten ops: ``InductorKernelCounter`` counts them. On
    eager code it counts exactly what a ``DispatchCounter`` counts."""

    @classmethod
    def ignore_compile_internals(cls):
        return True


# the names inductor gives the kernels it generates, in its output code modules: C++ kernels on
# CPU (``cpp_fused_...``, called), Triton kernels on a GPU (``triton_poi_...``, ``.run(...)``)
_GENERATED_KERNEL_PREFIXES = ("cpp_", "triton_")


class _CountedKernel:
    """Stands in for a generated kernel in its output code module while it is counted: a call
    of it (a C++ kernel) or of its ``run`` (a Triton kernel) is one launch."""

    def __init__(self, kernel, name, tally):
        self._kernel, self._name, self._tally = kernel, name, tally

    def __call__(self, *args, **kwargs):
        self._tally.add(self._name, launches=1)
        return self._kernel(*args, **kwargs)

    def run(self, *args, **kwargs):
        self._tally.add(self._name, launches=1)
        return self._kernel.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._kernel, name)


class InductorKernelCounter:
    """While active, counts the launches of the kernels that ``torch.compile`` (inductor)
    generated: each output code module that inductor has loaded so far
    (``torch._inductor.codecache.PyCodeCache``) calls its kernels through module globals, which
    are replaced by counting stand-ins and restored on exit. Compile before counting: a module
    loaded while the counter is active is not counted. ``per_kernel``: launches per kernel
    name."""

    def __init__(self):
        self._tally = _Tally()
        self._patched = []  # (module, name, original)

    @property
    def per_kernel(self):
        return {name: counts.launches for name, counts in self._tally.by_name().items()}

    @property
    def launches(self):
        return self._tally.total().launches

    def __enter__(self):
        from torch._inductor.codecache import PyCodeCache
        for module in list(PyCodeCache.modules):
            for name, value in list(vars(module).items()):
                if name.startswith(_GENERATED_KERNEL_PREFIXES) and (
                        callable(value) or hasattr(value, "run")):
                    self._patched.append((module, name, value))
                    setattr(module, name, _CountedKernel(value, name, self._tally))
        return self

    def __exit__(self, *exc_info):
        for module, name, original in reversed(self._patched):
            setattr(module, name, original)
        self._patched.clear()


class PassLaunches(NamedTuple):
    """Kernel launches and host syncs of one pass: aten kernels (``DispatchCounter``), Triton
    launches (``TritonTrafficCounter``, under Triton's interpreter), kernels ``torch.compile``
    generated (``InductorKernelCounter``); host syncs are ``.item()`` calls."""

    aten: int
    triton: int
    compiled: int
    host_syncs: int

    @property
    def launches(self):
        return self.aten + self.triton + self.compiled


class StepLaunches(NamedTuple):
    """``PassLaunches`` of a training step's forward and backward passes."""

    forward: PassLaunches
    backward: PassLaunches

    @property
    def launches(self):
        return self.forward.launches + self.backward.launches

    @property
    def host_syncs(self):
        return self.forward.host_syncs + self.backward.host_syncs

    def fields(self):
        """The JSON fields of ``python -m bench``'s results: launches and host syncs per pass
        and per step, and the launches by kind per pass."""
        return {
            "forward_launches": self.forward.launches,
            "backward_launches": self.backward.launches,
            "launches": self.launches,
            "forward_host_syncs": self.forward.host_syncs,
            "backward_host_syncs": self.backward.host_syncs,
            "host_syncs": self.host_syncs,
            "launch_kinds": {name: {kind: getattr(counts, kind)
                                    for kind in ("aten", "triton", "compiled")}
                             for name, counts in zip(("forward", "backward"), self)},
        }


def count_launches(run):
    """Run ``run()`` under the launch counters: ``(its result, PassLaunches)``. Triton launches
    are counted when Triton's interpreter runs them (``TRITON_INTERPRET=1``); a Triton kernel
    run on a GPU would be missed."""
    with contextlib.ExitStack() as stack:
        triton_counter = (stack.enter_context(TritonTrafficCounter())
                          if triton_interpreter_active() else None)
        compiled = stack.enter_context(InductorKernelCounter())
        aten = stack.enter_context(CompiledCodeDispatchCounter())
        result = run()
    triton_launches = triton_counter.launches if triton_counter else 0
    return result, PassLaunches(aten.launches, triton_launches, compiled.launches,
                                aten.host_syncs)


def count_step(passes):
    """``StepLaunches`` of one more step of ``passes`` (``bench.providers.Passes``): the forward
    pass, then the backward pass of its loss. Run a step first (warm-up, compiles)."""
    loss, forward = count_launches(passes.forward)
    _, backward = count_launches(lambda: passes.backward(loss))
    return StepLaunches(forward, backward)


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


@contextlib.contextmanager
def value_checks_as_on_a_gpu(triton_path=True):
    """While counting the Triton path, its value checks where a GPU run has them: in the kernels
    (the finishing kernel's device assertion), not on the host as for the interpreter's CPU
    tensors (``gkl_kernels.functional.kernels_check_values``)."""
    if not triton_path:
        yield
        return
    original = gkl_functional.kernels_check_values
    gkl_functional.kernels_check_values = lambda use_triton, device: use_triton
    try:
        yield
    finally:
        gkl_functional.kernels_check_values = original


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
        "model": {"label": MODEL_LABEL,
                  "bandwidth_bytes_per_second": H100_BANDWIDTH_BYTES_PER_SECOND,
                  "launch_latency_seconds": LAUNCH_LATENCY_SECONDS},
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


# ---- launches per step of python -m bench's cases, and the modelled H100 step -------------------

STEP_COUNT_ROWS = 8  # the interpreter counts a case's launches at most at this many rows
STEP_COUNT_ELEMENTS = 4096  # and at fewer where B x C would be larger than this
H100_STEP_CASE = Case("imagenet", 256, 1000, PRIOR, IMAGENET)  # the bench's ImageNet case
H100_STEP_TARGET = 0.3  # gkl_loss[triton]'s modelled step at most this share of F.kl_div's
HOST_STEP_CASE = Case("host", 32, 10, PRIOR, IMAGENET)  # host time: bench.overhead's smallest
HOST_STEPS, HOST_WARMUP_STEPS = 400, 20
MODELLED_GOAL = (f"the project's goal that on an H100 a step of the Triton kernels costs at most "
                 f"{H100_STEP_TARGET:g}x plain KD's (F.kl_div's), so GKL is the cheaper loss")


def step_count_batch(case):
    """The ``B`` at which the interpreter counts a case's launches: the case's own, or fewer rows
    (``C`` kept): at most ``STEP_COUNT_ROWS``, and fewer (at least 2) where ``B x C`` would pass
    ``STEP_COUNT_ELEMENTS``. Triton's interpreter runs each program of a grid in Python (tens of
    milliseconds per row), and the launches (the number of kernels and of torch ops around them,
    not their grids) do not depend on ``B`` (``tests/test_traffic_counters.py`` checks it)."""
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
        return count_step(passes)


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


@contextlib.contextmanager
def triton_launches_stubbed():
    """While active, every Triton launch (under the interpreter) returns at once and runs
    nothing: what remains of a step is its host time (Python, dispatch, allocations)."""
    kernel_type = interpreter.InterpretedFunction
    original = kernel_type.__dict__.get("__getitem__")  # triton 3.2 has its own, 3.9 inherits it
    kernel_type.__getitem__ = lambda self, grid: lambda *args, **kwargs: None
    try:
        yield
    finally:
        if original is None:
            del kernel_type.__getitem__
        else:
            kernel_type.__getitem__ = original


def host_seconds_per_step(provider_name, case=HOST_STEP_CASE, steps=HOST_STEPS):
    """Median wall time of ``steps`` forward+backward steps of the provider named
    ``provider_name`` on ``make_inputs(case)`` (CPU), after a warm-up: ``gkl_loss[triton]`` with
    its launches stubbed and its value checks as on a GPU (its host time); ``F.kl_div`` as it
    runs, its arithmetic at that shape a few microseconds of aten's dispatch."""
    student, teacher, loss_kwargs = make_inputs(case)
    passes = make_passes(select_providers([provider_name])[0].build(), student, teacher,
                         loss_kwargs)
    triton_path = provider_name == PACKAGE_TRITON
    with value_checks_as_on_a_gpu(triton_path), \
            triton_launches_stubbed() if triton_path else contextlib.nullcontext():
        times = []
        for index in range(steps + HOST_WARMUP_STEPS):
            start = time.perf_counter()
            passes.step()
            if index >= HOST_WARMUP_STEPS:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def modelled_step(case=H100_STEP_CASE):
    """The modelled H100 time (``modelled_h100_seconds``, a MODEL) of one training step of
    ``gkl_loss[triton]`` and of ``F.kl_div`` on ``case``, from the bytes and launches of the
    whole step (forward and backward) that ``count_case`` counts at the case's shape, and their
    ratio with its target ``H100_STEP_TARGET``."""
    steps = []
    for provider, backend in ((PACKAGE_TRITON, "triton"), (KL_DIV, KL_DIV_BACKEND)):
        counted = count_case(case, backend)
        total = counted.total
        steps.append({"provider": provider, "bytes": total.bytes, "launches": total.launches,
                      "forward_launches": counted.forward.launches,
                      "backward_launches": counted.backward.launches,
                      "host_syncs": total.host_syncs,
                      "modelled_seconds": modelled_h100_seconds(total.bytes, total.launches),
                      "host_seconds": host_seconds_per_step(provider)})
    ratio = steps[0]["modelled_seconds"] / steps[1]["modelled_seconds"]
    return {"case": case.name, "batch": case.batch, "classes": case.classes,
            "dtype": case.dtype, "weights": case.weights, "steps": steps, "ratio": ratio,
            "target": H100_STEP_TARGET, "met": ratio <= H100_STEP_TARGET,
            "host_batch": HOST_STEP_CASE.batch, "host_classes": HOST_STEP_CASE.classes,
            "model": {"label": MODEL_LABEL,
                      "bandwidth_bytes_per_second": H100_BANDWIDTH_BYTES_PER_SECOND,
                      "launch_latency_seconds": LAUNCH_LATENCY_SECONDS}}


def format_modelled_step(row):
    """The modelled step as two lines: the ratio, then what the model is made of."""
    package, kl_div = row["steps"]
    verdict = "met" if row["met"] else "MISSED"
    details = "; ".join(
        f"{step['provider']} {format_bytes(step['bytes'])} in {step['launches']} launches "
        f"(fwd {step['forward_launches']} + bwd {step['backward_launches']}), "
        f"{step['host_syncs']} syncs" for step in row["steps"])
    model = row["model"]
    return (f"modelled (not measured) H100 step at B={row['batch']} C={row['classes']} "
            f"{row['dtype']}, {row['weights']} weights, forward+backward: {package['provider']} "
            f"{format_seconds(package['modelled_seconds'])} vs {kl_div['provider']} "
            f"{format_seconds(kl_div['modelled_seconds'])} = {row['ratio']:.2f}x "
            f"(target: at most {row['target']:g}x: {verdict}), i.e. "
            f"{speed(1 / row['ratio'])} than {kl_div['provider']}\n"
            f"  target: {MODELLED_GOAL}\n"
            f"  a MODEL, no GPU was timed: bytes / {model['bandwidth_bytes_per_second'] / 1e12:.2f}"
            f" TB/s (H100 SXM HBM3) + launches x {model['launch_latency_seconds'] * 1e6:g} us "
            f"(assumed); bytes and launches of the whole step counted under Triton's interpreter "
            f"and DispatchCounter at that shape: {details}\n"
            f"  {host_text(row)}")


def host_text(row):
    """The measured host time of both steps, and what it bounds."""
    package, kl_div = row["steps"]
    return (f"host time of one step, measured on this CPU at B={row['host_batch']} "
            f"C={row['host_classes']} (median of {HOST_STEPS} steps): {package['provider']} "
            f"{format_seconds(package['host_seconds'])} with its Triton launches stubbed and its "
            f"value checks as on a GPU, {kl_div['provider']} "
            f"{format_seconds(kl_div['host_seconds'])} (its arithmetic there is a few "
            f"microseconds): on a GPU a step takes at least its host time, unless earlier work "
            f"(the model's) keeps the device busy")


def modelled_headline(row):
    """The modelled step as one closing line, labelled as a model."""
    package, kl_div = row["steps"]
    verdict = "met" if row["met"] else "MISSED"
    return (f"MODELLED, not measured: one H100 step at B={row['batch']} C={row['classes']} "
            f"{row['dtype']}: {package['provider']} would be "
            f"{speed(1 / row['ratio'])} than {kl_div['provider']} (goal: at least "
            f"{1 / row['target']:.1f}x faster, so that on a GPU GKL costs less than plain KD: "
            f"{verdict}); measured on this CPU, the host time of a step (Python and dispatch: "
            f"a bound on a step the device does not hide): {package['provider']} "
            f"{format_seconds(package['host_seconds'])}, {kl_div['provider']} "
            f"{format_seconds(kl_div['host_seconds'])}")


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
    step = modelled_step()
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
