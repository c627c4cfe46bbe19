#!/usr/bin/env bash
# The GPU checks of issue 4 in one call (under 9 minutes on an H200; each step has its own
# time limit): the routing kernels' tests on the GPU, the fused kernel's table with its tiling
# sweep (benchmarks/fused_routing.py), and decoding end to end under torch.compile with CUDA
# graphs at E = 64, batch 1 (routed_inference.py --compiled-decode; about 3 minutes of
# compiling). Run from the repository root:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
OUT=$(realpath "${OUT:-gpu-check}")
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_kernel.py \
    tests/test_fast_path.py 2>&1 | tee "$OUT/pytest.log" | tail -n 3
cd benchmarks || exit 1
timeout 200 python3 fused_routing.py --device cuda --dtype bf16 --sweep 64 \
    --out "$OUT/fused_routing_cuda_bf16.json" > "$OUT/fused_routing.log" 2>&1
tail -n 3 "$OUT/fused_routing.log"
timeout 220 python3 routed_inference.py --device cuda --dtype bf16 --experts --peft --load \
    --compiled-decode 64 --decode-batches 1 --repeats 3 --child-timeout 210 \
    --out "$OUT/compiled_decode_cuda_bf16.json" 2>&1 | tee "$OUT/compiled_decode.log" | tail -n 6
