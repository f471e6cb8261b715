"""``gkl_loss`` under ``torch.distributed``: two gloo processes on CPU, each with its own part of
one batch. With ``sync_normalizer=True`` the loss and the gradients of every process equal the
one-process loss over the concatenated batch and its rows of the gradient; by default each
process normalises by its own batch (the authors' multi-GPU semantics)."""

import pytest
import torch
import torch.distributed as dist

from gkl_kernels import GKLLoss, gkl_loss
from tests.conftest import PAPER_SETTINGS, make_inputs
from tests.spawned import run_and_load

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once

WORLD_SIZE = 2
ROWS_PER_RANK = (5, 3)  # uneven on purpose: the concatenated mean is not the mean of means
CLASSES = 11
# (weight source, normalize, adversarial)
CONFIGS = [("prior", "weights", False), ("teacher", "weights", True), ("explicit", "batch", False)]
TIMEOUT_SECONDS = 120


def batch_of(source, adversarial):
    """The whole batch (both ranks' rows), the same in every process: a fixed seed."""
    generator = torch.Generator().manual_seed(1234 + len(source))
    student, teacher, kwargs = make_inputs(sum(ROWS_PER_RANK), CLASSES, source, generator)
    return student.requires_grad_(), teacher.requires_grad_(adversarial), kwargs


def rows_of(rank):
    start = sum(ROWS_PER_RANK[:rank])
    return slice(start, start + ROWS_PER_RANK[rank])


def local_part(tensors, kwargs, rank):
    """This rank's rows of the logits (fresh leaves) and of the per-row options."""
    rows = rows_of(rank)
    student, teacher = (x.detach()[rows].clone().requires_grad_(x.requires_grad) for x in tensors)
    local_kwargs = {k: v[rows] if k in ("labels", "weights") else v for k, v in kwargs.items()}
    return student, teacher, local_kwargs


def losses_and_grads(student, teacher, kwargs, normalize, **options):
    settings = dict(PAPER_SETTINGS["imagenet_kd"], normalize=normalize, backend="torch")
    loss = gkl_loss(student, teacher, **settings, **kwargs, **options)
    inputs = [x for x in (student, teacher) if x.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, inputs)


def worker(rank, init_method, results_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for source, normalize, adversarial in CONFIGS:
            student, teacher, kwargs = batch_of(source, adversarial)
            part = local_part((student, teacher), kwargs, rank)
            results[source, "sync"] = losses_and_grads(*part, normalize, sync_normalizer=True)
            results[source, "own"] = losses_and_grads(*part, normalize)
            module = GKLLoss(**PAPER_SETTINGS["imagenet_kd"], normalize=normalize,
                             backend="torch", sync_normalizer=True)
            results[source, "module"] = module(part[0], part[1], **part[2]).detach()
        torch.save(results, f"{results_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_and_load(worker, WORLD_SIZE, tmp_path_factory.mktemp("distributed"),
                        timeout_seconds=TIMEOUT_SECONDS)


@pytest.mark.parametrize("source, normalize, adversarial", CONFIGS)
def test_sync_normalizer_gives_the_one_process_loss_and_gradients(rank_results, source,
                                                                  normalize, adversarial):
    student, teacher, kwargs = batch_of(source, adversarial)
    loss, grads = losses_and_grads(student, teacher, kwargs, normalize)
    for rank, results in enumerate(rank_results):
        rank_loss, rank_grads = results[source, "sync"]
        torch.testing.assert_close(rank_loss, loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(results[source, "module"], loss, rtol=1e-6, atol=1e-7)
        assert len(rank_grads) == len(grads) == (2 if adversarial else 1)
        for rank_grad, grad in zip(rank_grads, grads):
            torch.testing.assert_close(rank_grad, grad[rows_of(rank)], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("source, normalize, adversarial", CONFIGS)
def test_default_normalises_by_each_process_batch(rank_results, source, normalize,
                                                  adversarial):
    student, teacher, kwargs = batch_of(source, adversarial)
    whole, _ = losses_and_grads(student, teacher, kwargs, normalize)
    for rank, results in enumerate(rank_results):
        own_loss, own_grads = results[source, "own"]
        expected = losses_and_grads(*local_part((student, teacher), kwargs, rank), normalize)
        torch.testing.assert_close(own_loss, expected[0], rtol=1e-6, atol=1e-7)
        for own_grad, grad in zip(own_grads, expected[1]):
            torch.testing.assert_close(own_grad, grad, rtol=1e-6, atol=1e-8)
        # the per-process loss is not the concatenated batch's: the opt-in changes something
        assert abs(float(own_loss - whole)) > 1e-4 * abs(float(whole))


def test_sync_normalizer_without_a_process_group_is_the_plain_loss(generator):
    student, teacher, kwargs = make_inputs(6, CLASSES, "prior", generator)
    student.requires_grad_()
    plain = losses_and_grads(student, teacher, kwargs, "weights")
    synced = losses_and_grads(student, teacher, kwargs, "weights", sync_normalizer=True)
    torch.testing.assert_close(synced[0], plain[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(synced[1][0], plain[1][0], rtol=1e-6, atol=0)


def test_sync_normalizer_must_be_a_bool():
    student = torch.randn(2, 3)
    with pytest.raises(TypeError, match="sync_normalizer"):
        gkl_loss(student, student, sync_normalizer="yes")
