"""Kernel launches, bytes and host syncs of torch ops, counted per aten op that runs a kernel:
``DispatchCounter`` (eager code), ``CompiledCodeDispatchCounter`` (``torch.compile``'d code's aten
calls) and ``InductorKernelCounter`` (the kernels ``torch.compile`` generated).

An op reads its tensor inputs and writes its new outputs or mutated arguments; ``.item()``
(``aten._local_scalar_dense``) is a launch and a host synchronisation. Composite ops (those
without a kernel of their own for the tensors' device, e.g. ``logsumexp``, ``linalg_vecdot``,
``clone``) and ops outside ``aten`` (the package's ``torch.library`` custom ops) are counted
through the ops they run. A Triton launch is opaque here: the torch ops around a kernel are this
counter's, the kernel ``gkl_kernels.testing.traffic.TritonTrafficCounter``'s, so the two add up
without counting anything twice.
"""

import math
from typing import NamedTuple

import torch
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from gkl_kernels.testing.traffic import HOOKS, Tally

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
        tally = Tally()
        for op in self.ops:
            tally.add(op.name, 1, op.bytes_read, op.bytes_written)
        return tally.by_name()

    def __enter__(self):
        # entered again (``with self``) while it runs a composite op: register once
        if self._entered == 0:
            HOOKS.register(self)
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
            HOOKS.unregister(self)

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
        self._tally = Tally()
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

