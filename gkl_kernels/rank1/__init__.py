"""Rank-one pair weights ``w[b,j,k] = v[b,j] v[b,k]``: Triton kernels (``kernels``), the
plain-PyTorch path (``torch_impl``) and the custom op with autograd (``op``)."""
