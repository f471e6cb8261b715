"""Pure-PyTorch reference of the GKL / DKL loss: the literal ``B x C x C`` formulas of docs/SPEC.md;
and of the generalized JSD, as TRL and Liger-Kernel write it.

Slow and memory-hungry by design; it is the oracle of the test suite (evaluate it in float64).
"""

from reference.gkl import (
    gkl_loss_reference,
    pair_weights_reference,
    pairwise_wmse_reference,
    rank1_factor_reference,
    rank1_wmse_reference,
)
from reference.jsd import jsd_loss_reference, jsd_rows_reference

__all__ = [
    "gkl_loss_reference",
    "jsd_loss_reference",
    "jsd_rows_reference",
    "pair_weights_reference",
    "pairwise_wmse_reference",
    "rank1_factor_reference",
    "rank1_wmse_reference",
]
