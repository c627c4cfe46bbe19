"""The router's top-k on CPU (``routers.top_k``: k passes of max where torch's topk is slow)
against torch's topk: the op alone, then whole prefills.

    python benchmarks/top_k_forms.py --experts 12 64 256 --repeats 5

1. The op alone on (2048, E) scores, top-2 (median of --repeats runs of 50 calls): ``topk``
   against the shipped ``top_k``.
2. One 8 x 256-token prefill of SmolLM2-135M (random weights) routed among E synthetic experts
   on the sparse path: the base layers only, routed with torch's topk (``MANY_ROWS`` set out
   of reach), routed as shipped; interleaved, medians of --repeats rounds after a warm-up
   round, and the largest difference between the two routed outputs' logits.
"""

from __future__ import annotations

import argparse
import json

import torch
from routed_inference import BATCH, SEQ, TOP_K
from routed_overhead import median_seconds, print_shipped_or_not

from phatgoose.routing import routers

ROWS = BATCH * SEQ
NEVER = 1 << 62  # MANY_ROWS out of reach: torch's topk everywhere
SHIPPED_MANY_ROWS = routers.MANY_ROWS


def median_us(fn, repeats: int) -> float:
    return median_seconds(fn, repeats, calls=50) * 1e6


def with_many_rows(value: int, fn):
    def run():
        saved, routers.MANY_ROWS = routers.MANY_ROWS, value
        try:
            return fn()
        finally:
            routers.MANY_ROWS = saved
    return run


def op_alone(experts: list[int], repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    results: dict = {}
    print(f"| E | topk, {ROWS} rows (µs) | shipped `top_k` (µs) |\n|---:|---:|---:|")
    for e in experts:
        scores = torch.randn(ROWS, e, generator=generator)

        def run(scores=scores):
            return routers.top_k(scores, TOP_K)
        single, shipped = median_us(with_many_rows(NEVER, run), repeats), median_us(run, repeats)
        results[e] = {"topk_us": single, "shipped_us": shipped}
        print(f"| {e} | {single:.0f} | {shipped:.0f} |")
    return results


def ship_top_k(shipped: bool) -> None:
    routers.MANY_ROWS = SHIPPED_MANY_ROWS if shipped else NEVER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[12, 64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-prefill", action="store_true", help="only the op alone")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = {"threads": torch.get_num_threads(), "op": op_alone(args.experts, args.repeats),
               "prefill": {}}
    if not args.no_prefill:
        results["prefill"] = print_shipped_or_not(args.experts, args.repeats, "topk", ship_top_k)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
