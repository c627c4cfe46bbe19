#!/usr/bin/env bash
# The GPU checks of issue 4 in one call (under 10 minutes on an H200; each step has its own
# time limit): the fused kernel's tests on the GPU, decoding end to end under torch.compile with
# CUDA graphs at E = 64, batch 1 (routed_inference.py --compiled-decode: the base model's and
# the routed model's compiles; on 2026-11-27 both did not fit in 210 s), and the fused kernel's
# table (benchmarks/fused_routing.py, with its tiling sweep at E = 64; about 3 minutes).
# Run from the repository root:
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
OUT=$(realpath "${OUT:-gpu-check}")
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_fused_kernel.py 2>&1 \
    | tee "$OUT/pytest.log" | tail -n 2
cd benchmarks || exit 1
timeout 330 python3 routed_inference.py --device cuda --dtype bf16 --experts --peft --load \
    --compiled-decode 64 --decode-batches 1 --repeats 3 --child-timeout 320 \
    --out "$OUT/compiled_decode_cuda_bf16.json" 2>&1 | tee "$OUT/compiled_decode.log" | tail -n 6
timeout 180 python3 fused_routing.py --device cuda --dtype bf16 --repeats 5 --sweep 64 \
    --out "$OUT/fused_routing_cuda_bf16.json" \
    > "$OUT/fused_routing.log" 2>&1
grep -v "'tile'" "$OUT/fused_routing.log" | tail -n 30
