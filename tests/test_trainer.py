"""``FusedLinearDistillationLoss`` (the trainer interface) against the unfused computation: the
logits formed, transformed (``logit_scale``, ``final_logit_softcapping``, or each model's own),
the per-token GKL (or JSD) and hard cross-entropy summed and divided by the normaliser; loss,
components and the gradients of the student's hidden states, weight and bias; a larger teacher
vocabulary; bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from gkl_kernels import FusedLinearDistillationLoss, SparseTeacher, gkl_loss, jsd_loss

pytestmark = pytest.mark.entry_point  # the kernels through an entry point: CI runs it once

TOKENS, HIDDEN, VOCABULARY = 12, 8, 17
SOFT_OPTIONS = dict(gamma=0.6, weight_temperature=2.0, mse_weight=1.5, ce_weight=0.7)


def heads(generator, teacher_vocabulary=VOCABULARY, lead=(TOKENS,)):
    def make(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator)

    return (make(*lead, HIDDEN), make(VOCABULARY, HIDDEN, scale=0.7), make(VOCABULARY),
            make(*lead, HIDDEN + 3), make(teacher_vocabulary, HIDDEN + 3, scale=0.7),
            make(teacher_vocabulary))


def labels_for(generator, lead=(TOKENS,)):
    labels = torch.randint(0, VOCABULARY, lead, generator=generator)
    labels.view(-1)[[0, 5]] = -100
    return labels


def unfused(student, teacher, labels, *, hard, soft_weight, temperature, scale=None, cap=None,
            normaliser, teacher_transform=None, soft=None):
    """The loss, soft and hard terms written with the logits (in the heads' dtype): both models'
    logits through ``cap tanh(scale z / cap)``, or the teacher's through ``teacher_transform``
    ``(scale, cap)``; ``soft(s, t, labels)`` the per-row soft losses (default: ``gkl_loss``'s
    with ``SOFT_OPTIONS``)."""
    def transform(z, scale, cap):
        z = z if scale is None else z * scale
        return z if cap is None else cap * torch.tanh(z / cap)

    hidden = student[0].shape[-1]
    s = transform(F.linear(student[0].reshape(-1, hidden), student[1], student[2]), scale, cap)
    vocabulary = student[1].shape[0]
    t = transform(F.linear(teacher[0].reshape(-1, teacher[0].shape[-1]), teacher[1][:vocabulary],
                           teacher[2][:vocabulary]), *(teacher_transform or (scale, cap)))
    flat = None if labels is None else labels.reshape(-1)
    if soft is None:
        def soft(s, t, labels):
            return gkl_loss(s, t, labels=labels, reduction="none", temperature=temperature,
                            backend="torch", **SOFT_OPTIONS)
    soft_sum = soft(s, t, flat).sum()
    hard_sum = s.sum() * 0 if flat is None else F.cross_entropy(s, flat, reduction="sum")
    soft, hard_term = soft_sum / normaliser, hard_sum / normaliser
    return soft_weight * soft + hard * hard_term, soft, hard_term


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("scale, cap", [(None, None), (0.5, None), (None, 2.0), (1.7, 3.0)])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_matches_the_unfused_loss(scale, cap, chunk_size, backend, generator):
    tensors = heads(generator, teacher_vocabulary=VOCABULARY + 3)
    labels = labels_for(generator)
    criterion = FusedLinearDistillationLoss(
        weight_hard_loss=0.3, weight_soft_loss=0.9, temperature=2.0, logit_scale=scale,
        final_logit_softcapping=cap, return_components=True, chunk_size=chunk_size,
        backend=backend, **SOFT_OPTIONS)
    ours = [x.clone().requires_grad_() for x in tensors[:3]]
    loss, soft, hard = criterion(ours[0], ours[1], tensors[3], tensors[4], labels, ours[2],
                                 tensors[5])
    theirs = [x.clone().requires_grad_() for x in tensors[:3]]
    kept = (labels != -100).sum()
    want = unfused(theirs, tensors[3:], labels, hard=0.3, soft_weight=0.9, temperature=2.0,
                   scale=scale, cap=cap, normaliser=kept)
    for name, got, expected in zip(("loss", "soft", "hard"), (loss, soft, hard), want):
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6, msg=name)
    assert not soft.requires_grad and not hard.requires_grad
    loss.backward()
    want[0].backward()
    for name, got, expected in zip(("hidden", "weight", "bias"), ours, theirs):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("divergence", ("gkl", "jsd"))
def test_each_model_has_its_own_logit_transform(divergence, backend, generator):
    """TRL's per-model ``logit_scale`` and ``final_logit_softcapping`` (scale, then softcap):
    loss, components and the student head's gradients against the float64 unfused loss."""
    tensors = heads(generator)
    labels = labels_for(generator)
    options = SOFT_OPTIONS if divergence == "gkl" else dict(beta=0.3)
    criterion = FusedLinearDistillationLoss(
        weight_hard_loss=0.3, weight_soft_loss=0.9, temperature=2.0, divergence=divergence,
        student_logit_scale=0.8, teacher_logit_scale=1.6, student_final_logit_softcapping=3.0,
        teacher_final_logit_softcapping=5.0, return_components=True, chunk_size=5,
        backend=backend, **options)
    ours = [x.clone().requires_grad_() for x in tensors[:3]]
    got = criterion(ours[0], ours[1], tensors[3], tensors[4], labels, ours[2], tensors[5])
    theirs = [x.double().requires_grad_() for x in tensors[:3]]

    def jsd_rows(s, t, labels):
        return jsd_loss(s, t, labels=labels, beta=0.3, temperature=2.0, reduction="none",
                        backend="torch")

    want = unfused(theirs, [x.double() for x in tensors[3:]], labels, hard=0.3, soft_weight=0.9,
                   temperature=2.0, scale=0.8, cap=3.0, teacher_transform=(1.6, 5.0),
                   normaliser=(labels != -100).sum(), soft=jsd_rows if divergence == "jsd"
                   else None)
    for name, value, expected in zip(("loss", "soft", "hard"), got, want):
        torch.testing.assert_close(value, expected.float(), rtol=2e-6, atol=1e-6, msg=name)
    got[0].backward()
    want[0].backward()
    for name, value, expected in zip(("hidden", "weight", "bias"), ours, theirs):
        torch.testing.assert_close(value.grad, expected.grad.float(), rtol=1e-5, atol=1e-6,
                                   msg=name)
    with pytest.raises(ValueError, match="give logit_scale .both models. or student_logit_scale"):
        FusedLinearDistillationLoss(logit_scale=2.0, student_logit_scale=1.0)
    with pytest.raises(ValueError, match="teacher_final_logit_softcapping"):
        FusedLinearDistillationLoss(teacher_final_logit_softcapping=-1.0)


@pytest.mark.parametrize("num_items", ["tensor", "int"])
def test_external_normaliser_and_token_shapes(num_items, generator):
    """``(B, T, H)`` inputs with ``(B, T)`` labels; the sums divided by a global token count."""
    lead = (3, 4)
    tensors = heads(generator, lead=lead)
    labels = labels_for(generator, lead)
    count = torch.tensor(40.0) if num_items == "tensor" else 40
    criterion = FusedLinearDistillationLoss(temperature=1.5, chunk_size=5, backend="torch",
                                            **SOFT_OPTIONS)
    hidden = tensors[0].clone().requires_grad_()
    loss = criterion(hidden, tensors[1], tensors[3], tensors[4], labels, tensors[2], tensors[5],
                     num_items_in_batch=count)
    again = tensors[0].clone().requires_grad_()
    want = unfused((again, tensors[1], tensors[2]), tensors[3:], labels, hard=0.5,
                   soft_weight=0.5, temperature=1.5, scale=None, cap=None, normaliser=40.0)[0]
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=1e-6)
    loss.backward()
    want.backward()
    assert hidden.grad.shape == lead + (HIDDEN,)
    torch.testing.assert_close(hidden.grad, again.grad, rtol=1e-5, atol=1e-6)


