"""Counters for the tests and the benchmark, not part of the loss's API (``import gkl_kernels``
does not import them): what a step moves, launches and allocates.

- ``traffic``: ``TritonTrafficCounter``, the bytes and launches of Triton kernels run by Triton's
  interpreter, lane by lane.
- ``dispatch``: ``DispatchCounter``, the kernels, bytes and host syncs of aten ops;
  ``InductorKernelCounter``, the launches of the kernels ``torch.compile`` generated.
- ``launches``: ``count_step``, a training step's launches and host syncs per pass;
  ``value_checks_as_on_a_gpu`` and ``triton_launches_stubbed``, the Triton path's host work as on
  a GPU.
- ``memory``: ``measure_peak_memory``, the peak of the CPU tensor memory a callable allocates.
"""
