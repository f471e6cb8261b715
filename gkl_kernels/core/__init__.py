"""The core both weight families build on: ``config`` (``RowConfig``, the layout of the row
statistics, column parts and batch totals, the float options' packing for the kernels) and
``kernels`` (the shared ``@triton.jit`` pieces: exact sums, the cross-entropy statistics and
their merge rule, the statistics' loads and stores, the finishing kernel, the gradient-store
epilogue)."""
