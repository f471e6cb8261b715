"""``vocab_parallel_jsd_loss``: the generalized JSD of logits whose vocabulary is sharded across 2
gloo processes (uneven shards of ``C = 33``), on both backends: every process gets the loss of
the whole vocabulary, and the shards' gradients together are the whole gradient, within the
hostile-input rule of ``test_jsd`` (masked columns on one shard, row offsets, peaked and wide
rows, ignored rows holding NaN) with the mixture, and for forward and reverse KL on random rows,
masked columns and opposite offsets. Without a process group it is ``jsd_loss``."""

import datetime
import zlib

import pytest
import torch
import torch.distributed as dist

from gkl_kernels import jsd_loss, vocab_parallel_jsd_loss
from tests.conftest import BACKENDS
from tests.spawned import run_and_load
from tests.test_jsd import HOSTILE, assert_within_the_rule, hostile_case

pytestmark = pytest.mark.entry_point  # the kernels through an entry point: CI runs it once

WIDTHS = (14, 19)  # the two shards of C = 33
BETAS = (0.0, 0.5, 1.0)
EVERY_BETA = ("random-T2", "mask-inf", "mask-min", "offset-1e6-opposite")  # others: the mixture
CASES = [(case, beta, backend) for case in ("random-T2", *HOSTILE)
         for beta in (BETAS if case in EVERY_BETA else (0.5,)) for backend in BACKENDS]
TIMEOUT_SECONDS = 240


def case_inputs(case):
    """``(student, teacher, labels, temperature)`` of a case, the same in every process."""
    generator = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    if case == "random-T2":
        student, teacher, _ = hostile_case("random", generator)
        labels = torch.tensor([3, -100, 0, 32, 7, -100])
        return student, teacher, labels, 2.0
    return (*hostile_case(case, generator), 1.0)


def columns_of(rank):
    return slice(sum(WIDTHS[:rank]), sum(WIDTHS[:rank + 1]))


def shard_loss_and_grad(case, beta, backend, columns):
    """This process's loss and its student shard's gradient."""
    student, teacher, labels, temperature = case_inputs(case)
    shard = student[:, columns].clone().requires_grad_()
    loss = vocab_parallel_jsd_loss(shard, teacher[:, columns], beta=beta, temperature=temperature,
                                   labels=labels, backend=backend)
    return loss.detach(), torch.autograd.grad(loss, shard)[0]


def worker(rank, init_method, results_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=len(WIDTHS),
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {key: shard_loss_and_grad(*key, columns_of(rank)) for key in CASES}
        torch.save(results, f"{results_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def shard_results(tmp_path_factory):
    """``[results of rank r]``, each ``{(case, beta, backend): (loss, grad of the shard)}``."""
    return run_and_load(worker, len(WIDTHS), tmp_path_factory.mktemp("vocab_parallel_jsd"),
                        timeout_seconds=TIMEOUT_SECONDS)


@pytest.mark.parametrize("case, beta, backend", CASES)
def test_the_shards_give_the_whole_vocabulary_jsd(shard_results, case, beta, backend):
    losses = [results[case, beta, backend][0] for results in shard_results]
    assert torch.equal(losses[0], losses[1]), losses
    grad = torch.cat([results[case, beta, backend][1] for results in shard_results], dim=1)
    student, teacher, labels, temperature = case_inputs(case)
    assert_within_the_rule((losses[0], grad), student, teacher, beta=beta,
                           temperature=temperature, labels=labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_a_process_group_it_is_jsd_loss(backend):
    assert not dist.is_initialized()
    student, teacher, labels, temperature = case_inputs("random-T2")
    got = shard_loss_and_grad("random-T2", 0.3, backend, slice(None))
    s = student.clone().requires_grad_()
    want = jsd_loss(s, teacher, beta=0.3, temperature=temperature, labels=labels,
                    backend=backend)
    torch.testing.assert_close(got[0], want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], torch.autograd.grad(want, s)[0], rtol=1e-6, atol=1e-9)
