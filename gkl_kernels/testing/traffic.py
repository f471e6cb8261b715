"""The bytes and launches of Triton kernels run by Triton's interpreter (``TRITON_INTERPRET=1``,
set before triton is imported), counted lane by lane: ``TritonTrafficCounter``.

Every ``tl.load`` / ``tl.store`` (and atomic) moves ``element bytes x active lanes``
(masked-off lanes move nothing). These are the bytes the kernels' memory instructions ask for: on
a GPU a re-read of a tile can be served by L1/L2 (the shared ``(C, C)`` and per-row ``(B, C, C)``
kernels re-read logit tiles by design), so for those kernels the count is an upper bound on DRAM
traffic, and ``unique_per_category`` (distinct addresses per launch) the traffic when every
re-read hits a cache; for the rank-one kernels, which touch each element once per pass, it is the
DRAM traffic. ``InterpreterHooks`` also tells ``gkl_kernels.testing.dispatch.DispatchCounter``
when a launch is in progress.
"""

import inspect
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch
from torch.utils._pytree import tree_leaves
from triton.runtime import interpreter

from gkl_kernels.validation import triton_interpreter_active


class KernelTraffic(NamedTuple):
    """Launches and bytes of one kernel (or aten op) name."""

    launches: int
    bytes_read: int
    bytes_written: int

    @property
    def bytes(self):
        """Bytes read plus bytes written."""
        return self.bytes_read + self.bytes_written


class Tally:
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


class InterpreterHooks:
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


HOOKS = InterpreterHooks()  # one set of hooks, shared by every counter active at once


class TritonTrafficCounter:
    """While active (``with TritonTrafficCounter() as counter:``), counts the bytes that Triton
    kernels' loads, stores and atomics move (active lanes only) and their launches, for kernels
    run by Triton's interpreter; ``per_kernel`` has them per kernel name, ``per_category`` per
    ``classify(tensor)`` of the launch argument each access falls in (``classify(None)`` for an
    access outside them), and ``unique_per_category`` the bytes of the distinct addresses each
    launch read and wrote there: what DRAM must move when every re-read within a launch hits a
    cache. Restores the interpreter on exit."""

    def __init__(self, classify=lambda tensor: "argument" if tensor is not None else "unknown"):
        self._tally = Tally()
        self._categories = Tally()
        self._unique = Tally()
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
            raise RuntimeError("TritonTrafficCounter counts kernels run by Triton's interpreter: "
                               "set TRITON_INTERPRET=1 before triton is imported")
        HOOKS.register(self)
        return self

    def __exit__(self, *exc_info):
        HOOKS.unregister(self)

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

