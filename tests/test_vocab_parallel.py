"""``vocab_parallel_gkl_loss``: the vocabulary (columns) of the logits sharded across 2 and 4
gloo processes (uneven shards of ``V = 103``). Every process must get the one-process loss of the
whole vocabulary and its shard's columns of the gradient, as ``gkl_loss`` and the float64
reference compute them on the kept rows. In one process (no group) it is ``gkl_loss``; a per-row
offset changes nothing; bad inputs raise before anything runs."""

import datetime
import functools
import zlib
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist

from gkl_kernels import gkl_loss, vocab_parallel
from gkl_kernels.vocab_parallel import vocab_parallel_gkl_loss
from tests.conftest import (HALF_TOLERANCE, PAPER_SETTINGS, loss_and_grads, make_inputs, oracle,
                            relative_error)
from tests.spawned import run_processes

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once

VOCAB = 103
ROWS = 9
SHARD_WIDTHS = {2: (40, 63), 4: (26, 25, 27, 25)}  # per rank, by world size; each sums to VOCAB
IGNORE = -100
TIMEOUT_SECONDS = 120


class Case(NamedTuple):
    source: str  # "teacher", "explicit" or "prior" pair weights
    setting: str  # a PAPER_SETTINGS key
    normalize: str
    symmetric: bool  # GKL (True) or DKL
    adversarial: bool  # the teacher requires grad
    ignored: str  # rows labelled IGNORE: "none" (no labels but the prior's), "some" or "all"
    dtype: torch.dtype = torch.float32


CASES = {
    "teacher-some-ignored": Case("teacher", "default", "weights", True, False, "some"),
    "teacher-T-not-T2": Case("teacher", "cifar_adv", "weights", True, True, "none"),
    "teacher-dkl-batch": Case("teacher", "cifar100_kd", "batch", False, True, "some"),
    "explicit-adversarial": Case("explicit", "imagenet_kd", "weights", True, True, "some"),
    "explicit-dkl-batch": Case("explicit", "default", "batch", False, False, "none"),
    "prior-batch": Case("prior", "cifar100_kd", "batch", True, True, "some"),
    "prior-dkl": Case("prior", "imagenet_kd", "weights", False, True, "none"),
    "prior-all-ignored": Case("prior", "cifar_adv", "weights", True, True, "all"),
    "teacher-all-ignored": Case("teacher", "imagenet_kd", "batch", False, True, "all"),
    "teacher-bf16": Case("teacher", "cifar_adv", "weights", True, True, "some", torch.bfloat16),
    "prior-dkl-bf16": Case("prior", "imagenet_kd", "weights", False, True, "some",
                           torch.bfloat16),
}

# (loss, gradient) bounds of ``relative_error`` against gkl_loss and against the float64 reference.
# float32: float32 arithmetic on both sides. bfloat16 inputs: float32 arithmetic, then each side
# rounds the gradient to bfloat16 once (2**-8 of the largest value from the exact one, so up to a
# whole unit, 2**-7, between two such roundings).
TOLERANCES = {
    torch.float32: dict(one_process=(1e-5, 1e-5), reference=(1e-5, 1e-5)),
    torch.bfloat16: dict(one_process=(1e-5, 2.0**-7),
                         reference=(HALF_TOLERANCE[torch.bfloat16]["loss"],
                                    HALF_TOLERANCE[torch.bfloat16]["grad"])),
}


def options_of(case):
    return dict(PAPER_SETTINGS[case.setting], normalize=case.normalize, symmetric=case.symmetric)


