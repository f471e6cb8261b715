"""``tools.chunk_model``: the modelled step time of ``fused_linear_gkl`` against its chunk size, and
the CUDA default chunk it justifies."""

import pytest

from gkl_kernels.fused_linear import GPU_CHUNK_ELEMENTS, default_chunk_size
from tools import chunk_model

pytestmark = pytest.mark.torch_only  # no Triton code: CI runs it once


def test_chunk_model_counts_flops_and_bytes_and_the_cuda_default_follows_it():
    tokens, vocab, hidden = 8192, 32000, 4096
    gpu = chunk_model.H100
    # 16 rows of bfloat16: bound by the weights' bytes, 4 V H x 2 + 8 V H + 4 V H, and 9 blocks
    per_chunk = (20 * vocab * hidden + 9 * 4 * 16 * vocab) / gpu.bandwidth
    assert chunk_model.step_seconds(tokens, vocab, hidden, "bfloat16", 16) == pytest.approx(
        tokens / 16 * (per_chunk + chunk_model.LAUNCHES_PER_CHUNK * chunk_model.LAUNCH_SECONDS))
    # the whole batch in one chunk: bound by its FLOPs
    whole = chunk_model.step_seconds(tokens, vocab, hidden, "bfloat16", tokens)
    assert whole == pytest.approx(8 * tokens * vocab * hidden / gpu.flops["bfloat16"], rel=0.01)
    for tokens, vocab, hidden in chunk_model.SHAPES:
        default = default_chunk_size(vocab, "cuda")
        assert default * vocab <= GPU_CHUNK_ELEMENTS < 2 * default * vocab
        for dtype in ("bfloat16", "float32"):
            best = chunk_model.model_chunk(tokens, vocab, hidden, dtype, GPU_CHUNK_ELEMENTS)
            assert best * vocab <= GPU_CHUNK_ELEMENTS
            assert chunk_model.step_seconds(tokens, vocab, hidden, dtype, default) <= \
                chunk_model.SLACK * chunk_model.step_seconds(tokens, vocab, hidden, dtype, best)
    assert "MODEL, nothing timed" in chunk_model.report()
    # on CPU: 2^23 elements, 2^25 where the chunk's logits are read a row block at a time
    assert default_chunk_size(32000) == 256 and default_chunk_size(32000, "cpu", True) == 1024
    assert default_chunk_size(128256, "cpu", True) == 256 and default_chunk_size(10**9) == 1
    # the trainer's half-precision logits, converted a row block at a time: 512 rows on CPU
    assert default_chunk_size(128256, "cpu", True, True) == 512
    assert default_chunk_size(32000, "cuda", True, True) == default_chunk_size(32000, "cuda")
