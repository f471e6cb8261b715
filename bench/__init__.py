"""Benchmarks and ahead-of-time compile checks for gkl_kernels."""
