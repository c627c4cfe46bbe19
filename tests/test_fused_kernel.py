"""The fused routing kernel (router, top-k and LoRA in one Triton kernel) against the dense
reference path. On a machine without a GPU it runs under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), on CPU tensors; on a GPU machine, on the GPU."""

import copy

import pytest
import torch
from conftest import random_expert, random_loras
from torch import nn

from phatgoose.library import ExpertLibrary
from phatgoose.routing import (
    ArrowRouter,
    FixedWeights,
    PhatgooseRouter,
    RoutedLinear,
    container,
    fused,
    route,
    routed_modules,
    unroute,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fused_kernel_only(monkeypatch):
    """The fused kernel wherever it applies (on CPU too), and no other sparse kernel."""
    def unused(*args, **kwargs):
        raise AssertionError("the fused kernel should have run")

    monkeypatch.setattr(container, "FUSED_ON_CPU", True)
    monkeypatch.setattr(container, "FUSED_ROUTING", True)  # restored, should a test turn it off
    monkeypatch.setattr(container, "FUSED_MAX_TOKENS", 10**6)  # every size (default: decoding only)
    for kernel in ("_add_gathered_delta", "_add_sparse_delta"):
        monkeypatch.setattr(RoutedLinear, kernel, unused)
    monkeypatch.setattr(container, "grouped_matmul", unused)


def routed_layer(d_in, d_out, ranks, router) -> RoutedLinear:
    return RoutedLinear.from_experts(nn.Linear(d_in, d_out), random_loras(d_in, d_out, ranks),
                                     router).to(DEVICE)


def make_router(kind: str, vectors: torch.Tensor, top_k: int):
    if kind == "phatgoose":
        return PhatgooseRouter(vectors, top_k)
    return ArrowRouter(vectors, top_k, temperature=0.5)


@pytest.mark.parametrize("kind", ["phatgoose", "arrow"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("tokens", [1, 4, 40])  # x 2 sequences: decode tiles, 16-token tiles
@pytest.mark.parametrize("tile,block_t", [
    (256, 1),  # many narrow chunks
    (fused.TILE, None),  # all of a decoding step's tokens in one program
    (fused.TILE, 1),  # the default: one token per program when decoding
])
@torch.no_grad()
def test_fused_kernel_equals_dense_reference(kind, top_k, tokens, tile, block_t, monkeypatch):
    """Scores, top-k, softmax and the LoRA of the chosen experts, against the dense path
    (every expert, weighted) and a loop over experts; with padded ranks (r = 1 to 6), a
    number of experts and widths that are no power of two and span several chunks and
    several programs' output columns."""
    monkeypatch.setattr(fused, "TILE", tile)
    monkeypatch.setattr(fused, "DECODE_BLOCK_T", block_t)
    torch.manual_seed(10 * top_k + tokens)
    d_in, d_out, n_experts = 70, 150, 21
    assert d_out > 2 * fused.DECODE_COLUMNS
    ranks = [6, 2, 4, 3, 6, 1] * 3 + [5, 6, 4]
    vectors = torch.randn(n_experts, d_in) * 2 + 1  # gates with a mean: standardised inside
    layer = routed_layer(d_in, d_out, ranks, make_router(kind, vectors, top_k))
    x = (torch.randn(2, tokens, d_in) * 3 + 0.5).to(DEVICE)  # inputs with a mean, too
    assert layer.sparse_kernel(2 * tokens, DEVICE, x.dtype) == "fused"
    fused_out = layer(x)
    layer.path = "dense"
    dense = layer(x)
    scale = float(dense.abs().max())
    torch.testing.assert_close(fused_out, dense, atol=1e-4 * scale, rtol=0)
    # and a loop over the experts each token chose, from the router's own weights
    chosen = layer.router(x)
    loop = layer.base(x)
    for i in range(n_experts):
        A, B = layer.lora_A[i], layer.lora_B[i]  # pre-scaled
        loop = loop + chosen[..., i : i + 1] * (x @ A.T @ B)
    torch.testing.assert_close(fused_out, loop, atol=1e-4 * scale, rtol=0)


@torch.no_grad()
def test_fused_kernel_reads_unpacked_vectors_and_inputs_with_a_large_mean():
    """Arrow prototypes given as a transposed view (not packed in memory), and PHATGOOSE inputs
    whose mean is 3000 times their spread (sigma_x must not cancel): the dense path's output."""
    torch.manual_seed(9)
    d_in, d_out, n_experts = 40, 24, 20
    prototypes = torch.randn(d_in, n_experts).T
    arrow = routed_layer(d_in, d_out, [4] * n_experts, ArrowRouter(prototypes, 2))
    assert not arrow.router.vectors.is_contiguous()
    phatgoose = routed_layer(d_in, d_out, [4] * n_experts,
                             PhatgooseRouter(torch.randn(n_experts, d_in), 2))
    # at a mean of 3000 the folded projection x . v~ itself cancels in fp32 (in both paths, in
    # different orders): the mixing weights agree to about 1e-3, hence the looser tolerance
    # there; a sigma_x computed as E[x^2] - mean^2 was off 300-fold (every weight 0 or 1)
    for layer, x, tolerance in ((arrow, torch.randn(5, d_in), 1e-4),
                                (phatgoose, torch.randn(5, d_in) + 3000, 1e-2)):
        x = x.to(DEVICE)
        fused_out = layer(x)
        layer.path = "dense"
        dense = layer(x)
        delta = (dense - layer.base(x)).abs().max()
        torch.testing.assert_close(fused_out - layer.base(x), dense - layer.base(x),
                                   atol=tolerance * float(delta), rtol=0)


@torch.no_grad()
def test_fused_kernel_in_a_bf16_model_adds_the_fp32_delta_rounded_once():
    """A bf16 model: routed in fp32 as the torch paths do, the delta accumulated in fp32 and
    added to the bf16 base output with one rounding."""
    torch.manual_seed(5)
    d_in, d_out, n_experts = 64, 48, 40
    layer = routed_layer(d_in, d_out, [8] * n_experts,
                         PhatgooseRouter(torch.randn(n_experts, d_in), 2)).bfloat16()
    x = torch.randn(30, d_in, device=DEVICE).bfloat16()
    out = layer(x)
    reference = copy.deepcopy(layer).float()  # the same bf16 numbers, in fp32
    reference.path = "dense"
    base = layer.base(x).float()
    expected = (base + (reference(x.float()) - reference.base(x.float()))).bfloat16()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=1e-3)


@torch.no_grad()
def test_fused_kernel_under_autocast_adds_the_fp32_delta_to_the_bf16_base_output():
    """An fp32 model under bf16 autocast (evaluation's default on GPUs): the base layer runs in
    bf16, the kernel reads the fp32 input and factors and adds the fp32 delta, rounded once."""
    torch.manual_seed(7)
    d_in, d_out, n_experts = 48, 40, 16
    layer = routed_layer(d_in, d_out, [4] * n_experts,
                         PhatgooseRouter(torch.randn(n_experts, d_in), 2))
    x = torch.randn(9, d_in, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = layer(x)
        base = layer.base(x)
    assert out.dtype == base.dtype == torch.bfloat16
    layer.path = "dense"
    delta = layer(x) - layer.base(x)  # fp32, outside autocast
    torch.testing.assert_close(out, (base.float() + delta).bfloat16(), rtol=2**-7, atol=1e-3)


def test_fused_kernel_runs_only_what_it_computes(monkeypatch):
    """PHATGOOSE and Arrow routers up to FUSED_MAX_EXPERTS experts, in fp32, bf16 or fp16, with
    the kernel on (and, on CPU, asked for); nothing else (see also test_fast_path's
    test_top_k_routers_take_the_sparse_path_whose_kernel_depends_on_tokens_and_device)."""
    def kernel(layer, dtype=torch.float32):
        return layer.sparse_kernel(1, DEVICE, dtype)

    many = fused.FUSED_MAX_EXPERTS + 1
    phatgoose = routed_layer(16, 8, [2] * 12, PhatgooseRouter(torch.randn(12, 16), 2))
    arrow = routed_layer(16, 8, [2] * 12, ArrowRouter(torch.randn(12, 16), 2))
    too_many = routed_layer(16, 8, [1] * many, PhatgooseRouter(torch.randn(many, 16), 2))
    uniform = routed_layer(16, 8, [2] * 12, FixedWeights(torch.full((12,), 1 / 12)))
    assert uniform.path == "dense"  # a dense router never reaches the sparse kernels
    assert kernel(phatgoose) == kernel(arrow) == kernel(phatgoose, torch.bfloat16) == "fused"
    assert kernel(phatgoose, torch.float64) != "fused"
    assert phatgoose.sparse_kernel(1, "mps", torch.float32) != "fused"  # CUDA (or asked: CPU)
    assert kernel(too_many) != "fused"
    monkeypatch.setattr(container, "FUSED_ROUTING", False)
    assert kernel(phatgoose) != "fused"
    monkeypatch.setattr(container, "FUSED_ROUTING", True)
    monkeypatch.setattr(container, "FUSED_ON_CPU", False)
    assert (kernel(phatgoose) == "fused") == (DEVICE == "cuda")  # on CPU only when asked


def test_routed_llama_through_the_fused_kernel_matches_dense(llama, tmp_path):
    """A whole routed model (12 experts, q/k/v and gate/up sharing inputs): the fused kernel in
    every module gives the dense path's logits."""
    dirs = [random_expert(llama, tmp_path / f"e{i}", seed=i) for i in range(12)]
    library = ExpertLibrary.build(tmp_path / "lib", dirs)
    model = llama.model.to(DEVICE)
    ids = torch.randint(2, 100, (2, 20), device=DEVICE)
    route(model, library, method="phatgoose", top_k=2)
    modules = routed_modules(model)
    assert all(m.path == "sparse" for m in modules.values())
    with torch.no_grad():
        fused_logits = model(ids).logits
        for m in modules.values():
            m.path = "dense"
        dense = model(ids).logits
    unroute(model)
    torch.testing.assert_close(fused_logits, dense, atol=1e-4 * float(dense.abs().max()),
                               rtol=0)
