"""The few-token (decoding) gather kernel's first batched matmul in its two orientations: each
token's gathered A (k r, d_in) times x_t as a column (``bmm(A, x[..., None])``, before
2026-11-27) or x_t^T as a row times A^T (``bmm(x[:, None], A^T)``, shipped), on CPU.

    python benchmarks/gather_orientation.py --experts 64 --batches 1 8 --rounds 5

Two measurements, side by side in one process:
- the batched matmul alone at SmolLM2's q_proj shapes (k = 2, r = 8, d_in = 576), fp32 and bf16;
- whole 1-token forwards without KV cache (a decoding step of ``--batches`` sequences) of
  SmolLM2-135M (random weights) routed among E synthetic experts, fp32, the two orientations
  interleaved round by round (median ms of 10 forwards per round), logits compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from routed_inference import base_model, route_synthetic, set_path, synthetic_experts

from phatgoose.routing.container import RoutedLinear

SHIPPED = RoutedLinear._add_gathered_delta


def column_orientation(self: RoutedLinear, flat_x, x_scoring, flat_out, weights, experts):
    """The gather kernel as it was: A_e x_t with x_t as a column."""
    n, k = experts.shape
    dtype = self.lora_A.dtype
    x = x_scoring if x_scoring.dtype == dtype else flat_x.to(dtype)
    pairs = experts.reshape(-1)
    with torch.autocast(flat_x.device.type, enabled=False):
        A = self.lora_A.index_select(0, pairs).view(n, k * self.rank, x.shape[-1])
        hidden = torch.bmm(A, x.unsqueeze(-1)).view(n, k, self.rank)
        hidden = (hidden * weights.to(dtype).unsqueeze(-1)).view(n, 1, k * self.rank)
        B = self.lora_B.index_select(0, pairs).view(n, k * self.rank, self.d_out)
        flat_out += torch.bmm(hidden, B).view(n, self.d_out)


def microseconds(fn, repeats: int = 1000) -> float:
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| dtype | tokens | A x (column), µs | x^T A^T (row), µs |\n|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for n in args.batches:
            A, x = torch.randn(n, 16, 576, dtype=dtype), torch.randn(n, 576, dtype=dtype)
            column = microseconds(lambda A=A, x=x: torch.bmm(A, x.unsqueeze(-1)))
            row = microseconds(lambda A=A, x=x: torch.bmm(x.unsqueeze(1), A.transpose(1, 2)))
            print(f"| {str(dtype)[6:]} | {n} | {column:.1f} | {row:.1f} |")

    model = base_model("cpu", torch.float32)
    route_synthetic(model, synthetic_experts(model, args.experts), "phatgoose")
    set_path(model, "sparse")
    variants = {"column (before)": column_orientation, "row (shipped)": SHIPPED}
    print(f"\n| batch | {' | '.join(variants)} | max rel. logit diff |\n|---:|---:|---:|---:|")
    with torch.no_grad():
        for batch in args.batches:
            ids = torch.randint(3, 40000, (batch, 1), generator=torch.Generator().manual_seed(0))
            times: dict[str, list[float]] = {name: [] for name in variants}
            logits = {}
            try:
                for round_ in range(args.rounds + 1):  # round 0 warms up
                    for name, kernel in variants.items():
                        RoutedLinear._add_gathered_delta = kernel
                        start = time.perf_counter()
                        for _ in range(10):
                            logits[name] = model(ids, use_cache=False).logits
                        if round_:
                            times[name].append((time.perf_counter() - start) / 10 * 1e3)
            finally:
                RoutedLinear._add_gathered_delta = SHIPPED
            before, shipped = logits.values()
            diff = float((before - shipped).abs().max() / before.abs().max())
            print(f"| {batch} | " + " | ".join(f"{statistics.median(t):.1f} ms"
                                               for t in times.values()) + f" | {diff:.1e} |")


if __name__ == "__main__":
    main()
