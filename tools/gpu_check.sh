#!/usr/bin/env bash
# The prepared GPU check (about 5 minutes; run it once on a machine with a CUDA GPU): the kernels
# compiled on CUDA against the float64 oracle and the hostile-input rule (tools/gpu_tests.py),
# the fused losses' counted products against cuBLAS (tools/product_timing.py), then the main
# benchmark's quick run on the GPU. Figures go to $OUT (default gpu_check_out/),
# each file naming the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
unset TRITON_INTERPRET
export GKL_COMPILED_TRITON=1  # tests/conftest.py: do not switch the interpreter on
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
timeout 240 python -m pytest -q -p no:cacheprovider -p no:randomly tools/gpu_tests.py \
    --override-ini="testpaths=tools" 2>&1 | tee "$out/gpu_tests.txt"
timeout 40 python -m tools.product_timing --json "$out/products_gpu.json" 2>&1 \
    | tee "$out/products_gpu.txt"
timeout 200 python -m bench --quick --json "$out/bench_quick_gpu.json" 2>&1 \
    | tee "$out/bench_quick_gpu.txt"
