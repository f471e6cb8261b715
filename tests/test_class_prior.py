"""``ClassPrior``: the class-wise prior ``P`` against a float64 hand computation over epochs
(unseen classes, momentum, ``T2``, half-precision logits), its state dict, its input checks, its
use in ``gkl_loss`` and its all-reduce across two gloo processes."""

import datetime
import os

import pytest
import torch
from torch import distributed

from gkl_kernels import ClassPrior, gkl_loss, validation
from tests.spawned import run_processes

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once

C = 7
WORLD_SIZE = 2


def make_batches(generator, sizes, classes, dtype=torch.float32):
    """Batches ``(logits (B, C), labels (B,))``: random logits, labels drawn from ``classes``
    (int64 and int32 in turn)."""
    pool = torch.tensor(classes)
    batches = []
    for index, size in enumerate(sizes):
        logits = (3.0 * torch.randn(size, C, generator=generator)).to(dtype)
        labels = pool[torch.randint(len(classes), (size,), generator=generator)]
        batches.append((logits, labels.to(torch.int32 if index % 2 else torch.int64)))
    return batches


def hand_prior(old, batches, weight_temperature, momentum=None):
    """The next epoch's prior, in float64 with plain loops: each seen row the mean of
    ``softmax(t / T2)`` over its samples (blended with ``old`` under momentum), others ``old``."""
    sums = torch.zeros(C, C, dtype=torch.float64)
    counts = [0] * C
    for logits, labels in batches:
        probs = torch.softmax(logits.double() / weight_temperature, dim=1)
        for row, label in zip(probs, labels.tolist()):
            sums[label] += row
            counts[label] += 1
    new = old.double().clone()
    for c in range(C):
        if counts[c]:
            mean = sums[c] / counts[c]
            new[c] = mean if momentum is None else momentum * old[c] + (1 - momentum) * mean
    return new


def feed(prior, batches):
    for logits, labels in batches:
        prior.update(logits, labels)


def assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def test_initial_prior_is_uniform():
    prior = ClassPrior(C)
    matrix = prior.matrix()
    assert matrix.dtype == torch.float32 and matrix.shape == (C, C)
    assert torch.equal(matrix, torch.full((C, C), 1.0 / C))
    assert prior.epochs == 0
    assert prior.matrix(device="cpu") is matrix
    assert torch.equal(prior.end_epoch(), torch.full((C, C), 1.0 / C))  # an epoch without data
    assert prior.epochs == 1


