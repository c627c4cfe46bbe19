"""Where the routed prefill's extra time goes: one 8 x 256-token prefill of SmolLM2-135M (random
weights) routed among E synthetic experts on the sparse path, with parts of every routed
module's forward switched off in turn, timed side by side in one process.

    python benchmarks/routed_overhead.py --dtype bf16-autocast --experts 64 256

Stages, each timed as a whole forward (median of --repeats rounds that run every stage in
turn, after a warm-up round):
- base: every routed module runs only its base layer;
- + projection: and the router's matmul (shared by sibling modules), input cast to fp32;
- + selection: and the PHATGOOSE scores' scale, top-k and softmax (the routing, no delta),
  eagerly;
- full: the routed forward as shipped (routing and the experts' delta; on CPU the selection
  and the delta run as one compiled function, and in bf16 the router's matmul too is bf16,
  picking candidates: so "full" is not the sum of the stages before it);
- delta only: the delta of fixed random choices by torch's sparse kernels, without routing.
Unlike torch.profiler (``profile_routed.py``), which on this CPU inflated some copies and
LayerNorms several times over, these are wall times of the real forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from routed_inference import (
    BATCH,
    DTYPES,
    SEQ,
    TOP_K,
    base_model,
    route_synthetic,
    set_path,
    synthetic_experts,
)

from phatgoose.routing.container import RoutedLinear
from phatgoose.routing.routers import scoring

SHIPPED = RoutedLinear.sparse_forward


def base_only(self: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    return self.base(x)


def with_projection(self: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    out = self.base(x)
    self.routing_inputs(x)
    return out


def with_selection(self: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    out = self.base(x)
    x_scoring, projection = self.routing_inputs(x)
    self.router.select(projection.reshape(-1, projection.shape[-1]),
                       x_scoring.reshape(-1, x.shape[-1]))
    return out


_FIXED: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def delta_only(self: RoutedLinear, x: torch.Tensor) -> torch.Tensor:
    """The delta by torch's sparse kernels (``_add_sparse_delta``; the shipped CPU path
    computes it inside ``container.compiled_routed_output``, with the routing) for fixed random
    choices of top-k experts."""
    out = self.base(x).contiguous()
    flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, self.d_out)
    key = (flat_x.shape[0], self.num_experts)
    if key not in _FIXED:
        generator = torch.Generator().manual_seed(0)
        scores = torch.rand(*key, generator=generator)
        _FIXED[key] = tuple(scores.topk(TOP_K, dim=-1))  # (weights, experts): distinct experts
    weights, experts = _FIXED[key]
    weights = weights.softmax(-1)
    return self._add_sparse_delta(scoring(flat_x), out, flat_out, weights, experts)


STAGES = {"base": base_only, "+ projection": with_projection, "+ selection": with_selection,
          "full": SHIPPED, "delta only": delta_only}


def median_seconds(fn: Callable[[], object], repeats: int, calls: int) -> float:
    """Median over ``repeats`` runs of ``calls`` calls of ``fn`` (after one warm-up call) of the
    seconds per call."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


def shipped_or_not(experts: int, repeats: int, name: str, ship: Callable[[bool], None],
                   dtype: str = "fp32") -> dict:
    """One 8 x 256-token prefill in ``dtype`` (a ``DTYPES`` name) routed among ``experts``
    synthetic experts on the sparse path, timed in three interleaved stages: the base layers
    only, routed with ``ship(False)`` (the alternative called ``name``), routed as shipped
    (``ship(True)``, also set after each stage). Medians of ``repeats`` rounds after a warm-up
    round, and how far the two routed outputs' logits differ."""
    model = base_model("cpu", dtype)
    route_synthetic(model, synthetic_experts(model, experts), "phatgoose")
    set_path(model, "sparse")
    ids = torch.randint(3, 40000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    stages = {"base": (base_only, True), name: (SHIPPED, False), "shipped": (SHIPPED, True)}
    times: dict[str, list[float]] = {stage: [] for stage in stages}
    logits = {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16-autocast")
    with torch.no_grad(), autocast:
        for round_ in range(repeats + 1):  # round 0 warms every stage up (and compiles)
            for stage, (forward, shipped) in stages.items():
                RoutedLinear.sparse_forward = forward
                ship(shipped)
                try:
                    start = time.perf_counter()
                    out = model(ids, use_cache=False).logits
                    if round_:
                        times[stage].append(time.perf_counter() - start)
                    else:
                        logits[stage] = out.float()
                finally:
                    RoutedLinear.sparse_forward = SHIPPED
                    ship(True)
    seconds = {stage: statistics.median(t) for stage, t in times.items()}
    diff = (logits["shipped"] - logits[name]).abs().max()
    return {"seconds": seconds, "max_abs_logit_diff": float(diff),
            "max_rel_logit_diff": float(diff / logits[name].abs().max()),
            f"throughput_{name.replace(' ', '_')}": seconds["base"] / seconds[name],
            "throughput_shipped": seconds["base"] / seconds["shipped"]}


def print_shipped_or_not(experts: list[int], repeats: int, name: str,
                         ship: Callable[[bool], None], dtype: str = "fp32") -> dict:
    """``shipped_or_not`` at each E, printed as a table row each: {E: results}."""
    print(f"\n| E | base (s) | routed, {name} (s) | routed, shipped (s) | throughput / base: "
          f"{name}, shipped | max rel. logit diff |\n|---:|---:|---:|---:|---:|---:|")
    results = {}
    for e in experts:
        r = results[e] = shipped_or_not(e, repeats, name, ship, dtype)
        s = r["seconds"]
        print(f"| {e} | {s['base']:.3f} | {s[name]:.3f} | {s['shipped']:.3f} | "
              f"{s['base'] / s[name]:.3f}, {r['throughput_shipped']:.3f} | "
              f"{r['max_rel_logit_diff']:.1e} |", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16-autocast")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the seconds as JSON here")
    args = parser.parse_args()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16-autocast")
    ids = torch.randint(3, 40000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    results = {}
    print(f"| E | {' | '.join(STAGES)} |\n|---:|{'---:|' * len(STAGES)}")
    for experts in args.experts:
        model = base_model("cpu", args.dtype)
        route_synthetic(model, synthetic_experts(model, experts), "phatgoose")
        set_path(model, "sparse")
        times: dict[str, list[float]] = {stage: [] for stage in STAGES}
        with torch.no_grad(), autocast:
            for round_ in range(args.repeats + 1):  # round 0 warms every stage up
                for stage, forward in STAGES.items():  # interleaved: drift hits every stage
                    RoutedLinear.sparse_forward = forward
                    try:
                        start = time.perf_counter()
                        model(ids, use_cache=False)
                        if round_:
                            times[stage].append(time.perf_counter() - start)
                    finally:
                        RoutedLinear.sparse_forward = SHIPPED
        seconds = {stage: statistics.median(t) for stage, t in times.items()}
        results[experts] = seconds
        print(f"| {experts} | " + " | ".join(f"{s:.3f}" for s in seconds.values()) + " |",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"dtype": args.dtype, "threads": torch.get_num_threads(),
                       "seconds": results}, f, indent=1)


if __name__ == "__main__":
    main()
