"""The routed delta for many tokens on CPU: the compiled gather-and-reduce
(``container.compiled_delta``, the default) against torch's sparse kernels (SDDMM, then CSR x
dense; ``CPU_COMPILED_DELTA = False``), alone and in whole prefills.

    python benchmarks/cpu_delta.py --experts 64 256 --repeats 5

1. The delta alone for 2048 tokens, top-2, rank 8, at SmolLM2's three layer shapes (median of
   --repeats runs of 20 calls), with the first call's seconds (compiling) and the largest
   difference between the two.
2. One 8 x 256-token prefill of SmolLM2-135M (random weights) routed among E synthetic experts
   on the sparse path: the base layers only, routed with the sparse kernels, routed as shipped;
   interleaved, medians of --repeats rounds after a warm-up round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from routed_inference import BATCH, SEQ, TOP_K
from routed_overhead import print_shipped_or_not

from phatgoose.routing import container
from phatgoose.routing.container import RoutedLinear

RANK = 8
SHAPES = ((576, 576), (576, 1536), (1536, 576))


def median_ms(fn, repeats: int, calls: int = 20) -> float:
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(runs)


def delta_alone(experts: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {f"{d_in}x{d_out}": one_shape(d_in, d_out, experts, repeats, generator)
            for d_in, d_out in SHAPES}


def one_shape(d_in: int, d_out: int, experts: int, repeats: int,
              generator: torch.Generator) -> dict:
    n = BATCH * SEQ
    x = torch.randn(n, d_in, generator=generator)
    A = torch.randn(experts, RANK, d_in, generator=generator) * 0.05
    B = torch.randn(experts, RANK, d_out, generator=generator) * 0.05
    chosen = torch.rand(n, experts, generator=generator).topk(TOP_K, dim=-1).indices
    weights = torch.rand(n, TOP_K, generator=generator).softmax(-1)
    layer = RoutedLinear(torch.nn.Linear(d_in, d_out, bias=False), A, B, torch.nn.Identity())
    out = torch.zeros(n, d_out)

    def sparse():
        return layer._add_sparse_delta(x, out, out, weights, chosen)

    def compiled():
        return container.compiled_delta(x, A, B, chosen, weights)
    start = time.perf_counter()
    ours = compiled()
    first = time.perf_counter() - start
    out.zero_()
    theirs = sparse().clone()
    return {"sparse_ms": median_ms(sparse, repeats), "compiled_ms": median_ms(compiled, repeats),
            "first_call_s": first,
            "max_rel_diff": float((ours - theirs).abs().max() / theirs.abs().max())}


def ship_compiled(shipped: bool) -> None:
    container.CPU_COMPILED_DELTA = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-prefill", action="store_true", help="only the delta alone")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results: dict = {"threads": torch.get_num_threads(), "alone": {}, "prefill": {}}
    print("| E | layer | sparse kernels (ms) | compiled (ms) | first call (s) | max rel. diff |\n"
          "|---:|---|---:|---:|---:|---:|")
    for e in args.experts:
        results["alone"][e] = delta_alone(e, args.repeats)
        for shape, r in results["alone"][e].items():
            print(f"| {e} | {shape} | {r['sparse_ms']:.2f} | {r['compiled_ms']:.2f} | "
                  f"{r['first_call_s']:.1f} | {r['max_rel_diff']:.1e} |", flush=True)
    if not args.no_prefill:
        results["prefill"] = print_shipped_or_not(args.experts, args.repeats, "sparse kernels",
                                                   ship_compiled)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
