"""Are phatgoose's and PEFT's Arrow outputs the same computation at many experts? (issue 4)

At E = 256 the speed benchmark (``routed_inference.py --peft 256``) finds the two models'
fp32 logits far apart on most of its 2048 tokens. This separates rounding from a real
difference: the same synthetic experts and one 64-token sequence run through both models in
fp32 and in fp64. Near-tied Arrow scores (among 256 experts, the 2nd and 3rd best often agree
to 1e-7) let fp32 rounding flip a top-2 choice, and through attention a flip reaches every
later token; in fp64 such flips all but vanish, so if the two are the same computation their
fp64 outputs agree to about 1e-12.

    python benchmarks/arrow_equivalence_fp64.py [--experts 256] [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import routed_inference as bench  # noqa: E402


def logits(experts: int, ids: torch.Tensor, dtype: torch.dtype, peft: bool) -> torch.Tensor:
    from peft import ArrowConfig

    bench.exact_peft_prototypes()
    model = bench.base_model("cpu", torch.float32)
    loras = bench.synthetic_experts(model, experts)
    if peft:
        model = bench.peft_arrow_injected(model, loras, ArrowConfig(top_k=bench.TOP_K,
                                                                     router_temperature=1.0))
    else:
        bench.route_synthetic(model, loras, "arrow")
    with torch.no_grad():
        return model.to(dtype).eval()(input_ids=ids).logits.double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    ids = torch.randint(3, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    print("| dtype | E | tokens | max rel. diff, phatgoose vs PEFT | tokens differing by > 1e-4 |")
    print("|---|---:|---:|---:|---:|")
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        ours = logits(args.experts, ids, dtype, peft=False)
        theirs = logits(args.experts, ids, dtype, peft=True)
        c = bench.compare_logits(ours, theirs)
        print(f"| {name} | {args.experts} | {args.tokens} | {c['max_rel_diff']:.1e} "
              f"| {c['tokens_differing']} of {c['tokens']} |", flush=True)


if __name__ == "__main__":
    main()
