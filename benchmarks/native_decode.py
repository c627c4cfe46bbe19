"""Eager decoding on CPU: the few-token routing as one C call (``routing.native``, the default;
built with OpenMP, and without it for comparison) against torch's ops
(``container.CPU_NATIVE_DECODE = False``: router matmul, LayerNorm statistics, top-k,
softmax, gathers, batched matmuls), and the base model.

    python benchmarks/native_decode.py --experts 64 256 --repeats 5

SmolLM2-135M's architecture with random weights, E synthetic rank-8 experts on all 210 linear
modules, top-2, fp32 (or --dtype bf16, bf16-autocast). Greedy ``generate`` of 64 new tokens
after a 32-token prompt (KV cache), at batch 1 and 8; the base model and the three routed
variants interleaved, medians of --repeats rounds after a warm-up round. Also checks that the
routed variants generate the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from routed_inference import (
    DTYPES,
    NEW_TOKENS,
    base_model,
    route_synthetic,
    set_path,
    synthetic_experts,
)

from phatgoose.routing import container, native

VARIANTS = ("base", "routed, torch ops", "routed, C kernel, one thread", "routed, C kernel")


def one_thread_library():
    """The kernel built without OpenMP (the shipped one is built with it where it can be)."""
    shipped = native.library()
    native._library, flag = None, native.OPENMP
    native.OPENMP = "-fno-openmp"
    try:
        return native.library()
    finally:
        native._library, native.OPENMP = shipped, flag


def generate(model, prompt: torch.Tensor) -> torch.Tensor:
    return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False, pad_token_id=2)


def one(experts: int, repeats: int, dtype: str) -> dict:
    base = base_model("cpu", dtype)
    routed = copy.deepcopy(base)
    route_synthetic(routed, synthetic_experts(routed, experts), "phatgoose")
    set_path(routed, "sparse")
    result: dict = {"experts": experts, "dtype": dtype, "threads": torch.get_num_threads()}
    libraries = {"routed, C kernel": native.library(),
                 "routed, C kernel, one thread": one_thread_library()}
    for batch in (1, 8):
        prompt = torch.randint(3, 40000, (batch, 32), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        tokens = {}
        for round_ in range(repeats + 1):  # round 0 warms up
            for variant in VARIANTS:
                container.CPU_NATIVE_DECODE = variant != "routed, torch ops"
                native._library = libraries.get(variant, libraries["routed, C kernel"])
                model = base if variant == "base" else routed
                start = time.perf_counter()
                tokens[variant] = generate(model, prompt)
                if round_:
                    times[variant].append((time.perf_counter() - start) / NEW_TOKENS)
        container.CPU_NATIVE_DECODE, native._library = True, libraries["routed, C kernel"]
        ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        result[f"batch {batch}"] = {
            "ms_per_token": ms,
            "routed / base": {v: ms[v] / ms["base"] for v in VARIANTS[1:]},
            "same tokens": all(torch.equal(tokens["routed, torch ops"], tokens[v])
                               for v in VARIANTS[2:])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    print("| E | batch | base (ms/token) | routed, torch ops | routed, C kernel, one thread | "
          "routed, C kernel | routed / base: torch ops, C one thread, C | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                         enabled=args.dtype == "bf16-autocast"):
        for experts in args.experts:
            r = one(experts, args.repeats, args.dtype)
            results.append(r)
            for batch in (1, 8):
                b = r[f"batch {batch}"]
                ms, ratio = b["ms_per_token"], b["routed / base"]
                print(f"| {experts} | {batch} | {ms['base']:.1f} | {ms[VARIANTS[1]]:.1f} | "
                      f"{ms[VARIANTS[2]]:.1f} | {ms[VARIANTS[3]]:.1f} | "
                      f"{ratio[VARIANTS[1]]:.2f}x, {ratio[VARIANTS[2]]:.2f}x, "
                      f"**{ratio[VARIANTS[3]]:.2f}x** | {b['same tokens']} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
