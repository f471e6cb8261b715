"""gkl_kernels: fused Triton kernels for the Generalized / Decoupled Kullback-Leibler loss."""

from gkl_kernels import compat
from gkl_kernels.functional import gkl_loss, jsd_loss, pairwise_wmse
from gkl_kernels.fused_linear import (FusedLinearGKLLoss, fused_linear_gkl, fused_linear_gkl_sparse,
                                      fused_linear_jsd, fused_linear_jsd_sparse)
from gkl_kernels.module import GKLLoss
from gkl_kernels.prior import ClassPrior
from gkl_kernels.sparse_teacher import SparseTeacher
from gkl_kernels.trainer import FusedLinearDistillationLoss, FusedLinearJSDLoss
from gkl_kernels.vocab_parallel import vocab_parallel_gkl_loss, vocab_parallel_jsd_loss

__all__ = ["ClassPrior", "FusedLinearDistillationLoss", "FusedLinearGKLLoss", "FusedLinearJSDLoss",
           "GKLLoss", "SparseTeacher", "compat", "fused_linear_gkl", "fused_linear_gkl_sparse",
           "fused_linear_jsd", "fused_linear_jsd_sparse", "gkl_loss", "jsd_loss", "pairwise_wmse",
           "vocab_parallel_gkl_loss", "vocab_parallel_jsd_loss"]
__version__ = "0.1.0"