@pytest.mark.parametrize("weight_temperature, momentum, dtype", [
    (1.0, None, torch.float32),
    (2.5, None, torch.float16),
    (1.0, 0.5, torch.bfloat16),
    (4.0, 0.8, torch.float32),
    (0.5, 0.0, torch.float16),
])
def test_epochs_match_hand_computation(generator, weight_temperature, momentum, dtype):
    prior = ClassPrior(C, weight_temperature=weight_temperature, momentum=momentum)
    expected = torch.full((C, C), 1.0 / C, dtype=torch.float64)
    # epoch 0 never sees classes 5, 6 (they keep 1/C); epoch 1 never sees 0, 1 (they keep epoch 0's)
    for epoch, classes in enumerate([[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]]):
        batches = make_batches(generator, [6, 1, 9, 4], classes, dtype)
        feed(prior, batches)
        previous = prior.matrix().clone()
        matrix = prior.end_epoch()
        expected = hand_prior(expected, batches, weight_temperature, momentum)
        assert prior.epochs == epoch + 1
        assert matrix is prior.matrix() and matrix.dtype == torch.float32
        torch.testing.assert_close(matrix.double(), expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(matrix.sum(1), torch.ones(C), rtol=0, atol=1e-6)
        unseen = sorted(set(range(C)) - set(torch.cat([y for _, y in batches]).tolist()))
        assert unseen and torch.equal(matrix[unseen], previous[unseen])
        state = prior.state_dict()
        assert not state["sums"].any() and not state["counts"].any()  # reset for the next epoch


def test_update_without_rows_is_a_no_op(generator):
    prior = ClassPrior(C, momentum=0.5)
    feed(prior, make_batches(generator, [5], [0, 1, 2]))
    before = prior.state_dict()
    prior.update(torch.empty(0, C), torch.empty(0, dtype=torch.int64))
    assert_same_state(prior.state_dict(), before)


def test_prior_passes_into_gkl_loss(generator):
    batches = make_batches(generator, [8, 8], [0, 1, 2, 3, 4, 5])
    prior = ClassPrior(C, weight_temperature=2.0)
    feed(prior, batches)
    prior.end_epoch()
    expected = hand_prior(torch.full((C, C), 1.0 / C), batches, 2.0).float()
    student = 3.0 * torch.randn(8, C, generator=generator)
    teacher = 3.0 * torch.randn(8, C, generator=generator)
    labels = torch.randint(0, C, (8,), generator=generator)
    options = dict(labels=labels, gamma=0.6, backend="torch")
    loss = gkl_loss(student, teacher, class_prior=prior.matrix(), **options)
    torch.testing.assert_close(loss, gkl_loss(student, teacher, class_prior=expected, **options),
                               rtol=1e-5, atol=0)
    uniform = gkl_loss(student, teacher, class_prior=torch.full((C, C), 1.0 / C), **options)
    assert abs(loss - uniform) > 1e-3 * abs(uniform)  # the prior matters to this loss


@pytest.mark.parametrize("via_file", [False, True])
def test_state_dict_round_trip_continues_identically(generator, tmp_path, via_file):
    original = ClassPrior(C, weight_temperature=3.0, momentum=0.25)
    feed(original, make_batches(generator, [7, 5], [0, 1, 2, 3]))
    original.end_epoch()
    feed(original, make_batches(generator, [6, 3], [1, 2, 3, 4, 5]))  # a partial epoch
    state = original.state_dict()
    if via_file:
        torch.save(state, tmp_path / "prior.pt")
        state = torch.load(tmp_path / "prior.pt")
    resumed = ClassPrior(C)  # settings come from the state
    resumed.load_state_dict(state)
    assert_same_state(resumed.state_dict(), original.state_dict())
    assert (resumed.weight_temperature, resumed.momentum, resumed.epochs) == (3.0, 0.25, 1)
    rest = make_batches(generator, [4, 8], [2, 3, 4, 5])
    for prior in (original, resumed):
        feed(prior, rest)
        prior.end_epoch()
    assert resumed.epochs == original.epochs == 2
    assert torch.equal(resumed.matrix(), original.matrix())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_classes=0), ValueError, "num_classes"),
    (dict(num_classes=-3), ValueError, "num_classes"),
    (dict(num_classes=7.0), TypeError, "num_classes"),
    (dict(num_classes=True), TypeError, "num_classes"),
    (dict(weight_temperature=0.0), ValueError, "weight_temperature"),
    (dict(weight_temperature=-1.0), ValueError, "weight_temperature"),
    (dict(weight_temperature=float("nan")), ValueError, "weight_temperature"),
    (dict(weight_temperature=float("inf")), ValueError, "weight_temperature"),
    (dict(weight_temperature="1"), TypeError, "weight_temperature"),
    (dict(weight_temperature=1e-39), ValueError, "weight_temperature must be >= 1 / float32 max"),
    (dict(weight_temperature=5e-324), ValueError, "weight_temperature must be >= 1 / float32 max"),
    (dict(weight_temperature=1e-40), ValueError, "weight_temperature must be >= 1 / float32 max"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(momentum=float("nan")), ValueError, "momentum"),
    (dict(momentum="0.5"), TypeError, "momentum must be a number"),
    (dict(device="bogus"), ValueError, "device must name a device, got 'bogus'"),
    (dict(device="cuda:x"), ValueError, "device must name a device, got 'cuda:x'"),
    (dict(device=1.5), TypeError, "device must be None, a str, an int or a torch.device, got "
                                  "float"),
    (dict(device=True), TypeError, "device must be None, a str, an int or a torch.device, got "
                                   "bool"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ClassPrior(**{"num_classes": C, **kwargs})


def _poisoned(value, dtype=torch.float32):
    """A valid-looking ``(C, C)`` state tensor with one bad entry."""
    x = torch.full((C, C), 1.0 / C, dtype=dtype)
    x[3, 4] = value
    return x


def _bad_batch(case, generator):
    logits = torch.randn(4, C, generator=generator)
    labels = torch.tensor([0, 3, 6, 2])
    if case == "negative label":
        labels[1] = -1
    elif case == "label C":
        labels[2] = C
    elif case == "wide logits":
        logits = torch.randn(4, C + 1, generator=generator)
    elif case == "1-D logits":
        logits = logits[0]
    elif case == "integer logits":
        logits = logits.long()
    elif case == "NaN logits":
        logits[1, 2] = float("nan")
    elif case == "inf logits":
        logits[3, 0] = float("inf")
    elif case == "logits on meta":
        logits = logits.to("meta")
    elif case == "short labels":
        labels = labels[:3]
    elif case == "float labels":
        labels = labels.float()
    elif case == "2-D labels":
        labels = labels[:, None]
    elif case == "labels on meta":
        labels = labels.to("meta")
    elif case == "logits None":
        logits = None
    elif case == "logits list":
        logits = logits.tolist()
    elif case == "labels None":
        labels = None
    elif case == "long labels":
        labels = torch.cat([labels, labels[:1]])
    return logits, labels


@pytest.mark.parametrize("case, error, match", [
    ("negative label", ValueError, r"labels must lie in \[0, 7\)"),
    ("label C", ValueError, r"labels must lie in \[0, 7\)"),
    ("wide logits", ValueError, r"teacher_logits must have shape \(B, num_classes=7\)"),
    ("1-D logits", ValueError, r"teacher_logits must have shape \(B, num_classes=7\)"),
    ("integer logits", TypeError, "teacher_logits must be float32"),
    ("NaN logits", ValueError, "teacher_logits must be finite"),
    ("inf logits", ValueError, "teacher_logits must be finite"),
    ("logits on meta", ValueError, "teacher_logits must be on the prior's device cpu"),
    ("short labels", ValueError, r"labels must have shape \(4,\)"),
    ("float labels", TypeError, "labels must be class indices"),
    ("2-D labels", ValueError, r"labels must have shape \(4,\)"),
    ("labels on meta", ValueError, "labels must be on cpu"),
    ("logits None", TypeError, "teacher_logits must be a torch.Tensor, got NoneType"),
    ("logits list", TypeError, "teacher_logits must be a torch.Tensor, got list"),
    ("labels None", TypeError, "labels must be a torch.Tensor, got NoneType"),
    ("long labels", ValueError, r"labels must have shape \(4,\), got \(5,\)"),
])
def test_bad_update_inputs_leave_the_state_alone(generator, case, error, match):
    prior = ClassPrior(C)
    feed(prior, make_batches(generator, [5], [0, 1, 2]))
    before = prior.state_dict()
    logits, labels = _bad_batch(case, generator)
    with pytest.raises(error, match=match):
        prior.update(logits, labels)
    assert_same_state(prior.state_dict(), before)


def test_matrix_on_another_device_is_refused():
    prior = ClassPrior(C)
    with pytest.raises(ValueError, match="mismatched device.*cpu") as info:
        prior.matrix(device="meta")
    assert "meta" in str(info.value)
    with pytest.raises(ValueError, match="device must name a device, got 'bogus'"):
        prior.matrix(device="bogus")
    with pytest.raises(TypeError, match="device must be None, a str, an int or a torch.device"):
        prior.matrix(device=[0])
    assert prior.matrix(device="cpu") is prior.matrix(device=torch.device("cpu"))


@pytest.mark.parametrize("state", [None, [("num_classes", C)], "state", 7],
                         ids=["None", "list", "str", "int"])
def test_state_that_is_not_a_mapping_is_refused(state):
    """It used to be "argument of type 'NoneType' is not iterable" (or a KeyError)."""
    prior = ClassPrior(C)
    with pytest.raises(TypeError, match=rf"state must be a mapping \(a state_dict\(\)\), got "
                                        rf"{type(state).__name__}"):
        prior.load_state_dict(state)


@pytest.mark.parametrize("key, value, match", [
    ("num_classes", C + 1, "num_classes"),
    ("prior", torch.zeros(C, C + 1), r"state\['prior'\]"),
    ("sums", torch.zeros(C + 1, C), r"state\['sums'\]"),
    ("counts", torch.zeros(C, C, dtype=torch.int64), r"state\['counts'\]"),
    ("counts", [0] * C, r"state\['counts'\]"),
    ("epochs", -1, r"state\['epochs'\]"),
    ("momentum", 1.5, r"state\['momentum'\] must be None or in \[0, 1\), got 1.5"),
    ("momentum", float("nan"), r"state\['momentum'\] must be finite"),
    ("weight_temperature", 0.0, r"state\['weight_temperature'\] must be finite and > 0"),
    ("num_classes", "7", r"state\['num_classes'\] = '7' does not match num_classes = 7"),
    ("epochs", 1.0, r"state\['epochs'\] must be an int >= 0, got 1.0"),
    ("sums", None, "missing the keys.*sums"),
    ("weight_temperature", 1e-39, r"state\['weight_temperature'\] must be >= 1 / float32 "
                                  r"max"),
    ("prior", _poisoned(float("nan")), r"state\['prior'\] must be finite and >= 0, found inf"),
    ("prior", _poisoned(float("inf")), r"state\['prior'\] must be finite and >= 0, found inf"),
    ("prior", _poisoned(-0.25), r"state\['prior'\] must be finite and >= 0, found entries down to "
                                r"-0.25"),
    ("prior", _poisoned(1e300, torch.float64), r"state\['prior'\] must be finite"),  # float32 inf
    ("prior", torch.ones(C, C, dtype=torch.int64), r"state\['prior'\] must be a floating-point"),
    ("prior", torch.empty(C, C, device="meta"), r"state\['prior'\] is on the meta device"),
    ("sums", _poisoned(float("nan")), r"state\['sums'\] must be finite"),
    ("sums", _poisoned(float("-inf")), r"state\['sums'\] must be finite"),
    ("sums", _poisoned(-1.0), r"state\['sums'\] must be finite and >= 0, found entries down"),
    ("counts", torch.tensor([3, 0, -1, 0, 2, 0, 0]), r"state\['counts'\] must be >= 0, found -1"),
    ("counts", torch.tensor([3, 0, -1, 0, 2, 0, 0], dtype=torch.int32),
     r"state\['counts'\] must be >= 0"),
    ("counts", torch.ones(C), r"state\['counts'\] must have an integer dtype, got torch.float32"),
    ("counts", torch.ones(C, dtype=torch.bool), r"state\['counts'\] must have an integer dtype"),
])
def test_mismatched_state_dict_is_refused(generator, key, value, match):
    prior = ClassPrior(C, momentum=0.5)
    feed(prior, make_batches(generator, [5], [0, 1, 2]))
    before = prior.state_dict()
    state = prior.state_dict()
    state[key] = value
    if value is None:
        del state[key]
    fresh = ClassPrior(C)
    fresh_before = fresh.state_dict()
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert_same_state(fresh.state_dict(), fresh_before)
    assert_same_state(prior.state_dict(), before)


@pytest.mark.parametrize("key, value", [("weight_temperature", "1"), ("momentum", "0.5"),
                                        ("weight_temperature", None)])
def test_state_settings_of_a_wrong_type_are_refused(generator, key, value):
    prior = ClassPrior(C)
    state = prior.state_dict()
    state[key] = value
    with pytest.raises(TypeError, match=rf"state\['{key}'\] must be a number"):
        ClassPrior(C).load_state_dict(state)


def test_state_dict_in_other_dtypes_is_cast(generator):
    """float64 ``prior``/``sums`` and int32 ``counts`` load (cast to float32 and int64)."""
    prior = ClassPrior(C, momentum=0.5)
    feed(prior, make_batches(generator, [5], [0, 1, 2]))
    state = prior.state_dict()
    state.update(prior=state["prior"].double(), sums=state["sums"].double(),
                 counts=state["counts"].int())
    fresh = ClassPrior(C)
    fresh.load_state_dict(state)
    assert_same_state(fresh.state_dict(), prior.state_dict())


@pytest.fixture
def device_side(monkeypatch):
    """Value checks take their CUDA branch on CPU tensors: ``torch._assert_async``, which on CPU
    raises a ``RuntimeError`` at once."""
    monkeypatch.setattr(validation, "asserts_on_device", lambda device: True)


def _host_syncs(fn):
    """How many device-to-host reads (``aten._local_scalar_dense``) ``fn()`` makes."""
    from gkl_kernels.testing.dispatch import DispatchCounter
    with DispatchCounter() as counter:
        fn()
    return counter.host_syncs


def test_update_does_not_sync_on_the_device(generator, device_side):
    prior = ClassPrior(C)
    logits, labels = make_batches(generator, [6], [0, 1, 2, 3])[0]
    assert _host_syncs(lambda: prior.update(logits, labels)) == 0
    assert prior.state_dict()["counts"].sum() == 6
    before = prior.state_dict()
    prior.update(torch.empty(0, C), torch.empty(0, dtype=torch.int64))  # still a no-op
    assert_same_state(prior.state_dict(), before)


def test_update_syncs_on_the_host(generator):
    """The CPU branch reads its checks back (so the test above can fail)."""
    prior = ClassPrior(C)
    logits, labels = make_batches(generator, [6], [0, 1, 2, 3])[0]
    assert _host_syncs(lambda: prior.update(logits, labels)) >= 1


@pytest.mark.parametrize("case, match", [
    ("negative label", r"labels must lie in \[0, 7\)"),
    ("label C", r"labels must lie in \[0, 7\)"),
    ("NaN logits", "teacher_logits must be finite"),
    ("inf logits", "teacher_logits must be finite"),
])
def test_bad_update_values_are_device_side_assertions(generator, device_side, case, match):
    prior = ClassPrior(C)
    logits, labels = _bad_batch(case, generator)
    with pytest.raises(RuntimeError, match=match) as info:
        prior.update(logits, labels)
    assert not isinstance(info.value, ValueError)
    assert not prior.state_dict()["counts"].any()


def test_bad_state_values_are_value_errors_also_on_the_device(generator, device_side):
    """A resume reads the state back: a ValueError naming the key on every device."""
    state = ClassPrior(C).state_dict()
    state["counts"] = torch.tensor([0, 0, -2, 0, 0, 0, 0])
    with pytest.raises(ValueError, match=r"state\['counts'\]"):
        ClassPrior(C).load_state_dict(state)


def test_prior_on_the_meta_device(generator):
    """Shapes without values: updates and epochs run, value checks are skipped."""
    prior = ClassPrior(C, device="meta")
    logits, labels = make_batches(generator, [5], [0, 1, 2])[0]
    prior.update(logits.to("meta"), labels.to("meta"))
    matrix = prior.end_epoch()
    assert matrix.device.type == "meta" and matrix.shape == (C, C)
    prior.load_state_dict(prior.state_dict())
    loss = gkl_loss(torch.empty(5, C, device="meta"), torch.empty(5, C, device="meta"),
                    labels=labels.to("meta"), class_prior=prior.matrix())
    assert loss.device.type == "meta"


def _distributed_worker(rank, init_method, epochs, out_dir):
    """One of ``WORLD_SIZE`` gloo processes: feed this rank's batches of each epoch, save the
    prior after each ``end_epoch``."""
    distributed.init_process_group("gloo", init_method=init_method, rank=rank,
                                   world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        prior = ClassPrior(C, weight_temperature=2.0, momentum=0.5)
        for epoch, per_rank in enumerate(epochs):
            feed(prior, per_rank[rank])
            torch.save(prior.end_epoch().clone(), os.path.join(out_dir, f"{rank}_{epoch}.pt"))
    finally:
        distributed.destroy_process_group()


def test_two_processes_share_the_prior_of_all_their_data(generator, tmp_path):
    # rank 0 sees some classes only, rank 1 more and more batches; one class unseen per epoch
    epochs = [[make_batches(generator, [5, 3], [0, 1, 2]),
               make_batches(generator, [4, 6, 2], [1, 2, 3, 4, 5])],
              [make_batches(generator, [6], [3, 4, 5, 6]),
               make_batches(generator, [2, 7], [0, 2, 4, 6])]]
    run_processes(_distributed_worker, WORLD_SIZE, (epochs, str(tmp_path)), 120)
    single = ClassPrior(C, weight_temperature=2.0, momentum=0.5)
    for epoch, per_rank in enumerate(epochs):
        for batches in per_rank:
            feed(single, batches)
        single.end_epoch()
        rank0, rank1 = (torch.load(tmp_path / f"{rank}_{epoch}.pt") for rank in range(WORLD_SIZE))
        assert torch.equal(rank0, rank1)
        torch.testing.assert_close(rank0, single.matrix(), rtol=1e-6, atol=1e-7)
