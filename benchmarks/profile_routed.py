"""Where the routed forward's time goes: torch.profiler over one 8 x 256-token prefill of
SmolLM2-135M (random weights) routed among E synthetic experts on the sparse path, eager.

    python benchmarks/profile_routed.py --device cuda --dtype bf16 --experts 64
    python benchmarks/profile_routed.py --dtype bf16-autocast --experts 64  # fp32 weights
"""

from __future__ import annotations

import argparse

import torch
from routed_inference import (
    BATCH,
    DTYPES,
    SEQ,
    base_model,
    route_synthetic,
    set_path,
    synthetic_experts,
)
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    model = base_model(args.device, args.dtype)
    ids = torch.randint(3, 40000, (BATCH, SEQ), device=args.device)
    route_synthetic(model, synthetic_experts(model, args.experts), "phatgoose")
    set_path(model, "sparse")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda"
                                           else [])
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bf16-autocast")
    with torch.no_grad(), autocast:
        for _ in range(3):
            model(ids, use_cache=False)
        with profile(activities=activities) as prof:
            model(ids, use_cache=False)
            if args.device == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
