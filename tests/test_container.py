"""RoutedLinear's dense path against a per-expert loop, and against PEFT's LoRA layer."""

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from phatgoose.routing import FixedWeights, LoraWeights, PhatgooseRouter, RoutedLinear


def expert(d_in: int, d_out: int, rank: int, scaling: float) -> LoraWeights:
    return LoraWeights(torch.randn(rank, d_in), torch.randn(d_out, rank), scaling)


def test_dense_path_equals_loop_over_experts_with_mixed_ranks():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    experts = [expert(12, 10, 4, 0.5), expert(12, 10, 2, 2.0), expert(12, 10, 3, 1.0)]
    router = PhatgooseRouter(torch.randn(3, 12), top_k=2)
    layer = RoutedLinear.from_experts(base, experts, router)
    x = torch.randn(2, 5, 12)
    w = router(x)
    expected = base(x)
    for i, e in enumerate(experts):
        expected = expected + w[..., i : i + 1] * e.scaling * (x @ e.A.T @ e.B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_single_expert_weight_one_equals_peft_lora_layer():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 6))
    peft_model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0"]))
    lora = peft_model.base_model.model[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    x = torch.randn(4, 8)
    expected = peft_model(x)
    weights = LoraWeights(lora.lora_A["default"].weight.detach(),
                          lora.lora_B["default"].weight.detach(), 6 / 3)
    routed = RoutedLinear.from_experts(lora.base_layer, [weights], FixedWeights(torch.ones(1)))
    torch.testing.assert_close(routed(x), expected, atol=1e-6, rtol=1e-5)
