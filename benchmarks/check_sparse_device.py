"""Check the sparse routed path against the dense reference on a device (e.g. a GPU), in fp32
and bf16, for both the gather (few tokens) and grouped-matmul (many tokens) branches; and
report whether torch's grouped_mm ran there or the loop fallback did.

    python benchmarks/check_sparse_device.py --device cuda
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from phatgoose.library.expert import LoraWeights
from phatgoose.routing import PhatgooseRouter, RoutedLinear, container


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    # the torch sparse kernels (gathering, grouped matmuls) at every size, whatever the
    # device's default kernel (RoutedLinear.sparse_kernel)
    container.FUSED_ROUTING = False
    container.DENSE_MAX_EXPERTS = container.GPU_DENSE_MAX_EXPERTS = 0
    torch.manual_seed(0)
    d_in, d_out, experts, rank = 576, 1536, 64, 8
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8, d_in, device=args.device, dtype=dtype)
        w = torch.randn(64, d_in, rank, device=args.device, dtype=dtype)
        ends = torch.arange(1, 65, device=args.device, dtype=torch.int32) // 8
        ends[-1] = 8
        try:
            F.grouped_mm(x, w, offs=ends)
            grouped = "torch grouped_mm"
        except Exception as err:  # noqa: BLE001 - report whatever refused it
            grouped = f"loop fallback ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
        weights = [LoraWeights(torch.randn(rank, d_in) / d_in**0.5, torch.randn(d_out, rank),
                               2.0) for _ in range(experts)]
        layer = RoutedLinear.from_experts(nn.Linear(d_in, d_out), weights,
                             PhatgooseRouter(torch.randn(experts, d_in), 2))
        layer = layer.to(args.device, dtype)
        for tokens in (4, 2048):
            x = torch.randn(tokens, d_in, device=args.device, dtype=dtype)
            layer.path = "sparse"
            sparse = layer(x).float()
            layer.path = "dense"
            dense = layer(x).float()
            delta_scale = (dense - layer.base(x).float()).abs().max()
            rel = float((sparse - dense).abs().max() / dense.abs().max())
            rel_delta = float((sparse - dense).abs().max() / delta_scale)
            print(f"{args.device} {str(dtype):>14} tokens {tokens:5d}: max |sparse - dense| / "
                  f"max |out| = {rel:.1e}, / max |LoRA delta| = {rel_delta:.1e}; {grouped}")


if __name__ == "__main__":
    main()
