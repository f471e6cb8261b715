"""``FusedLinearJSDLoss`` against Liger-Kernel's ``LigerFusedLinearJSDLoss`` itself (it runs on
CPU): loss, soft and hard terms, and the gradients of the student's hidden states, weight and
bias, for several ``beta``, weights, temperatures, ``ignore_index`` and chunk sizes; and the call
sites written for Liger (TRL's GKD trainer's construction, the five-tensor positional call)."""

import pytest
import torch

import gkl_kernels

liger = pytest.importorskip("liger_kernel.chunked_loss")
pytestmark = pytest.mark.torch_only  # the plain-PyTorch path against Liger's: CI runs it once

CASES = [  # beta, weight_hard_loss, weight_soft_loss, temperature, ignore_index, chunk_size
    (0.5, 0.5, 0.5, 1.0, -100, 1024),
    (0.0, 0.0, 1.0, 1.0, -100, 8),
    (1.0, 0.3, 0.7, 2.0, -100, 5),
    (0.1, 0.5, 0.5, 0.5, 7, 16),
    (0.9, 1.0, 0.25, 4.0, -1, 3),
]


def heads(generator, tokens=20, vocabulary=48, hidden=16, teacher_hidden=24):
    return (torch.randn(tokens, hidden, generator=generator),
            0.3 * torch.randn(vocabulary, hidden, generator=generator),
            torch.randn(tokens, teacher_hidden, generator=generator),
            0.3 * torch.randn(vocabulary, teacher_hidden, generator=generator),
            0.1 * torch.randn(vocabulary, generator=generator),
            0.1 * torch.randn(vocabulary, generator=generator))


def run(criterion, student_input, student_weight, teacher_input, teacher_weight, labels,
        student_bias, teacher_bias):
    """``(loss, soft, hard, grad input, grad weight, grad bias)`` of one call."""
    leaves = [x.clone().requires_grad_() for x in (student_input, student_weight, student_bias)]
    loss, soft, hard = criterion(leaves[0], leaves[1], teacher_input, teacher_weight, labels,
                                 leaves[2], teacher_bias)
    return (loss, soft, hard, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("beta, hard, soft, temperature, ignore_index, chunk_size", CASES)
def test_matches_liger_fused_linear_jsd(beta, hard, soft, temperature, ignore_index, chunk_size,
                                        generator):
    tensors = heads(generator)
    labels = torch.randint(0, 48, (20,), generator=generator)
    labels[[1, 6, 13]] = ignore_index
    arguments = (hard, soft, beta, ignore_index, temperature, False, chunk_size, True)
    ours = run(gkl_kernels.FusedLinearJSDLoss(*arguments), *tensors[:4], labels, *tensors[4:])
    theirs = run(liger.LigerFusedLinearJSDLoss(*arguments), *tensors[:4], labels,
                 *tensors[4:])
    names = ("loss", "soft", "hard", "grad input", "grad weight", "grad bias")
    for name, a, b in zip(names, ours, theirs):
        assert torch.allclose(a, b, rtol=2e-5, atol=1e-7), name


def test_the_call_sites_written_for_liger_run_unchanged(generator):
    """TRL's GKD trainer built ``LigerFusedLinearJSDLoss(beta=..., ignore_index=-100,
    compiled=False, weight_hard_loss=0.0, weight_soft_loss=1.0)`` and called it with five
    tensors."""
    student_input, student_weight, teacher_input, teacher_weight, _, _ = heads(generator)
    labels = torch.randint(0, 48, (20,), generator=generator)
    options = dict(beta=0.4, ignore_index=-100, compiled=False, weight_hard_loss=0.0,
                   weight_soft_loss=1.0)
    ours = gkl_kernels.FusedLinearJSDLoss(**options)(student_input, student_weight,
                                                     teacher_input, teacher_weight, labels)
    theirs = liger.LigerFusedLinearJSDLoss(**options)(student_input, student_weight,
                                                       teacher_input, teacher_weight, labels)
    assert torch.allclose(ours, theirs, rtol=2e-5, atol=1e-7)
    trainer_loss = gkl_kernels.FusedLinearDistillationLoss(
        divergence="jsd", beta=0.4, compiled=False, weight_hard_loss=0.0, weight_soft_loss=1.0,
        return_soft_hard_loss=True)
    loss, soft, hard = trainer_loss(student_input, student_weight, teacher_input,
                                    teacher_weight, labels)
    assert torch.allclose(loss, theirs, rtol=2e-5, atol=1e-7)
    assert torch.equal(loss, soft) and hard > 0  # weight_hard_loss = 0: the loss is the soft term


def test_bad_constructor_arguments_are_named():
    with pytest.raises(TypeError, match="compiled"):
        gkl_kernels.FusedLinearJSDLoss(compiled="yes")
    with pytest.raises(ValueError, match="beta"):
        gkl_kernels.FusedLinearJSDLoss(beta=2.0)
    with pytest.raises(ValueError, match="return_soft_hard_loss"):
        gkl_kernels.FusedLinearDistillationLoss(return_components=True,
                                                return_soft_hard_loss=False)
