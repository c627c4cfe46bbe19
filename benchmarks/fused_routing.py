"""The fused routing kernel (``routing.fused``) against the unfused sparse path, the dense path
and the base model, on SmolLM2-135M's 30 layers of 7 linear modules (576 wide, 1536 in the MLP,
k/v 192), without attention: the part of the model that routing changes.

Each variant runs eagerly and, on CUDA, captured as one CUDA graph (``torch.cuda.graph``: what
``torch.compile(mode="reduce-overhead")`` does, without compiling; it shows the kernels' own
time, without Python's launch cost). Inputs of 1, 8 (decode) and 8 x 256 = 2048 (prefill)
tokens; E random rank-8 experts per module, PHATGOOSE routing, top-2; the routed outputs are
compared with the dense path's.

    python benchmarks/fused_routing.py --device cuda --dtype bf16
    python benchmarks/fused_routing.py --device cuda --experts 64 --sweep 64   # the fused tiles
    python benchmarks/fused_routing.py --device cpu --layers 2 --tokens 1 8   # the interpreter

On CPU the fused kernel runs only under Triton's interpreter (``TRITON_INTERPRET=1``, set here),
which is slow: a check that the script runs, not a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if not torch.cuda.is_available() or "cpu" in sys.argv:  # before anything imports phatgoose
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from routed_inference import timed  # noqa: E402
from torch import nn  # noqa: E402

SMOLLM2 = dict(d=576, kv=192, ff=1536)
RANK, TOP_K = 8, 2
# base: plain linear modules; dense: the dense path (every expert); unfused: the torch sparse
# kernels (gathering, grouped matmuls); fused: the fused kernel at every size; default: what
# RoutedLinear.sparse_kernel picks (on a GPU: fused when eager; under a CUDA graph, fused for
# decoding steps of up to fused.DECODE_TOKENS tokens, dense above)
VARIANTS = ("base", "dense", "unfused", "fused", "default")
# (TILE, DECODE_COLUMNS, NUM_WARPS, DECODE_BLOCK_T) of routing.fused's tiling heuristic, tried
# by --sweep (the default is 16384, 64, 8, 1; DECODE_BLOCK_T None: all of a step's tokens in
# one program)
SWEEP = [(8192, 64, 4, None), (8192, 64, 4, 1), (16384, 64, 8, None), (16384, 64, 8, 1),
         (16384, 128, 8, 1), (32768, 64, 8, 1), (32768, 64, 16, 1)]


class Block(nn.Module):
    """One SmolLM2 layer's linear modules and norms, attention left out (q and the k/v outputs
    feed o_proj so that nothing is dead code)."""

    def __init__(self, d: int, kv: int, ff: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, kv, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, kv, bias=False), nn.Linear(d, d, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        kv = self.k_proj(h).sum(-1, keepdim=True) + self.v_proj(h).sum(-1, keepdim=True)
        x = x + self.o_proj(self.q_proj(h) + 1e-3 * kv)
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def build(layers: int, device: str, dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(**SMOLLM2) for _ in range(layers)])
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
    return model.to(device, dtype).eval()


def route(model: nn.Sequential, experts: int) -> None:
    """Every linear module becomes a RoutedLinear among ``experts`` random rank-8 experts
    (factors pre-scaled) with a random PHATGOOSE router; q/k/v and gate/up share projections."""
    from phatgoose.routing import PhatgooseRouter, RoutedLinear
    from phatgoose.routing.attach import set_module
    from phatgoose.routing.container import share_projections

    generator = torch.Generator().manual_seed(1)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        base = model.get_submodule(name)
        d_in, d_out = base.in_features, base.out_features
        A = torch.randn(experts, RANK, d_in, generator=generator) / d_in**0.5
        B = torch.randn(experts, RANK, d_out, generator=generator) * 0.05
        router = PhatgooseRouter(torch.randn(experts, d_in, generator=generator), TOP_K)
        layer = RoutedLinear(base, A, B, router).to(base.weight.device)  # the router too
        set_module(model, name, layer)
    share_projections({n: m for n, m in model.named_modules() if isinstance(m, RoutedLinear)})


# the container's kernel choice, as the "default" variant restores it (read in main)
KERNEL_CHOICE = ("FUSED_MAX_TOKENS", "GPU_DENSE_MAX_EXPERTS", "DENSE_MAX_EXPERTS")


def configure(model: nn.Module, variant: str, defaults: dict[str, int] | None = None) -> None:
    """Set ``variant``'s kernel choice; "default" restores ``defaults`` (the container's own
    ``KERNEL_CHOICE`` settings)."""
    from phatgoose.routing import RoutedLinear, container

    container.FUSED_ROUTING = variant in ("fused", "default")
    if variant == "default":
        for knob, value in defaults.items():
            setattr(container, knob, value)
    else:  # the fused kernel at every size (when on), never every expert on the sparse path
        container.FUSED_MAX_TOKENS = 10**9
        container.GPU_DENSE_MAX_EXPERTS = container.DENSE_MAX_EXPERTS = 0
    for m in model.modules():
        if isinstance(m, RoutedLinear):
            m.path = "dense" if variant == "dense" else "sparse"


def eager_ms(model, x, repeats: int, device: str) -> float:
    """Median milliseconds of ``repeats`` forwards after one warm-up."""
    return 1e3 * timed(lambda: model(x), repeats, device)


def graph_ms(model, x, replays: int) -> float:
    """Milliseconds per replay of the forward captured as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def sweep(model, x, experts: int, repeats: int, rows: list) -> None:
    """The fused variant's CUDA-graph time under each tiling of SWEEP (decode tilings apply to
    up to ``fused.DECODE_TOKENS`` tokens; the rest only use TILE and NUM_WARPS)."""
    from phatgoose.routing import fused

    configure(model, "fused")
    knobs = ("TILE", "DECODE_COLUMNS", "NUM_WARPS", "DECODE_BLOCK_T")
    default = tuple(getattr(fused, k) for k in knobs)
    for values in SWEEP:
        decode_only = values[1] != default[1] or values[3] != default[3]
        if x.shape[0] > fused.DECODE_TOKENS and decode_only:
            continue
        for knob, value in zip(knobs, values):
            setattr(fused, knob, value)
        row = {"experts": experts, "tokens": x.shape[0], "variant": "fused",
               **{k.lower(): v for k, v in zip(knobs, values)},
               "graph_ms": graph_ms(model, x, 5 * repeats)}
        rows.append(row)
        print(row, flush=True)
    for knob, value in zip(knobs, default):
        setattr(fused, knob, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 2048])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", type=int, metavar="E",
                        help="at E experts, also time the fused kernel under each tiling in "
                             "SWEEP (CUDA graphs)")
    parser.add_argument("--out", default="fused_routing.json")
    args = parser.parse_args()
    from phatgoose.routing import container

    if args.device == "cpu":
        container.FUSED_ON_CPU = True
    defaults = {knob: getattr(container, knob) for knob in KERNEL_CHOICE}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    graphs = args.device == "cuda"
    results = {"device": torch.cuda.get_device_name() if graphs else "cpu",
               "dtype": args.dtype, "torch": torch.__version__, "layers": args.layers,
               "date": time.strftime("%Y-%m-%d"), "rows": []}
    base = build(args.layers, args.device, dtype)
    with torch.no_grad():
        for tokens in args.tokens:
            x = torch.randn(tokens, SMOLLM2["d"], device=args.device, dtype=dtype)
            row = {"experts": 0, "tokens": tokens, "variant": "base",
                   "eager_ms": eager_ms(base, x, args.repeats, args.device)}
            if graphs:
                row["graph_ms"] = graph_ms(base, x, 5 * args.repeats)
            results["rows"].append(row)
            print(row, flush=True)
        for experts in args.experts:
            model = build(args.layers, args.device, dtype)
            route(model, experts)
            for tokens in args.tokens:
                x = torch.randn(tokens, SMOLLM2["d"], device=args.device, dtype=dtype)
                outputs = {}
                for variant in VARIANTS[1:]:
                    configure(model, variant, defaults)
                    outputs[variant] = model(x).float()
                    row = {"experts": experts, "tokens": tokens, "variant": variant,
                           "eager_ms": eager_ms(model, x, args.repeats, args.device)}
                    if graphs:
                        row["graph_ms"] = graph_ms(model, x, 5 * args.repeats)
                    scale = outputs["dense"].abs().max()
                    row["max_rel_diff_vs_dense"] = float(
                        (outputs[variant] - outputs["dense"]).abs().max() / scale)
                    results["rows"].append(row)
                    print(row, flush=True)
                if args.sweep == experts and graphs:
                    sweep(model, x, experts, args.repeats, results["rows"])
            # after each E, so that a run stopped by a time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
