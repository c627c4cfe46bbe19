"""Why a CPU bf16 training step runs attention in fp32 (``experts.loop.sdpa_fp32_backward``):
torch's scaled_dot_product_attention, forward and forward + backward, in fp32, in bf16, and
on bf16 inputs upcast to fp32, at SmolLM2-135M's attention shapes (9 heads of 64, batch 8),
causal with a padding mask as transformers passes it. Milliseconds, median of 5.

    python benchmarks/attention_dtype.py [--lengths 48 128 256] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def milliseconds(length: int, dtype: torch.dtype, backward: bool, upcast: bool,
                 repeats: int = 5) -> float:
    q, k, v = (torch.randn(8, 9, length, 64, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril().expand(8, 1, length, length)

    def run() -> None:
        inputs = [t.float() for t in (q, k, v)] if upcast else [q, k, v]
        out = F.scaled_dot_product_attention(*inputs, attn_mask=mask).to(dtype)
        if backward:
            out.sum().backward()

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[48, 128, 256])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; ms per call, median of 5")
    print("| tokens | pass | fp32 | bf16 | bf16 upcast to fp32 |")
    print("|---:|---|---:|---:|---:|")
    for length in args.lengths:
        for backward in (False, True):
            cells = [milliseconds(length, dtype, backward, upcast) for dtype, upcast in
                     ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True))]
            print(f"| {length} | {'forward + backward' if backward else 'forward'} | "
                  + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