def test_without_labels_every_token_counts(generator):
    tensors = heads(generator)
    criterion = FusedLinearDistillationLoss(backend="torch", **SOFT_OPTIONS)
    loss = criterion(tensors[0], tensors[1], tensors[3], tensors[4], None, tensors[2],
                     tensors[5])
    want = unfused(tensors[:3], tensors[3:], None, hard=0.5, soft_weight=0.5, temperature=1.0,
                   scale=None, cap=None, normaliser=float(TOKENS))[0]
    torch.testing.assert_close(loss, want, rtol=2e-6, atol=1e-6)


def test_bad_input_is_named(generator):
    tensors = heads(generator, teacher_vocabulary=VOCABULARY - 2)
    labels = labels_for(generator)
    criterion = FusedLinearDistillationLoss()
    with pytest.raises(ValueError, match="at least the student's V"):
        criterion(tensors[0], tensors[1], tensors[3], tensors[4], labels)
    good = heads(generator)
    with pytest.raises(ValueError, match="true_labels must be a tensor"):
        criterion(good[0], good[1], good[3], good[4], labels[:3])
    with pytest.raises(ValueError, match="teacher_input must have the student's"):
        criterion(good[0], good[1], good[3][:4], good[4], labels)
    with pytest.raises(ValueError, match="num_items_in_batch must be one number"):
        criterion(good[0], good[1], good[3], good[4], labels, num_items_in_batch=torch.ones(2))
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        criterion(good[0], good[1], good[3], good[4], labels, num_items_in_batch=torch.tensor(0))
    for option in ("reduction", "normalize"):
        with pytest.raises(TypeError, match=f"{option} is not a gkl_options entry"):
            FusedLinearDistillationLoss(**{option: "none"})
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        FusedLinearDistillationLoss(final_logit_softcapping=0.0)


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("divergence, rest", [("gkl", "renormalize"), ("gkl", "drop"),
                                              ("gkl", "rest"), ("jsd", "renormalize"),
                                              ("jsd", "rest")])
