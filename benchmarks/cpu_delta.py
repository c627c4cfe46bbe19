"""The routing of many tokens on CPU, alone and in whole prefills: the compiled routed output
(``container.compiled_routed_output``: the scores' scale, top-k, softmax and the delta as a
gather-and-reduce, added to the base output, in one compiled function); in fp32 the default,
the compiled choices with the C kernel's delta (``compiled_routed_choices``, then
``native.add_chosen_delta_``); and the router's eager selection with torch's sparse kernels
(SDDMM, then CSR x dense; ``CPU_COMPILED_DELTA = False``).

    python benchmarks/cpu_delta.py --experts 64 256 --repeats 5 --dtype bf16-autocast

1. The routing of 2048 tokens by PHATGOOSE from a given projection, top-2, rank 8, at
   SmolLM2's four layer shapes (median of --repeats runs of 20 calls), with the compiled
   output's first call's seconds (compiling) and the largest difference between its output and
   the sparse kernels' (a bf16 output under --dtype bf16-autocast: there, one bf16 rounding
   step); in fp32 also the C delta, added in place into one output, and its difference.
2. One 8 x 256-token prefill of SmolLM2-135M (random weights) routed among E synthetic experts
   on the sparse path: the base layers only, routed with the alternative (--against: the
   sparse kernels; in fp32 the compiled gather-and-reduce instead of the C delta; or, in
   bf16, the router's matmul in fp32 instead of bf16 candidates
   rescored in fp32, ``container.BF16_ROUTER_MATMUL``), routed as shipped; interleaved, medians
   of --repeats rounds after a warm-up round.

    python benchmarks/cpu_delta.py --experts 64 256 1024 --dtype bf16-autocast --no-alone \
        --against "fp32 router matmul"
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from routed_inference import BATCH, DTYPES, SEQ, TOP_K
from routed_overhead import median_seconds, print_shipped_or_not

from phatgoose.routing import container, native
from phatgoose.routing.container import RoutedLinear
from phatgoose.routing.routers import PhatgooseRouter

RANK = 8
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))


def median_ms(fn, repeats: int) -> float:
    return median_seconds(fn, repeats, calls=20) * 1e3


def delta_alone(experts: int, repeats: int, out_dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {f"{d_in}x{d_out}": one_shape(d_in, d_out, experts, repeats, out_dtype, generator)
            for d_in, d_out in SHAPES}


def one_shape(d_in: int, d_out: int, experts: int, repeats: int, out_dtype: torch.dtype,
              generator: torch.Generator) -> dict:
    n = BATCH * SEQ
    x = torch.randn(n, d_in, generator=generator)
    A = torch.randn(experts, RANK, d_in, generator=generator) * 0.05
    B = torch.randn(experts, RANK, d_out, generator=generator) * 0.05
    router = PhatgooseRouter(torch.randn(experts, d_in, generator=generator), TOP_K)
    projection = router.project(x)
    layer = RoutedLinear(torch.nn.Linear(d_in, d_out, bias=False), A, B, router)
    base_out = torch.randn(n, d_out, generator=generator).to(out_dtype)

    def sparse():
        out = base_out.clone()
        weights, experts = router.select(projection, x)
        return layer._add_sparse_delta(x, out, out, weights, experts)

    def compiled():
        return container.compiled_routed_output(base_out, x, projection, router.vectors, A, B,
                                                TOP_K, 0, False, router.eps, 1.0)
    start = time.perf_counter()
    ours = compiled().float()
    first = time.perf_counter() - start
    theirs = sparse().float()
    result = {"sparse_ms": median_ms(sparse, repeats),
              "compiled_ms": median_ms(compiled, repeats), "first_call_s": first,
              "max_rel_diff": float((ours - theirs).abs().max() / theirs.abs().max())}
    if out_dtype == torch.float32:
        prepared = native.prepare(router.vectors, A, B, TOP_K, False, router.eps, 1.0)
        out = base_out.clone()

        def c_delta():
            weights, experts = container.compiled_routed_choices(
                x, projection, router.vectors, TOP_K, 0, False, router.eps, 1.0)
            native.add_chosen_delta_(x, out, experts.contiguous(), weights.contiguous(),
                                     prepared)

        c_delta()
        result["c_delta_max_rel_diff"] = float((out - ours).abs().max() / ours.abs().max())
        result["c_delta_ms"] = median_ms(c_delta, repeats)  # adds into out again and again
    return result


def ship_compiled(shipped: bool) -> None:
    container.CPU_COMPILED_DELTA = shipped


def ship_bf16_router(shipped: bool) -> None:
    container.BF16_ROUTER_MATMUL = None if shipped else False


def ship_c_delta(shipped: bool) -> None:
    container.CPU_NATIVE_PREFILL = shipped


AGAINST = {"sparse kernels": ship_compiled, "fp32 router matmul": ship_bf16_router,
           "compiled gather": ship_c_delta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--no-prefill", action="store_true", help="only the delta alone")
    parser.add_argument("--no-alone", action="store_true", help="only the prefill")
    parser.add_argument("--against", choices=list(AGAINST), default="sparse kernels",
                        help="the prefill's alternative: torch's sparse kernels; (in fp32) the "
                        "compiled gather-and-reduce rather than the C delta; or (in bf16) the "
                        "router's matmul in fp32 rather than bf16 candidates")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results: dict = {"threads": torch.get_num_threads(), "dtype": args.dtype, "alone": {},
                     "prefill": {}}
    print("| E | layer | eager selection, sparse kernels (ms) | compiled (ms) | compiled choices, "
          "C delta (ms) | first call (s) | max rel. diff: compiled, C |\n"
          "|---:|---|---:|---:|---:|---:|---:|")
    for e in [] if args.no_alone else args.experts:
        results["alone"][e] = delta_alone(e, args.repeats, torch.float32 if args.dtype == "fp32"
                                          else torch.bfloat16)
        for shape, r in results["alone"][e].items():
            c_ms, c_diff = r.get("c_delta_ms"), r.get("c_delta_max_rel_diff")
            print(f"| {e} | {shape} | {r['sparse_ms']:.2f} | {r['compiled_ms']:.2f} | "
                  f"{'-' if c_ms is None else f'{c_ms:.2f}'} | {r['first_call_s']:.1f} | "
                  f"{r['max_rel_diff']:.1e}, {'-' if c_diff is None else f'{c_diff:.1e}'} |",
                  flush=True)
    if not args.no_prefill:
        results["prefill"] = print_shipped_or_not(args.experts, args.repeats, args.against,
                                                   AGAINST[args.against], args.dtype)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
