"""``python -m tools.chunk_model``: a MODEL, nothing is timed: ``fused_linear_gkl``'s step time on a
GPU against its chunk size, from the FLOPs and bytes each chunk costs, and the chunk it implies.

Per chunk of ``c`` rows (vocabulary ``V``, hidden size ``H``, weights of ``e`` bytes an element):

- FLOPs ``8 c V H``: the student's and the teacher's logits, the student's gradients of its
  hidden states and of its weight;
- bytes: both weights read by the forward products and the student's by the two backward ones
  (``4 V H e``), the float32 weight-gradient accumulator read and written (``8 V H``; with 2-byte
  weights the chunk's product is formed in their dtype first, ``4 V H`` more), and
  ``LOGIT_TRANSFERS`` float32 ``(c, V)`` blocks (the products write ``s`` and ``t``, the row
  kernel reads both, the backward kernel reads both and writes ``ds``, the two backward products
  read it);
- ``LAUNCHES_PER_CHUNK`` kernel launches of ``LAUNCH_SECONDS`` each.

A chunk takes ``max(FLOPs / peak, bytes / bandwidth)`` plus its launches (a roofline: no
overlap of one chunk's launches with another's work is assumed). The weight bytes do not shrink
with ``c``, so a small chunk is bound by reading the weights: the step is compute-bound only from
``c`` of about ``bytes per V H / 8 x peak / bandwidth`` rows (hundreds with 2-byte weights). The
chunk's memory grows with ``c``: ``fused_linear``'s CUDA default is the largest power of two with
``c V <= GPU_CHUNK_ELEMENTS`` (eight float32 blocks in 2 GiB), and ``model_chunk`` the smallest
power of two within ``SLACK`` of the fastest modelled chunk under a memory bound (or none); the
tests check that the default is within ``SLACK`` of the fastest at ``SHAPES``.
"""

import argparse
import dataclasses
import sys

from gkl_kernels.fused_linear import GPU_CHUNK_ELEMENTS, default_chunk_size

LOGIT_TRANSFERS = 9
LAUNCHES_PER_CHUNK = 12
LAUNCH_SECONDS = 5e-6
SLACK = 1.1  # a chunk within 10% of the fastest is fast enough: fewer rows, less memory
CHUNKS = tuple(2**k for k in range(4, 14))  # 16 to 8192 rows
SHAPES = ((8192, 32000, 512), (8192, 32000, 4096), (8192, 128256, 4096))  # (N, V, H)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Peak matmul FLOP/s per weight dtype (dense, no sparsity) and memory bandwidth."""

    name: str
    flops: dict
    bandwidth: float


# NVIDIA's H100 SXM datasheet: 989 TFLOP/s bf16 / fp16 tensor cores, 67 TFLOP/s float32 (PyTorch's
# default float32 matmul does not use TF32), 3.35 TB/s HBM3
H100 = Gpu("H100 SXM (datasheet figures)", {"bfloat16": 989e12, "float16": 989e12,
                                            "float32": 67e12}, 3.35e12)
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def chunk_flops(c, vocab, hidden):
    return 8 * c * vocab * hidden


def chunk_bytes(c, vocab, hidden, dtype):
    """Bytes one chunk of ``c`` rows moves (see the module docstring)."""
    e = ELEMENT_BYTES[dtype]
    weights = 4 * vocab * hidden * e + 8 * vocab * hidden + (4 * vocab * hidden if e < 4 else 0)
    return weights + LOGIT_TRANSFERS * 4 * c * vocab


def step_seconds(tokens, vocab, hidden, dtype, c, gpu=H100):
    """Modelled seconds of one forward+backward step at chunk size ``c``."""
    c = min(c, tokens)
    chunks = -(-tokens // c)
    per_chunk = max(chunk_flops(c, vocab, hidden) / gpu.flops[dtype],
                    chunk_bytes(c, vocab, hidden, dtype) / gpu.bandwidth)
    return chunks * (per_chunk + LAUNCHES_PER_CHUNK * LAUNCH_SECONDS)


def model_chunk(tokens, vocab, hidden, dtype, max_elements=None, gpu=H100):
    """The smallest power of two in ``CHUNKS`` (with ``c V <= max_elements`` if given) whose
    step is within ``SLACK`` of the fastest of those."""
    allowed = [c for c in CHUNKS if max_elements is None or c * vocab <= max_elements] or [1]
    times = {c: step_seconds(tokens, vocab, hidden, dtype, c, gpu) for c in allowed}
    best = min(times.values())
    return min(c for c, seconds in times.items() if seconds <= SLACK * best)


def report(gpu=H100):
    """The model's lines: per shape and dtype, the step time at ``fused_linear_gkl``'s CUDA
    default chunk, at the model's chunk within the same memory and without a memory bound."""
    lines = [f"MODEL, nothing timed: fused_linear_gkl forward+backward on one {gpu.name}, "
             f"against the chunk size c (tools/chunk_model.py); memory: eight float32 (c, V) "
             f"blocks"]
    for tokens, vocab, hidden in SHAPES:
        for dtype in ("bfloat16", "float32"):
            chunks = {"CUDA default": default_chunk_size(vocab, "cuda"),
                      "model, same memory": model_chunk(tokens, vocab, hidden, dtype,
                                                        GPU_CHUNK_ELEMENTS, gpu),
                      "model, any memory": model_chunk(tokens, vocab, hidden, dtype, None, gpu)}
            cells = "; ".join(
                f"{name} {c}: {step_seconds(tokens, vocab, hidden, dtype, c, gpu) * 1e3:.1f} ms "
                f"{32 * c * vocab / 2**30:.2f} GiB" for name, c in chunks.items())
            lines.append(f"  N={tokens} V={vocab} H={hidden} {dtype}: {cells}")
    return "\n".join(lines)


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(report())


if __name__ == "__main__":
    sys.exit(main())
