"""Where a decode step's time goes: a 1-token forward (no KV cache) of SmolLM2-135M (random
weights) routed among E synthetic experts, with each routed module cut after its base layer,
its router projection or its selection, or run in full (``routed_overhead.py``'s stages);
and, with ``--kernels``, the full forward with the few-token kernel (the C kernel,
``routing.native``, where it applies; else torch's gathers) against the CPU many-token kernel
(``GATHER_MAX_PAIRS`` set to 0), to check the threshold between them. The "full" stage runs
the few-token kernel; the cut stages run torch's projection and selection.

    python benchmarks/decode_stages.py --dtype bf16-autocast --batches 1 8
    python benchmarks/decode_stages.py --dtype fp32 --batches 1 4 8 16 --kernels

Median of --rounds rounds, each timing 10 forwards per stage, stages interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from routed_inference import DTYPES, base_model, route_synthetic, set_path, synthetic_experts
from routed_overhead import STAGES

from phatgoose.routing import container
from phatgoose.routing.container import RoutedLinear


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16-autocast")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernels", action="store_true",
                        help="compare the gather and sparse-matmul kernels instead of stages")
    args = parser.parse_args()
    model = base_model("cpu", args.dtype)
    route_synthetic(model, synthetic_experts(model, args.experts), "phatgoose")
    set_path(model, "sparse")
    gather = container.GATHER_MAX_PAIRS
    if args.kernels:
        variants = {"few-token kernel": (RoutedLinear.sparse_forward, gather),
                    "sparse matmuls": (RoutedLinear.sparse_forward, 0)}
    else:
        variants = {name: (fn, gather) for name, fn in STAGES.items() if name != "delta only"}
    times: dict[tuple[int, str], list[float]] = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                         enabled=args.dtype == "bf16-autocast"):
        for batch in args.batches:
            ids = torch.randint(3, 40000, (batch, 1))
            for _ in range(args.rounds):
                for name, (forward, max_pairs) in variants.items():
                    RoutedLinear.sparse_forward, container.GATHER_MAX_PAIRS = forward, max_pairs
                    model(ids)  # warm-up
                    start = time.perf_counter()
                    for _ in range(10):
                        model(ids)
                    times.setdefault((batch, name), []).append((time.perf_counter() - start) / 10)
    print(f"| dtype | batch | {' | '.join(variants)} |")
    print("|---|---:|" + "---:|" * len(variants))
    for batch in args.batches:
        cells = " | ".join(f"{statistics.median(times[batch, n]) * 1000:.1f}" for n in variants)
        print(f"| {args.dtype} | {batch} | {cells} |")


if __name__ == "__main__":
    main()