def test_a_cached_top_k_teacher(divergence, rest, backend, generator):
    """``teacher_input`` a ``SparseTeacher`` ``(B, T, k)``: the hard cross-entropy, the soft
    term on the cache (``gkl_loss`` / ``jsd_loss`` of the transformed student logits and the
    cache, per token), ``num_items_in_batch`` and the student's transform, against the unfused
    computation; loss, components and the student head's gradients."""
    lead = (3, 4)
    tensors = heads(generator, lead=lead)
    labels = labels_for(generator, lead)
    teacher_logits = F.linear(tensors[3], tensors[4], tensors[5]).detach()
    values, indices = (teacher_logits / 2.0).log_softmax(-1).topk(5, dim=-1)
    cache = SparseTeacher(indices, values, temperature=2.0, rest=rest)
    options = SOFT_OPTIONS if divergence == "gkl" else dict(beta=0.3)
    criterion = FusedLinearDistillationLoss(
        weight_hard_loss=0.3, weight_soft_loss=0.9, temperature=2.0, divergence=divergence,
        student_logit_scale=0.8, student_final_logit_softcapping=3.0, return_components=True,
        chunk_size=5, backend=backend, **options)
    ours = [x.clone().requires_grad_() for x in tensors[:3]]
    got = criterion(ours[0], ours[1], cache, None, labels, ours[2], num_items_in_batch=20)
    theirs = [x.clone().requires_grad_() for x in tensors[:3]]
    s = 3.0 * torch.tanh(0.8 * F.linear(*theirs) / 3.0)
    soft_of = gkl_loss if divergence == "gkl" else jsd_loss
    soft_sum = soft_of(s, cache, labels=labels, reduction="sum", temperature=2.0,
                       backend="torch", **options)
    hard_sum = F.cross_entropy(s.reshape(-1, VOCABULARY), labels.reshape(-1), reduction="sum")
    want = (0.9 * soft_sum / 20 + 0.3 * hard_sum / 20, soft_sum / 20, hard_sum / 20)
    for name, value, expected in zip(("loss", "soft", "hard"), got, want):
        torch.testing.assert_close(value, expected, rtol=2e-6, atol=1e-6, msg=name)
    got[0].backward()
    want[0].backward()
    for name, value, expected in zip(("hidden", "weight", "bias"), ours, theirs):
        torch.testing.assert_close(value.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="teacher_weight=None"):
        criterion(ours[0], ours[1], cache, tensors[4], labels, ours[2])