def case_inputs(name):
    """The whole vocabulary's ``student, teacher`` ``(N, V)``, ``labels`` ``(N,)`` (or None) and
    weights (``{"weights": (N, V)}``, ``{"class_prior": (V, V)}`` or ``{}``), the same in every
    process: drawn from a generator seeded by the case's name."""
    case = CASES[name]
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    student, teacher, weights = make_inputs(ROWS, VOCAB, case.source, generator, dtype=case.dtype)
    weights.pop("weights_kind", None)
    labels = weights.pop("labels", None)
    if labels is None and case.ignored != "none":
        labels = torch.randint(0, VOCAB, (ROWS,), generator=generator)
    if case.ignored == "some":
        labels[torch.randperm(ROWS, generator=generator)[:ROWS // 3]] = IGNORE
    elif case.ignored == "all":
        labels.fill_(IGNORE)
    return student, teacher, labels, weights


def shard_columns(world_size, rank):
    widths = SHARD_WIDTHS[world_size]
    start = sum(widths[:rank])
    return slice(start, start + widths[rank])


def sharded_loss_and_grads(name, columns, process_group=None):
    """This process's loss and the gradients of its student and teacher shards (None when the
    teacher needs none); the whole vocabulary when ``columns`` is ``slice(None)``."""
    case = CASES[name]
    student, teacher, labels, weights = case_inputs(name)
    student = student[:, columns].clone().requires_grad_()
    teacher = teacher[:, columns].clone().requires_grad_(case.adversarial)
    shard_weights = {("class_prior_shard" if key == "class_prior" else key): value[:, columns]
                     for key, value in weights.items()}
    loss = vocab_parallel_gkl_loss(student, teacher, labels=labels, **shard_weights,
                                   process_group=process_group, backend="torch",
                                   **options_of(case))
    loss.backward()
    return loss.detach(), student.grad, teacher.grad


def worker(rank, init_method, world_size, results_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        columns = shard_columns(world_size, rank)
        results = {name: sharded_loss_and_grads(name, columns) for name in CASES}
        # new_group is collective: every process makes every one-process group, keeps its own
        alone = [dist.new_group([member]) for member in range(world_size)][rank]
        results.update({("alone", name): sharded_loss_and_grads(name, slice(None), alone)
                        for name in CASES})
        torch.save(results, f"{results_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(SHARD_WIDTHS))
def shard_results(request, tmp_path_factory):
    """``(world_size, [results of rank r])``: every case with the vocabulary shared by the
    default group (key: the case's name), and whole in a group of this process alone (key:
    ``("alone", name)``)."""
    world_size = request.param
    directory = tmp_path_factory.mktemp(f"vocab_parallel_{world_size}")
    run_processes(worker, world_size, (world_size, str(directory)), TIMEOUT_SECONDS)
    return world_size, [torch.load(directory / f"rank{rank}.pt") for rank in range(world_size)]


def _on_all_rows(loss_and_grads_of_kept_rows, keep):
    """``(loss, grad_student, grad_teacher)`` of the kept rows with zero gradient rows put back
    for the ignored ones: ``(N, V)`` gradients."""
    loss, *grads = loss_and_grads_of_kept_rows
    full = []
    for grad in grads:
        whole = grad.new_zeros(ROWS, VOCAB)
        whole[keep] = grad
        full.append(whole)
    return loss, *full


@functools.cache
def expected_results(name):
    """``{"one_process": gkl_loss's, "reference": float64 reference's}`` loss and ``(N, V)``
    gradients of the kept rows (zero on ignored rows; all ignored: loss 0, zero gradients)."""
    case = CASES[name]
    student, teacher, labels, weights = case_inputs(name)
    keep = torch.ones(ROWS, dtype=torch.bool) if labels is None else labels != IGNORE
    if not keep.any():
        zeros = (torch.tensor(0.0), torch.zeros(ROWS, VOCAB), torch.zeros(ROWS, VOCAB))
        return dict(one_process=zeros, reference=zeros)
    kept = {key: value[keep] if key == "weights" else value for key, value in weights.items()}
    if case.source == "prior":
        kept["labels"] = labels[keep]
    options = dict(kept, **options_of(case))
    one_process = loss_and_grads(gkl_loss, student[keep], teacher[keep], backend="torch",
                                 **options)
    reference = oracle(student[keep], teacher[keep], **options)
    return dict(one_process=_on_all_rows(one_process, keep),
                reference=_on_all_rows(reference, keep))


def assert_matches_expected(name, result, columns):
    """``result = (loss, grad_student, grad_teacher)`` of the shard ``columns`` within
    ``TOLERANCES`` of both expected results."""
    case = CASES[name]
    loss, grad_student, grad_teacher = result
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad_student.dtype == case.dtype
    assert (grad_teacher is not None) == case.adversarial
    for kind, expected in expected_results(name).items():
        loss_bound, grad_bound = TOLERANCES[case.dtype][kind]
        pairs = [("loss", loss, expected[0], loss_bound),
                 ("grad_student", grad_student, expected[1][:, columns], grad_bound)]
        if case.adversarial:
            assert grad_teacher.dtype == case.dtype
            pairs.append(("grad_teacher", grad_teacher, expected[2][:, columns], grad_bound))
        for what, actual, wanted, bound in pairs:
            err = relative_error(actual, wanted)
            assert err <= bound, f"{kind} {what}: relative error {err:.2e} > {bound:.1e}"


@pytest.mark.parametrize("name", CASES)
def test_every_process_gets_the_whole_vocabulary_loss_and_its_shard_gradient(shard_results,
                                                                            name):
    world_size, results = shard_results
    losses = [rank_results[name][0] for rank_results in results]
    assert all(torch.equal(loss, losses[0]) for loss in losses), losses
    for rank, rank_results in enumerate(results):
        assert_matches_expected(name, rank_results[name], shard_columns(world_size, rank))


@pytest.mark.parametrize("name", CASES)
def test_a_group_of_one_process_is_gkl_loss(shard_results, name):
    for rank_results in shard_results[1]:
        assert_matches_expected(name, rank_results["alone", name], slice(None))


@pytest.mark.parametrize("name", CASES)
def test_without_a_process_group_it_is_gkl_loss(name):
    assert not dist.is_initialized()
    assert_matches_expected(name, sharded_loss_and_grads(name, slice(None)), slice(None))


def _multiples_of_1024th(generator, scale=3.0):
    """``(ROWS, VOCAB)`` logits on a grid of ``2**-10``: adding ``1e4`` to them is exact in
    float32, so that an offset test sees no rounding of its inputs."""
    return torch.round(scale * torch.randn(ROWS, VOCAB, generator=generator) * 1024) / 1024


@pytest.mark.parametrize("source", ["teacher", "explicit"])
def test_a_row_offset_changes_nothing(generator, source):
    student, teacher = _multiples_of_1024th(generator), _multiples_of_1024th(generator)
    weights = {"weights": torch.rand(ROWS, VOCAB, generator=generator)} \
        if source == "explicit" else {}
    options = dict(PAPER_SETTINGS["cifar_adv"], **weights)
    plain = loss_and_grads(vocab_parallel_gkl_loss, student, teacher, **options)
    shifted_student, shifted_teacher = student.clone(), teacher.clone()
    shifted_student[2] += 1e4
    shifted_teacher[5] -= 1e4
    shifted = loss_and_grads(vocab_parallel_gkl_loss, shifted_student, shifted_teacher, **options)
    for what, actual, expected in zip(("loss", "grad_student", "grad_teacher"), shifted, plain):
        err = relative_error(actual, expected)
        assert err <= 1e-6, f"{what}: relative error {err:.2e}"


def test_one_far_student_logit_keeps_the_weighted_variance_exact(generator):
    """One student logit ``1e4`` above its row (with zero weight) moves every other ``d`` of the
    row by ``1e4`` after the row maxima are subtracted: the one-pass variance would lose every
    digit, a plain two-pass one the gradient's last four."""
    student, teacher = _multiples_of_1024th(generator), _multiples_of_1024th(generator)
    weights = torch.rand(ROWS, VOCAB, generator=generator)
    student[3, 17] += 1e4
    weights[3, 17] = 0.0
    options = dict(weights=weights, ce_weight=0.0, mse_weight=2.0)
    actual = loss_and_grads(vocab_parallel_gkl_loss, student, teacher, **options)
    expected = oracle(student, teacher, **options)
    for what, value, wanted in zip(("loss", "grad_student", "grad_teacher"), actual, expected):
        err = relative_error(value, wanted)
        assert err <= 1e-6, f"{what}: relative error {err:.2e}"


def test_ignore_index_may_be_a_class_and_ignored_rows_need_no_prior_row(generator):
    student, teacher, weights = make_inputs(ROWS, VOCAB, "prior", generator)
    prior = weights["class_prior"].clone()
    labels = torch.randint(0, VOCAB - 2, (ROWS,), generator=generator, dtype=torch.int32)
    labels[[1, 4, 6]] = VOCAB - 1  # ignored: their prior row may be anything
    prior[VOCAB - 1] = -1.0
    options = dict(PAPER_SETTINGS["imagenet_kd"])
    actual = loss_and_grads(vocab_parallel_gkl_loss, student, teacher, labels=labels,
                            class_prior_shard=prior, ignore_index=VOCAB - 1, **options)
    keep = labels != VOCAB - 1
    expected = loss_and_grads(gkl_loss, student[keep], teacher[keep], labels=labels[keep],
                              class_prior=prior, backend="torch", **options)
    assert relative_error(actual[0], expected[0]) <= 1e-5
    for actual_grad, expected_grad in zip(actual[1:], expected[1:]):
        assert not actual_grad[~keep].any()
        assert relative_error(actual_grad[keep], expected_grad) <= 1e-5


# --------------------------------------------------------------------------- input checks

N, WIDTH = 4, 6  # the valid inputs of every check case; without a group V = WIDTH


@pytest.fixture
def nothing_runs(monkeypatch):
    """The computation fails the test if it starts: validation must reject the input first."""
    class Forbidden:
        @staticmethod
        def apply(*args):
            pytest.fail("the loss was computed although the input is invalid")
    monkeypatch.setattr(vocab_parallel, "RowLoss", Forbidden)


def _valid_inputs(generator):
    student = torch.randn(N, WIDTH, generator=generator)
    teacher = torch.randn(N, WIDTH, generator=generator)
    prior = torch.rand(WIDTH, WIDTH, generator=generator) + 0.1
    labels = torch.tensor([0, 5, IGNORE, 2])
    return student, teacher, dict(labels=labels, class_prior_shard=prior / prior.sum(1, True))


def _with_weights(kwargs, weights):
    return dict(kwargs, class_prior_shard=None, weights=weights)


BAD_INPUTS = {  # name: (change the valid (student, teacher, kwargs), error, message)
    "integer student": (lambda s, t, kw: (s.long(), t, kw), TypeError, "student must be float"),
    "1-D teacher": (lambda s, t, kw: (s, t[0], kw), ValueError, "teacher must be 2-D"),
    "narrower teacher": (lambda s, t, kw: (s, t[:, 1:], kw), ValueError,
                         "student and teacher must have the same shape"),
    "weights shape": (lambda s, t, kw: (s, t, _with_weights(kw, torch.rand(N, WIDTH + 1))),
                      ValueError, r"weights must have shape \(4, 6\)"),
    "integer weights": (lambda s, t, kw: (s, t, _with_weights(kw, torch.ones(N, WIDTH).long())),
                        TypeError, "weights must have dtype"),
    "negative weights": (lambda s, t, kw: (s, t, _with_weights(kw, -torch.ones(N, WIDTH))),
                         ValueError, "weights must be non-negative"),
    "NaN weights": (lambda s, t, kw: (s, t, _with_weights(kw, torch.full((N, WIDTH), torch.nan))),
                    ValueError, "weights must be finite"),
    "weights and prior": (lambda s, t, kw: (s, t, dict(kw, weights=torch.rand(N, WIDTH))),
                          ValueError, "either weights or class_prior_shard"),
    "prior without labels": (lambda s, t, kw: (s, t, dict(kw, labels=None)), ValueError,
                             "class_prior_shard needs labels"),
    "prior columns": (lambda s, t, kw: (s, t, dict(kw, class_prior_shard=torch.rand(6, 5))),
                      ValueError, r"class_prior_shard must have shape \(6, 6\)"),
    "prior rows": (lambda s, t, kw: (s, t, dict(kw, class_prior_shard=torch.rand(7, 6))),
                   ValueError, "class_prior_shard must have V rows"),
    "1-D prior": (lambda s, t, kw: (s, t, dict(kw, class_prior_shard=torch.rand(6))),
                  ValueError, "class_prior_shard must be 2-D"),
    "negative prior row of a label": (
        lambda s, t, kw: (s, t, dict(kw, class_prior_shard=kw["class_prior_shard"] * torch.tensor(
            [1.0, 1.0, 1.0, 1.0, 1.0, -1.0])[:, None])),
        ValueError, "class_prior_shard must be non-negative"),
    "labels shape": (lambda s, t, kw: (s, t, dict(kw, labels=kw["labels"][:3])), ValueError,
                     r"labels must have shape \(4,\)"),
    "float labels": (lambda s, t, kw: (s, t, dict(kw, labels=kw["labels"].float())), TypeError,
                     "labels must be class indices"),
    "label V": (lambda s, t, kw: (s, t, dict(kw, labels=torch.tensor([0, 6, 1, 2]))), ValueError,
                r"labels must lie in \[0, 6\) or equal ignore_index=-100, found 6"),
    "label -1": (lambda s, t, kw: (s, t, dict(kw, labels=torch.tensor([0, -1, 1, 2]))),
                 ValueError, r"labels must lie in \[0, 6\) or equal ignore_index=-100, found -1"),
    "float ignore_index": (lambda s, t, kw: (s, t, dict(kw, ignore_index=-100.0)), TypeError,
                           "ignore_index must be an int"),
    "zero temperature": (lambda s, t, kw: (s, t, dict(kw, temperature=0.0)), ValueError,
                         "temperature"),
    "negative gamma": (lambda s, t, kw: (s, t, dict(kw, gamma=-0.5)), ValueError, "gamma"),
    "normalize": (lambda s, t, kw: (s, t, dict(kw, normalize="mean")), ValueError, "normalize"),
    "symmetric": (lambda s, t, kw: (s, t, dict(kw, symmetric=1)), TypeError, "symmetric"),
    "check_values": (lambda s, t, kw: (s, t, dict(kw, check_values="yes")), TypeError,
                     "check_values"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise_before_anything_runs(generator, nothing_runs, name):
    change, error, message = BAD_INPUTS[name]
    student, teacher, kwargs = change(*_valid_inputs(generator))
    with pytest.raises(error, match=message):
        vocab_parallel_gkl_loss(student, teacher, **kwargs)


def test_the_valid_inputs_of_the_checks_are_accepted(generator):
    student, teacher, kwargs = _valid_inputs(generator)
    assert torch.isfinite(vocab_parallel_gkl_loss(student, teacher, **kwargs))
    weights = _with_weights(kwargs, torch.rand(N, WIDTH, generator=generator))
    assert torch.isfinite(vocab_parallel_gkl_loss(student, teacher, **weights))
