"""The CPU peak-memory meter of ``gkl_kernels.testing.memory`` against hand counts."""

import sys

import pytest
import torch

from gkl_kernels.testing.memory import (available_memory_bytes, measure_peak_memory,
                                        peak_of_allocations)

FLOAT32 = 4


def test_peak_of_known_allocations_and_a_free():
    def allocate():
        a = torch.empty(1000)
        b = torch.empty(2000)
        c = torch.empty(3000)
        del b  # live: a + c = 4000 floats
        d = torch.empty(4000)  # live: a + c + d = 8000 floats, the peak
        return a, c, d

    peak, result = measure_peak_memory(allocate)
    assert peak == 8000 * FLOAT32
    assert [t.numel() for t in result] == [1000, 3000, 4000]


def test_peak_before_a_free_counts():
    def allocate_then_free():
        a = torch.empty(5000)
        del a
        return torch.empty(1000)

    peak, _ = measure_peak_memory(allocate_then_free)
    assert peak == 5000 * FLOAT32


def test_views_add_nothing():
    x = torch.randn(64, 64)

    def views():
        return x.view(4096), x.t(), x[::2, 1:], x.unsqueeze(0).expand(3, 64, 64), x.reshape(32, 128)

    peak, _ = measure_peak_memory(views)
    assert peak == 0


def test_each_storage_counted_once_and_dtype_sizes():
    def allocate():
        base = torch.zeros(100, dtype=torch.float64)
        views = [base[i:] for i in range(10)]
        return base, views, torch.zeros(100, dtype=torch.int16)

    peak, _ = measure_peak_memory(allocate)
    assert peak == 100 * 8 + 100 * 2


def test_inputs_alive_before_the_call_are_not_counted_and_their_free_is_not_subtracted():
    # profile an allocation and free it unprofiled first: the allocator may then report the next
    # block at that address with this stale size when it is freed
    _, stale = measure_peak_memory(lambda: torch.empty(2500))
    del stale
    holder = [torch.empty(10_000)]

    def drop_input_then_allocate():
        holder.clear()
        return torch.empty(1000)

    peak, _ = measure_peak_memory(drop_input_then_allocate)
    assert peak == 1000 * FLOAT32


def test_operator_temporaries_and_backward_buffers_are_seen():
    n = 100_000
    x = torch.randn(n, requires_grad=True)

    def forward_backward():
        loss = (x * 3.0).sum()  # x * 3.0: n floats, freed after the sum; the loss: one float
        return torch.autograd.grad(loss, x)  # the gradient: n floats, plus a few scalars

    peak, (grad,) = measure_peak_memory(forward_backward)
    assert torch.equal(grad, torch.full((n,), 3.0))
    assert n * FLOAT32 <= peak <= n * FLOAT32 + 64


@pytest.mark.skipif(sys.platform != "linux", reason="torch.compile's C++ backend: Linux here")
def test_compiled_code_buffers_are_seen():
    n = 50_000
    x = torch.randn(n)
    compiled = torch.compile(lambda y: (y + 1.0) * 2.0)
    compiled(x)  # compile outside the measurement
    peak, out = measure_peak_memory(lambda: compiled(x))
    assert torch.allclose(out, (x + 1.0) * 2.0)
    assert n * FLOAT32 <= peak <= 2 * n * FLOAT32


def test_replay_orders_by_time():
    # listed out of order; in time order: +100 @1, +50 @2, -50 @2, -100 @3: the peak is 150
    events = [(30, 0x10, -100), (10, 0x10, 100), (20, 0x20, 50), (20, 0x20, -50)]
    assert peak_of_allocations(events) == 150


def test_replay_ignores_frees_of_blocks_from_before():
    # 0x99 was allocated before the measurement: its free must not lower the count
    events = [(1, 0x99, -10_000), (2, 0x10, 300), (3, 0x20, 200)]
    assert peak_of_allocations(events) == 500
    assert peak_of_allocations([(1, 0x99, -500)]) == 0
    assert peak_of_allocations([]) == 0


def test_replay_reuses_an_address_after_its_free():
    events = [(1, 0x10, 400), (2, 0x10, -400), (3, 0x10, 100), (4, 0x20, 100)]
    assert peak_of_allocations(events) == 400


def test_available_memory_is_positive_on_linux():
    available = available_memory_bytes()
    if sys.platform == "linux":
        assert available > 0
    else:
        assert available is None
