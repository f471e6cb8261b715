"""Peak memory of the CPU tensors a callable allocates: the CPU analogue of
``torch.cuda.reset_peak_memory_stats(); fn(); torch.cuda.max_memory_allocated() - baseline``.

The meter runs the callable once under ``torch.profiler`` with ``profile_memory=True``. PyTorch's
CPU allocator then reports every allocation and every free of a block, with its address, size and
time: one event per storage (a view allocates nothing, so it adds nothing), including buffers made
inside operators, by the autograd engine and by ``torch.compile``'d code, which a
``TorchDispatchMode`` would not see. Replaying the events in time order gives the bytes alive at
each moment; the peak is the largest such total. Only blocks allocated during the call count: a
free of a block that existed before (an input released by the callable) is ignored, since the
allocator may report it with a stale size; so the peak is never under-counted. The storage the
plain-PyTorch rows keep between calls (``Scratch``) is released before the call, so that the
scratch a call needs counts in its peak.
"""

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from gkl_kernels.rank1.torch_impl import Scratch


def measure_peak_memory(fn):
    """Call ``fn()`` once; return ``(peak_bytes, result)`` where ``peak_bytes`` is the largest
    number of bytes of CPU tensor memory allocated during the call and alive at the same time
    (memory live before the call not counted). ``result`` is what ``fn`` returned; its tensors
    were allocated during the call, so they are part of the peak."""
    Scratch.release_idle()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return peak_of_allocations(cpu_allocations(prof)), result


def cpu_allocations(prof):
    """``(time_ns, address, signed_bytes)`` of every CPU allocation (+) and free (-) a finished
    profiler recorded, in the order the profiler's event tree lists them."""
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            fields = event.extra_fields
            allocations.append((event.start_time_ns, fields.ptr, fields.alloc_size))
    return allocations


def peak_of_allocations(allocations):
    """Replay ``(time_ns, address, signed_bytes)`` events in time order and return the largest
    number of bytes alive at once, counting only blocks allocated by these events (a free of an
    address not allocated here is ignored)."""
    alive = {}
    total = peak = 0
    for _, address, nbytes in sorted(allocations, key=lambda event: event[0]):
        if nbytes > 0:
            alive[address] = nbytes
            total += nbytes
            peak = max(peak, total)
        elif address in alive:
            total -= alive.pop(address)
    return peak


def available_memory_bytes():
    """``MemAvailable`` of ``/proc/meminfo`` in bytes: what new allocations can take without
    swapping; ``None`` where that file is absent (not Linux)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