@pytest.mark.torch_only
@pytest.mark.parametrize("divergence, compiler, teacher_form", [
    ("gkl", "inductor", "dense"), ("jsd", "aot_eager", "dense"), ("gkl", "aot_eager", "sparse"),
    ("jsd", "aot_eager", "sparse")])
def test_compiles_with_fullgraph(divergence, compiler, teacher_form, generator):
    """``torch.compile(fullgraph=True)`` of a function calling the loss, with Dynamo's defaults
    (its backward then runs through autograd), with the teacher's head or a cached top-k
    ``SparseTeacher`` (no autograd inside the loss for either): the eager loss and gradients."""
    tensors = heads(generator)
    labels = labels_for(generator)
    criterion = FusedLinearDistillationLoss(divergence=divergence, chunk_size=8, backend="torch")
    teacher = (tensors[3], tensors[4], tensors[5])
    if teacher_form == "sparse":
        values, indices = F.linear(*teacher).log_softmax(-1).topk(5, dim=-1)
        teacher = (SparseTeacher(indices, values, rest="rest"), None, None)

    def loss_of(hidden, weight):
        return criterion(hidden, weight, teacher[0], teacher[1], labels, tensors[2], teacher[2])

    results = []
    for fn in (loss_of, torch.compile(loss_of, fullgraph=True, backend=compiler)):
        leaves = [x.clone().requires_grad_() for x in tensors[:2]]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), *(x.grad for x in leaves)))
    for name, value, expected in zip(("loss", "hidden", "weight"), *results[::-1]):
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)


def exact_products(generator, *shape):
    """Multiples of 1/32 in [-4, 4]: with a few hidden units every product is exact, so every
    evaluation (float32 or float64, fused or not) sees the same logits."""
    return (32 * torch.randn(*shape, generator=generator)).round().clamp(-128, 128) / 32


def hostile_unfused(divergence, tensors, bias, labels, shift, dtype, columns=None):
    """The hostile tests' loss written with the logits: ``(0.6 soft + 0.4 hard) / kept tokens``
    over the classes ``columns`` (default: all) of ``tensors = (h, w, ht, wt)`` and ``bias``, in
    ``dtype``, the logits through ``shift``; the soft rows the float64 reference's formulas
    (GKL's per-row loss, or the JSD at beta 0.5). Loss and the gradients of ``h`` and ``w`` (0 on
    the classes left out)."""
    from reference import gkl_loss_reference, jsd_rows_reference

    h, w, ht, wt = tensors
    vocabulary = w.shape[0]
    columns = list(range(vocabulary)) if columns is None else columns
    kept = labels != -100
    leaves = [x.detach().to(dtype).requires_grad_() for x in (h, w[columns])]
    column_bias = bias[columns].to(dtype)
    s = shift(F.linear(leaves[0], leaves[1], column_bias))
    t = shift(F.linear(ht.to(dtype), wt[columns].to(dtype), column_bias))
    if divergence == "jsd":
        soft = jsd_rows_reference(s[kept], t[kept]).sum()
    else:
        soft = gkl_loss_reference(s[kept], t[kept], pairwise=False) * kept.sum()
    position = torch.full((vocabulary,), -100)
    position[columns] = torch.arange(len(columns))
    hard = F.cross_entropy(s, torch.where(kept, position[labels.clamp(min=0)], -100),
                           reduction="sum")
    loss = (0.6 * soft + 0.4 * hard) / kept.sum()
    grad_hidden, grad_columns = torch.autograd.grad(loss, leaves)
    grad_weight = grad_columns.new_zeros(w.shape)
    grad_weight[columns] = grad_columns
    return loss.detach(), grad_hidden, grad_weight


