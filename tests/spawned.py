"""``run_processes``: the spawn/join/timeout loop of the ``torch.distributed`` tests;
``run_and_load``: that loop, then the results each rank saved."""

import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp


def run_processes(worker, nprocs, args=(), timeout_seconds=120):
    """Run ``worker(rank, init_method, *args)`` in ``nprocs`` spawned processes and wait for all.

    ``init_method`` is a ``file://`` rendezvous in a fresh temporary directory (pass it to
    ``torch.distributed.init_process_group``). A worker's exception is re-raised here with its
    traceback (``torch.multiprocessing.ProcessRaisedException``; the other workers are then
    terminated); workers still running after ``timeout_seconds`` are killed and the test fails.
    ``worker`` must be importable by name (a module-level function).
    """
    with tempfile.TemporaryDirectory() as directory:
        context = mp.start_processes(worker, args=(f"file://{directory}/rendezvous", *args),
                                     nprocs=nprocs, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_seconds
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    pytest.fail(f"{nprocs} workers did not finish in {timeout_seconds} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()


def run_and_load(worker, nprocs, directory, args=(), timeout_seconds=120):
    """``run_processes(worker, nprocs, (str(directory), *args))``, then the results each rank
    ``r`` saved to ``directory / f"rank{r}.pt"``, in rank order."""
    run_processes(worker, nprocs, (str(directory), *args), timeout_seconds)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(nprocs)]
