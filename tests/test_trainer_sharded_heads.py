"""``FusedLinearDistillationLoss`` with sharded output layers, two processes on CPU (gloo): a head
held by FSDP2 (``fully_shard``: its weight and bias are ``DTensor`` shards of rows) and a head
given as a ``DTensor`` on a device mesh; each is gathered once per call and its gradient comes
back as shards. Loss and gradients against the same loss of the whole heads."""

import os

import pytest
import torch

from tests.spawned import run_and_load

pytestmark = pytest.mark.torch_only  # the plain-PyTorch rows: CI runs it once

TOKENS, HIDDEN, TEACHER_HIDDEN, VOCABULARY = 10, 8, 12, 22  # 11 vocabulary rows per process


def heads():
    generator = torch.Generator().manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=generator)

    labels = torch.randint(0, VOCABULARY, (TOKENS,), generator=generator)
    labels[3] = -100
    return (make(TOKENS, HIDDEN), make(VOCABULARY, HIDDEN), make(VOCABULARY),
            make(TOKENS, TEACHER_HIDDEN), make(VOCABULARY, TEACHER_HIDDEN), make(VOCABULARY),
            labels)


def criterion():
    from gkl_kernels import FusedLinearDistillationLoss

    return FusedLinearDistillationLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, chunk_size=4,
                                       backend="torch")


def _worker(rank, init_method, directory, form):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        h, w, b, ht, wt, bt, labels = heads()
        h.requires_grad_()
        if form == "fully_shard":
            student, teacher = (torch.nn.Linear(x.shape[1], VOCABULARY) for x in (w, wt))
            for head, weight, bias in ((student, w, b), (teacher, wt, bt)):
                with torch.no_grad():
                    head.weight.copy_(weight)
                    head.bias.copy_(bias)
                fully_shard(head, mesh=mesh)
            parameters = (student.weight, student.bias, teacher.weight, teacher.bias)
        else:
            parameters = tuple(distribute_tensor(x, mesh, [Shard(0)]) for x in (w, b, wt, bt))
            parameters[0].requires_grad_()
            parameters[1].requires_grad_()
        sw, sb, tw, tb = parameters
        assert all(isinstance(p, torch.distributed.tensor.DTensor) for p in parameters)
        loss = criterion()(h, sw, ht, tw, labels, sb, tb)
        loss.backward()
        torch.save({"loss": loss.detach(), "hidden": h.grad,
                    "weight": sw.grad.full_tensor(), "bias": sb.grad.full_tensor(),
                    "weight_shard": sw.grad.to_local().clone()},
                   f"{directory}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # past this point the results are saved: leave without the interpreter's teardown, where a
    # thread torch.distributed started can abort the process ("terminate called without an
    # active exception", about one run in five on this machine)
    os._exit(0)


@pytest.mark.parametrize("form", ("fully_shard", "dtensor"))
def test_sharded_heads_give_the_whole_heads_loss_and_gradients(form, tmp_path):
    results = run_and_load(_worker, 2, tmp_path, (form,))
    h, w, b, ht, wt, bt, labels = heads()
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss = criterion()(leaves[0], leaves[1], ht, wt, labels, leaves[2], bt)
    loss.backward()
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-6, atol=0)
        for name, leaf in zip(("hidden", "weight", "bias"), leaves):
            torch.testing.assert_close(got[name], leaf.grad, rtol=1e-5, atol=1e-7, msg=name)
        rows = slice(rank * VOCABULARY // 2, (rank + 1) * VOCABULARY // 2)
        torch.testing.assert_close(got["weight_shard"], leaves[1].grad[rows], rtol=1e-5,
                                   atol=1e-7)
