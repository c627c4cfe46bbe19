"""The routed module: a base linear layer plus E LoRA experts mixed per token by a router."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phatgoose.library.expert import LoraWeights
from phatgoose.models import linear_dims


class RoutedLinear(nn.Module):
    """y = base(x) + sum_e w_e(x) * s_e * B_e A_e x, with w = router(x) of shape (..., E).

    Dense reference path: every expert's LoRA branch is computed as one concatenated LoRA of
    rank E*r (A stacked to (E*r, d_in), B to (d_out, E*r), pre-scaled), and the router's weights
    scale each expert's r hidden units. It is exact, never forms a tokens x experts x d_out
    tensor, and is the oracle that faster paths are tested against. Experts of different ranks
    are zero-padded to the largest rank (which changes nothing)."""

    def __init__(self, base: nn.Module, experts: list[LoraWeights], router: nn.Module) -> None:
        super().__init__()
        if not experts:
            raise ValueError("a routed module needs at least one expert")
        self.base = base
        self.router = router
        d_in, d_out = linear_dims(base)
        rank = max(e.A.shape[0] for e in experts)
        weight = next(base.parameters())
        A = torch.zeros(len(experts), rank, d_in)
        B = torch.zeros(len(experts), d_out, rank)
        for i, e in enumerate(experts):
            r = e.A.shape[0]
            A[i, :r] = e.A.float()
            B[i, :, :r] = e.B.float() * e.scaling
        self.num_experts, self.rank = len(experts), rank
        self.register_buffer("lora_A", A.reshape(-1, d_in).to(weight.dtype), persistent=False)
        self.register_buffer(
            "lora_B", B.permute(1, 0, 2).reshape(d_out, -1).to(weight.dtype), persistent=False
        )

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (some models read it, e.g. T5 for its dtype)."""
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        weights = self.router(x)  # (..., E)
        hidden = F.linear(x, self.lora_A)  # (..., E * r)
        hidden = hidden * weights.to(hidden.dtype).repeat_interleave(self.rank, dim=-1)
        return self.base(x) + F.linear(hidden, self.lora_B)
