"""The generalized Jensen-Shannon divergence of TRL's and Liger-Kernel's distillation losses, on
the core's row statistics: Triton kernels (``kernels``) and the plain-PyTorch path
(``torch_impl``)."""