@pytest.mark.torch_only
@pytest.mark.parametrize("divergence", ("gkl", "jsd"))
def test_compiled_row_blocks_within_four_times_plain_float32(divergence, generator, monkeypatch):
    """``compiled=True`` on CPU: the full row blocks (8 rows at V = 32768) run through
    ``torch.compile``; hostile rows (a masked vocabulary through the bias, at -1e9 and, for the
    JSD, at ``-inf``; one row offset by 1e4 through a hidden unit every class weighs 1, one peaked
    by hidden states 8 times larger, ignored rows): loss and the gradients of the student's
    hidden states and weight within ``max(4 x plain float32, 1e-5)`` of the float64 reference
    (``reference/``). Hidden states and weights are multiples of 1/32 small enough that the
    products are exact (every evaluation sees the same logits)."""
    from gkl_kernels import trainer
    from tests.adversarial_cases import assert_within_rule, row_max_shifted

    calls = []
    compiled = trainer._compiled_block_terms()
    monkeypatch.setattr(trainer, "_compiled_block_terms",
                        lambda: lambda *args: calls.append(1) or compiled(*args))
    rows, hidden, vocabulary = 19, 8, 32768  # 17 rows read: two full blocks and a row
    h, w, ht, wt = tensors = [exact_products(generator, *shape) for shape in (
        (rows, hidden), (vocabulary, hidden), (rows, hidden), (vocabulary, hidden))]
    h[1, -1] = 1e4
    h[9] *= 8.0
    w[:, -1] = 1.0
    bias = torch.zeros(vocabulary)
    bias[[0, 1, 4095, 4096]] = -1e9
    bias[-1000:] = -1e9
    if divergence == "jsd":
        bias[[7, 20000]] = -math.inf
    labels = torch.randint(8, vocabulary - 1000, (rows,), generator=generator)
    labels[[2, 12]] = -100
    options = dict(beta=0.5) if divergence == "jsd" else {}
    criterion = FusedLinearDistillationLoss(weight_hard_loss=0.4, weight_soft_loss=0.6,
                                            divergence=divergence, compiled=True,
                                            backend="torch", **options)

    leaves = [x.clone().requires_grad_() for x in (h, w)]
    loss = criterion(leaves[0], leaves[1], ht, wt, labels, bias, bias)
    actual = (loss.detach(), *torch.autograd.grad(loss, leaves))
    assert len(calls) == 2
    plain = [hostile_unfused(divergence, tensors, bias, labels, shift, torch.float32)
             for shift in (lambda x: x, row_max_shifted)]
    assert_within_rule(actual, hostile_unfused(divergence, tensors, bias, labels, lambda x: x,
                                               torch.float64), plain, torch.float32)


@pytest.mark.parametrize("mask", (-1e9, torch.finfo(torch.float32).min, -math.inf),
                         ids=("1e9", "finfo_min", "inf"))
