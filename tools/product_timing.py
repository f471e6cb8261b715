"""The fused losses' counted products against cuBLAS on a CUDA GPU (run by ``tools/gpu_check.sh``):
one chunk's logits ``h W^T``, ``dh = g W`` and ``dW += g^T h`` at a language model's shape, with
every row read and with half of them, each timed by CUDA events (median of 20 after 3 warm-up
runs).

    python -m tools.product_timing [--json products.json]
"""

import argparse
import json

import torch

from gkl_kernels.core.counted_matmul import counted_matmul

SHAPES = ((2048, 32000, 4096), (512, 128256, 4096))  # (chunk rows, V, H)


def milliseconds(run, repeats=20):
    """Median time of ``run()`` in ms, by CUDA events."""
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def product_times(rows, vocabulary, hidden_size, dtype):
    """``{product: {"cublas": ms, "counted_all": ms, "counted_half": ms}}`` of one shape."""
    device = torch.device("cuda")
    hidden = torch.randn(rows, hidden_size, device=device, dtype=dtype)
    weight = torch.randn(vocabulary, hidden_size, device=device, dtype=dtype)
    grad = torch.randn(rows, vocabulary, device=device, dtype=dtype)
    logits = torch.empty(rows, vocabulary, device=device, dtype=dtype)
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(vocabulary, hidden_size, device=device)
    counts = {"counted_all": torch.tensor(rows, device=device),
              "counted_half": torch.tensor(rows // 2, device=device)}
    products = {
        "logits": (lambda: torch.mm(hidden, weight.t(), out=logits),
                   lambda n: counted_matmul(hidden, weight.t(), logits, n, 0, "rows")),
        "dh": (lambda: torch.mm(grad, weight, out=grad_hidden),
               lambda n: counted_matmul(grad, weight, grad_hidden, n, 0, "rows")),
        "dW": (lambda: grad_weight.add_(grad.t() @ hidden) if dtype != torch.float32
               else grad_weight.addmm_(grad.t(), hidden),
               lambda n: counted_matmul(grad.t(), hidden, grad_weight, n, 0, "reduction",
                                        accumulate=True)),
    }
    return {name: {"cublas": milliseconds(eager),
                   **{key: milliseconds(lambda: counted(n)) for key, n in counts.items()}}
            for name, (eager, counted) in products.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the times here")
    args = parser.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "times_ms": []}
    for dtype in (torch.bfloat16, torch.float32):
        for rows, vocabulary, hidden_size in SHAPES:
            times = product_times(rows, vocabulary, hidden_size, dtype)
            results["times_ms"].append({"dtype": str(dtype), "rows": rows, "V": vocabulary,
                                        "H": hidden_size, **times})
            for name, row in times.items():
                print(f"{results['gpu']} {dtype} c={rows} V={vocabulary} H={hidden_size} {name}: "
                      + ", ".join(f"{key} {value:.3f} ms" for key, value in row.items()),
                      flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main()
