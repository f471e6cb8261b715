"""The benchmark comparison of gkl_kernels: ``python -m bench`` and ``python -m bench.fused_linear``
(their tests: ``tests/test_bench_*.py``)."""
