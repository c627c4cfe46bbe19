"""Eager decoding on CPU: the few-token routing as one C call (``routing.native``, the default
in fp32) against torch's ops (``container.CPU_NATIVE_DECODE = False``: router matmul,
LayerNorm statistics, top-k, softmax, gathers, batched matmuls), and the base model.

    python benchmarks/native_decode.py --experts 64 256 --repeats 5

SmolLM2-135M's architecture with random weights, E synthetic rank-8 experts on all 210 linear
modules, top-2, fp32 (or --dtype bf16, bf16-autocast). Greedy ``generate`` of 64 new tokens
after a 32-token prompt (KV cache), at batch 1 and 8; the base model and the two routed
variants interleaved, medians of --repeats rounds after a warm-up round. Also checks that both
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

from phatgoose.routing import container

VARIANTS = ("base", "routed, torch ops", "routed, C kernel")


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
    for batch in (1, 8):
        prompt = torch.randint(3, 40000, (batch, 32), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        tokens = {}
        for round_ in range(repeats + 1):  # round 0 warms up
            for variant in VARIANTS:
                container.CPU_NATIVE_DECODE = variant != "routed, torch ops"
                model = base if variant == "base" else routed
                start = time.perf_counter()
                tokens[variant] = generate(model, prompt)
                if round_:
                    times[variant].append((time.perf_counter() - start) / NEW_TOKENS)
        container.CPU_NATIVE_DECODE = True
        ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        result[f"batch {batch}"] = {
            "ms_per_token": ms,
            "routed / base": {v: ms[v] / ms["base"] for v in VARIANTS[1:]},
            "same tokens": bool(torch.equal(tokens["routed, torch ops"],
                                            tokens["routed, C kernel"]))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    print("| E | batch | base (ms/token) | routed, torch ops | routed, C kernel | routed / base: "
          "torch ops, C kernel | same tokens |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                         enabled=args.dtype == "bf16-autocast"):
        for experts in args.experts:
            r = one(experts, args.repeats, args.dtype)
            results.append(r)
            for batch in (1, 8):
                b = r[f"batch {batch}"]
                ms, ratio = b["ms_per_token"], b["routed / base"]
                print(f"| {experts} | {batch} | {ms['base']:.1f} | {ms[VARIANTS[1]]:.1f} | "
                      f"{ms[VARIANTS[2]]:.1f} | {ratio[VARIANTS[1]]:.2f}x, "
                      f"**{ratio[VARIANTS[2]]:.2f}x** | {b['same tokens']} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
