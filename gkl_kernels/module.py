"""``GKLLoss``: the ``nn.Module`` form of ``gkl_loss``, holding its options."""

from torch import nn

from gkl_kernels.functional import gkl_loss_with_options
from gkl_kernels.options import GKLOptions


class GKLLoss(nn.Module):
    """``GKLLoss(gamma=1.0, temperature=1.0, ...)(student, teacher, labels=None, class_prior=None,
    weights=None, weights_kind=None)``: see ``gkl_kernels.gkl_loss`` for every option (checked
    here, at construction); returns a 0-dim float32 loss."""

    def __init__(self, *, gamma=1.0, temperature=1.0, weight_temperature=1.0, mse_weight=1.0,
                 ce_weight=1.0, normalize="weights", symmetric=True, backend="auto",
                 check_values=True, block_c=None, dot_precision="ieee", sync_normalizer=False,
                 process_group=None, ignore_index=-100):
        super().__init__()
        self.options = GKLOptions(gamma=gamma, temperature=temperature,
                                  weight_temperature=weight_temperature, mse_weight=mse_weight,
                                  ce_weight=ce_weight, normalize=normalize, symmetric=symmetric,
                                  backend=backend, check_values=check_values, block_c=block_c,
                                  dot_precision=dot_precision, sync_normalizer=sync_normalizer,
                                  process_group=process_group, ignore_index=ignore_index)

    def forward(self, student, teacher, labels=None, class_prior=None, weights=None,
                weights_kind=None):
        return gkl_loss_with_options(student, teacher, self.options, labels=labels,
                                     class_prior=class_prior, weights=weights,
                                     weights_kind=weights_kind)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.options).items())