@pytest.mark.parametrize("divergence", ("gkl", "jsd"))
def test_counted_products_within_four_times_plain_float32(divergence, mask, generator):
    """Read as on a GPU with the Triton kernels (the kept rows first, every product counted on
    the device by ``counted_matmul``; chunks of 8 over 19 rows, 5 ignored: the last chunk is
    not read at all): hostile rows (a vocabulary masked through the bias at -1e9,
    ``finfo(float32).min`` or ``-inf``, column 0 and a tile boundary included; one row offset by
    1e4 on the student's side, one by 1e4 on opposite sides, a peaked teacher row): loss and the
    gradients of the student's hidden states and weight within ``max(4 x plain float32, 1e-5)``
    of the float64 reference, the masked classes' weight rows exactly 0. The float64 reference
    drops the masked columns (they carry no probability); the plain float32 baselines, naive and
    row-max-shifted, evaluate them as given, and where they are ``-inf`` drop them too (a
    literal GKL is NaN there). Products are exact (multiples of 1/32)."""
    from gkl_kernels.testing.launches import reads_as_on_a_gpu
    from gkl_kernels.testing.traffic import TritonTrafficCounter
    from tests.adversarial_cases import assert_within_rule, row_max_shifted

    rows, hidden, vocabulary = 19, 8, 200
    h, w, ht, wt = tensors = [exact_products(generator, *shape) for shape in (
        (rows, hidden), (vocabulary, hidden), (rows, hidden), (vocabulary, hidden))]
    w[:, -1] = wt[:, -1] = 1.0  # a hidden unit every class weighs 1: a row offset
    h[1, -1] = 1e4
    h[3, -1], ht[3, -1] = 1e4, -1e4
    ht[9] *= 8.0
    masked = [0, 1, 63, 64] + list(range(vocabulary - 40, vocabulary))
    kept_columns = [c for c in range(vocabulary) if c not in set(masked)]
    bias = torch.zeros(vocabulary)
    bias[masked] = mask
    labels = torch.tensor(kept_columns)[torch.randint(len(kept_columns), (rows,),
                                                      generator=generator)]
    labels[[0, 2, 12, 13, 17]] = -100
    options = dict(beta=0.5) if divergence == "jsd" else {}
    criterion = FusedLinearDistillationLoss(weight_hard_loss=0.4, weight_soft_loss=0.6,
                                            divergence=divergence, chunk_size=8,
                                            backend="triton", **options)

    leaves = [x.clone().requires_grad_() for x in (h, w)]
    with reads_as_on_a_gpu(), TritonTrafficCounter() as traffic:
        loss = criterion(leaves[0], leaves[1], ht, wt, labels, bias, bias)
        actual = (loss.detach(), *torch.autograd.grad(loss, leaves))
    assert "counted_matmul_kernel" in traffic.per_kernel
    assert torch.equal(actual[2][masked], torch.zeros(len(masked), hidden))
    literal = kept_columns if mask == -math.inf and divergence == "gkl" else None
    plain = [hostile_unfused(divergence, tensors, bias, labels, shift, torch.float32, literal)
             for shift in (lambda x: x, row_max_shifted)]
    assert_within_rule(actual, hostile_unfused(divergence, tensors, bias, labels, lambda x: x,
                                               torch.float64, kept_columns), plain, torch.float32)


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("hidden_value", (3e38, float("nan")))
@pytest.mark.parametrize("divergence", ("gkl", "jsd"))
def test_an_ignored_row_whose_logits_overflow_is_not_read(divergence, hidden_value, backend,
                                                          generator):
    """Read as on a GPU (plain PyTorch: every row projected, the ignored ones zeroed first;
    Triton: the kept rows first, the products counted on the device): an ignored token whose
    hidden state overflows the product (its logits ``inf - inf``, NaN) or is NaN (a padding
    token's) changes neither the loss nor any gradient, softcapped too: they equal the loss's
    without that token."""
    from gkl_kernels.testing.launches import reads_as_on_a_gpu

    tensors = list(heads(generator))
    labels = labels_for(generator)
    tensors[0][5] = hidden_value  # label -100
    tensors[1][:2] = torch.tensor([[4.0], [-4.0]]).expand(2, HIDDEN)
    criterion = FusedLinearDistillationLoss(weight_hard_loss=0.3, divergence=divergence,
                                            final_logit_softcapping=30.0, backend=backend)
    kept = [row for row in range(TOKENS) if row != 5]

    def run(rows):
        leaves = [x.clone().requires_grad_() for x in tensors[:3]]
        loss = criterion(leaves[0][rows], leaves[1], tensors[3][rows], tensors[4], labels[rows],
                         leaves[2], tensors[5])
        loss.backward()
        return [loss.detach(), leaves[0].grad[kept], leaves[1].grad, leaves[2].grad]

    with reads_as_on_a_gpu():
        got = run(list(range(TOKENS)))
    for name, value, expected in zip(("loss", "hidden", "weight", "bias"), got, run(kept)):
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
