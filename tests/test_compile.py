"""A routed model under torch.compile: no graph breaks in the routed module, and compiled
decoding (static KV cache) generates what eager decoding does."""

import pytest
import torch
from conftest import random_expert
from torch import nn

from phatgoose.library import ExpertLibrary
from phatgoose.routing import PhatgooseRouter, RoutedLinear, container, route, routed_modules


@pytest.mark.parametrize("path,tokens", [("sparse", 1), ("dense", 1), ("dense", 12)])
def test_routed_module_compiles_in_one_graph(path, tokens):
    torch.manual_seed(0)
    E, r, d_in, d_out = 20, 4, 16, 24
    module = RoutedLinear(nn.Linear(d_in, d_out), torch.randn(E, r, d_in),
                          torch.randn(E, r, d_out), PhatgooseRouter(torch.randn(E, d_in), 2))
    module.path = path
    x = torch.randn(3, tokens, d_in)
    compiled = torch.compile(module, fullgraph=True)  # raises on a graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,rank,fullgraph", [
    (torch.bfloat16, 8, True),  # grouped_mm traces: the prefill path is one graph
    (torch.bfloat16, 4, False),  # rows not 16-byte aligned: the loop runs outside the graph
    (torch.float32, 8, False),  # grouped_mm traces only in bf16: likewise
])
def test_sparse_prefill_path_compiles(dtype, rank, fullgraph):
    """Many tokens on the sparse path: (token, slot) pairs sorted by expert and grouped
    matmuls, their group ends found without a host sync (bincount's output size would wait on
    the device, and break the graph); compiled, the same output as the dense reference."""
    torch.manual_seed(0)
    E, d_in, d_out = 20, 16, 24
    module = RoutedLinear(nn.Linear(d_in, d_out), torch.randn(E, rank, d_in),
                          torch.randn(E, rank, d_out), PhatgooseRouter(torch.randn(E, d_in), 2))
    module = module.to(dtype)
    module.path = "sparse"
    x = torch.randn(4, 50, d_in, dtype=dtype)  # 200 pairs: above the gathering path's limit
    compiled = torch.compile(module, fullgraph=fullgraph)
    with torch.no_grad():
        out = compiled(x)
        module.path = "dense"
        expected = module(x)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance,
                               atol=tolerance * expected.abs().max().item())


def test_compiled_routed_decoding_matches_eager(llama, tmp_path, monkeypatch):
    dirs = [random_expert(llama, tmp_path / f"e{i}", seed=i) for i in range(3)]
    route(llama.model, ExpertLibrary.build(tmp_path / "lib", dirs), top_k=2)
    modules = routed_modules(llama.model)
    monkeypatch.setattr(container, "DENSE_MAX_EXPERTS", 0)  # the decoding path at many experts
    assert any(m.shared for m in modules.values())  # q/k/v share one router matmul in eager
    model, prompt = llama.model, torch.randint(2, 200, (2, 7))

    def generate():
        out = model.generate(input_ids=prompt, max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, pad_token_id=0, cache_implementation="static",
                             output_logits=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.logits, dim=1)

    eager_tokens, eager_logits = generate()
    model.forward = torch.compile(model.forward, fullgraph=True)  # raises on a graph break
    tokens, logits = generate()
    assert torch.equal(tokens, eager_tokens)
    torch.testing.assert_close(logits, eager_logits, rtol=1e-4, atol=1e-4)
