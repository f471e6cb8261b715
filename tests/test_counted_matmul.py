"""The fused losses' counted products (``core.counted_matmul``) under Triton's interpreter, against
float64: each use (logits with a bias, ``dh = g W``, ``dW += g^T h``), every head dtype, row
counts of none, one tile and part of the next and more than the chunk, a chunk offset, writes
confined to the output (a NaN frame around it), rows past the count 0 and an unread chunk's
accumulator untouched; the skipped rows cost no loads."""

import pytest
import torch

from gkl_kernels.core.counted_matmul import counted_matmul, operand_kind
from gkl_kernels.testing.traffic import TritonTrafficCounter

CHUNK, HIDDEN, VOCABULARY, OFFSET = 150, 72, 140, 37  # tiles of 128 / 64 rows: partial tiles
COUNTS = (0, 100, CHUNK + 40)  # rows read from the chunk's start: none, part, more than all
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDING = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # u


def framed(rows, columns, dtype, fill=float("nan")):
    """``(buffer, view)``: a ``(rows, columns)`` view inside a larger buffer filled with
    ``fill``, whose frame must stay as it is."""
    buffer = torch.full((rows + 2, columns + 3), fill, dtype=dtype)
    return buffer, buffer[1:-1, 2:-1]


def assert_frame_untouched(buffer, fill_is_nan=True):
    inner = torch.zeros_like(buffer, dtype=torch.bool)
    inner[1:-1, 2:-1] = True
    frame = buffer[~inner]
    assert (frame.isnan() if fill_is_nan else frame == 1.0).all(), "written outside the output"


def assert_product_close(actual, expected, dtype, what):
    """Within one rounding to ``dtype`` of the value, plus the float32 sum's error."""
    scale = expected.abs().amax(dim=(0, 1)).clamp_min(1.0) if expected.numel() else 1.0
    tolerance = ROUNDING[dtype] * expected.abs() + 1e-6 * scale * HIDDEN**0.5
    error = (actual.double() - expected).abs()
    assert (error <= tolerance).all(), f"{what}: {(error - tolerance).max().item():.3e}"


def heads(dtype, generator):
    hidden = torch.randn(CHUNK, HIDDEN, generator=generator).to(dtype)
    weight = torch.randn(VOCABULARY, HIDDEN, generator=generator).to(dtype)
    bias = torch.randn(VOCABULARY, generator=generator).to(dtype)
    grad = torch.randn(CHUNK, VOCABULARY, generator=generator).to(dtype)
    return hidden, weight, bias, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("read", COUNTS)
def test_logits_and_input_gradient_over_the_rows_read(dtype, read, generator):
    hidden, weight, bias, grad = heads(dtype, generator)
    count = torch.tensor(OFFSET + read)
    rows = min(read, CHUNK)
    for out_dtype in {torch.float32, dtype}:
        buffer, logits = framed(CHUNK, VOCABULARY, out_dtype)
        counted_matmul(hidden, weight.t(), logits, count, OFFSET, "rows", bias)
        assert_frame_untouched(buffer)
        expected = hidden[:rows].double() @ weight.double().t() + bias.double()
        assert_product_close(logits[:rows], expected, out_dtype, "logits")
        assert torch.equal(logits[rows:], torch.zeros_like(logits[rows:]))
    buffer, grad_hidden = framed(CHUNK, HIDDEN, dtype)
    counted_matmul(grad, weight, grad_hidden, count, OFFSET, "rows")
    assert_frame_untouched(buffer)
    assert_product_close(grad_hidden[:rows], grad[:rows].double() @ weight.double(), dtype, "dh")
    assert torch.equal(grad_hidden[rows:], torch.zeros_like(grad_hidden[rows:]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("read", COUNTS)
def test_weight_gradient_sums_the_rows_read(dtype, read, generator):
    hidden, _, _, grad = heads(dtype, generator)
    rows = min(read, CHUNK)
    buffer, grad_weight = framed(VOCABULARY, HIDDEN, torch.float32, fill=1.0)
    counted_matmul(grad.t(), hidden, grad_weight, torch.tensor(OFFSET + read), OFFSET,
                   "reduction", accumulate=True)
    assert_frame_untouched(buffer, fill_is_nan=False)
    expected = 1.0 + grad[:rows].double().t() @ hidden[:rows].double()
    if rows == 0:  # an unread chunk leaves the accumulator as it was
        assert torch.equal(grad_weight, torch.ones_like(grad_weight))
    assert_product_close(grad_weight, expected, torch.float32, "dW")


def test_a_count_below_the_chunk_offset_reads_nothing(generator):
    hidden, weight, _, grad = heads(torch.float32, generator)
    logits = torch.full((CHUNK, VOCABULARY), float("nan"))
    counted_matmul(hidden, weight.t(), logits, torch.tensor(OFFSET - 1), OFFSET, "rows")
    assert torch.equal(logits, torch.zeros_like(logits))
    grad_weight = torch.ones(VOCABULARY, HIDDEN)
    counted_matmul(grad.t(), hidden, grad_weight, torch.tensor(OFFSET - 1), OFFSET, "reduction",
                   accumulate=True)
    assert torch.equal(grad_weight, torch.ones_like(grad_weight))


def test_rows_not_read_are_not_loaded(generator):
    """Half the chunk read: about half the operand bytes of the whole chunk (the weight is read
    once per tile row of the output, the hidden states once per tile column)."""
    hidden, weight, _, grad = heads(torch.float32, generator)

    def bytes_read(read):
        with TritonTrafficCounter() as counter:
            counted_matmul(hidden, weight.t(), torch.empty(CHUNK, VOCABULARY), torch.tensor(read),
                           0, "rows")
            counted_matmul(grad.t(), hidden, torch.zeros(VOCABULARY, HIDDEN), torch.tensor(read),
                           0, "reduction", accumulate=True)
        return counter.bytes_read

    whole, half, none = bytes_read(CHUNK), bytes_read(CHUNK // 2), bytes_read(0)
    assert half <= 0.6 * whole
    assert none <= 0.01 * whole  # the count itself, and the accumulator not at all


def test_float32_precision_follows_torch():
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert operand_kind(torch.float32) == ("ieee", "ieee")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert operand_kind(torch.float32) == ("tf32", "tf32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert operand_kind(torch.bfloat16)[0] == "half"
