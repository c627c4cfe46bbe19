"""The sparse (top-k) routed path against the dense reference path, the folded router
standardisation, and the router matmul shared by modules that read the same input."""

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_expert, random_loras
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from phatgoose.library import ExpertLibrary
from phatgoose.routing import (
    ArrowRouter,
    FixedWeights,
    PhatgooseRouter,
    RoutedLinear,
    container,
    native,
    route,
    routed_modules,
    standardise,
    unroute,
)
from phatgoose.routing.container import SharedProjection, grouped_matmul


def test_folded_standardisation_equals_layernorm_of_both_sides():
    """LN(x) . LN(v) = (x . v~) / sigma_x, because the standardised v~ sums to zero."""
    torch.manual_seed(0)
    d = 48
    vectors = torch.randn(7, d) * 2 + 3
    x = torch.randn(5, 11, d) * 4 - 1
    router = PhatgooseRouter(vectors)
    assert router.vectors.sum(-1).abs().max() < 1e-4  # v~ has zero mean
    explicit = standardise(x) @ standardise(vectors).T / math.sqrt(d)
    torch.testing.assert_close(router.scores(x), explicit, atol=1e-5, rtol=1e-5)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close((x @ router.vectors.T) / sigma / math.sqrt(d), explicit,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["phatgoose", "arrow"])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("tokens,kernel", [(3, "native"), (3, "gather"),
                                           (200, "native-prefill"), (200, "compiled-gather"),
                                           (200, "sparse-matmul"), (200, "grouped")])
def test_sparse_path_equals_dense_reference(kind, top_k, tokens, kernel, monkeypatch):
    """Each of the sparse path's kernels (few tokens: the C kernel, else torch's gathers; many
    on CPU: the compiled choices with the C kernel's delta, or the compiled gather-and-reduce,
    else sparse matmuls; elsewhere grouped matmuls) against the dense reference and a loop over
    experts."""
    def unused(*args, **kwargs):
        raise AssertionError(f"the {kernel} kernel should run")

    if kernel == "native":
        monkeypatch.setattr(RoutedLinear, "_add_gathered_delta", unused)
    elif kernel == "gather":
        monkeypatch.setattr(container, "CPU_NATIVE_DECODE", False)
    if kernel != "compiled-gather":
        monkeypatch.setattr(container, "compiled_routed_output", unused)
    if kernel != "native-prefill":
        monkeypatch.setattr(native, "add_chosen_delta_", unused)
    if kernel == "compiled-gather":
        monkeypatch.setattr(container, "CPU_NATIVE_PREFILL", False)
    if kernel == "grouped":
        monkeypatch.setattr(container, "CPU_SPARSE_MATMULS", False)
        monkeypatch.setattr(torch.sparse, "sampled_addmm", unused)
    elif kernel == "sparse-matmul":
        monkeypatch.setattr(container, "CPU_COMPILED_DELTA", False)
        monkeypatch.setattr(container, "grouped_matmul", unused)
    elif kernel in ("compiled-gather", "native-prefill"):
        monkeypatch.setattr(container, "grouped_matmul", unused)
        monkeypatch.setattr(torch.sparse, "sampled_addmm", unused)
    torch.manual_seed(top_k + tokens)
    d_in, d_out, n_experts = 24, 20, 9
    weights = random_loras(d_in, d_out, [4, 2, 4, 3, 4, 1, 4, 4, 2])
    vectors = torch.randn(n_experts, d_in)
    router = PhatgooseRouter(vectors, top_k) if kind == "phatgoose" else ArrowRouter(
        vectors, top_k, temperature=0.5)
    layer = RoutedLinear.from_experts(nn.Linear(d_in, d_out), weights, router)
    layer.requires_grad_(False)  # a frozen base layer, as routed (the C kernel needs it)
    layer.path = "sparse"
    x = torch.randn(tokens, d_in)
    assert (tokens * top_k <= container.GATHER_MAX_PAIRS) == (tokens == 3)
    sparse = layer(x)
    layer.path = "dense"
    dense = layer(x)
    scale = dense.abs().max()
    torch.testing.assert_close(sparse, dense, atol=1e-4 * float(scale), rtol=0)
    # and both equal a loop over the experts each token chose
    chosen = router(x)
    loop = layer.base(x)
    for i, e in enumerate(weights):
        loop = loop + chosen[:, i : i + 1] * e.scaling * (x @ e.A.T @ e.B.T)
    torch.testing.assert_close(sparse, loop, atol=1e-4 * float(scale), rtol=0)
    assert ((chosen > 0).sum(-1) == top_k).all()


@pytest.mark.parametrize("compiled", [True, False])
def test_bf16_model_on_cpu_computes_many_tokens_delta_in_fp32(compiled, monkeypatch):
    """torch's CPU grouped matmul and index_add_ are scalar loops in bf16: a bf16 model's delta
    is computed in fp32 by the compiled gather-and-reduce, or by the sparse kernels, and matches
    the fp32 delta to bf16's precision of the output."""
    def unused(*args, **kwargs):
        raise AssertionError("the grouped kernel should not run on CPU")

    monkeypatch.setattr(container, "grouped_matmul", unused)
    monkeypatch.setattr(container, "CPU_COMPILED_DELTA", compiled)
    if compiled:
        monkeypatch.setattr(torch.sparse, "sampled_addmm", unused)
    torch.manual_seed(3)
    d_in, d_out, n_experts = 32, 24, 12
    weights = random_loras(d_in, d_out, [4] * n_experts)
    layer = RoutedLinear.from_experts(nn.Linear(d_in, d_out), weights,
                                      PhatgooseRouter(torch.randn(n_experts, d_in), 2))
    layer.path = "sparse"
    layer = layer.to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16
    x = torch.randn(2, 100, d_in).bfloat16()
    out = layer(x)
    # the same bf16 numbers in an fp32 model: the same routing, the delta in fp32 throughout
    reference = copy.deepcopy(layer).float()(x.float())
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    scale = float(reference.abs().max())
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=1e-2 * scale)
    layer.path = "dense"  # the bf16 dense reference path
    torch.testing.assert_close(out.float(), layer(x).float(), rtol=0, atol=2e-2 * scale)


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every bmm."""

    def __init__(self) -> None:
        super().__init__()
        self.bmm: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            self.bmm.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_fp32_model_under_autocast_gathers_the_delta_of_few_tokens_in_fp32(monkeypatch):
    """Decoding under bf16 autocast with torch's ops (the C kernel off): the gathered factors
    are not cast to bf16 (both bmms run in fp32, the stacks' dtype), and the output is the
    autocast base output plus the fp32 delta, rounded once to bf16."""
    monkeypatch.setattr(container, "CPU_NATIVE_DECODE", False)
    torch.manual_seed(4)
    d_in, d_out, n_experts = 32, 24, 12
    weights = random_loras(d_in, d_out, [4] * n_experts)
    router = PhatgooseRouter(torch.randn(n_experts, d_in), 2)
    layer = RoutedLinear.from_experts(nn.Linear(d_in, d_out), weights, router)
    assert layer.path == "sparse"
    x = torch.randn(1, 3, d_in)
    assert 3 * 2 <= container.GATHER_MAX_PAIRS  # the gather kernel
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as seen:
        out = layer(x)
        base = layer.base(x)
    assert seen.bmm == [torch.float32, torch.float32]
    assert out.dtype == base.dtype == torch.bfloat16
    chosen = router(x)
    delta = sum(chosen[..., i : i + 1] * e.scaling * (x @ e.A.T @ e.B.T)
                for i, e in enumerate(weights))
    torch.testing.assert_close(out, (base.float() + delta).bfloat16(), rtol=2**-7, atol=0)


def test_top_k_routers_take_the_sparse_path_whose_kernel_depends_on_tokens_and_device(
        monkeypatch):
    def make(n, router):
        return RoutedLinear.from_experts(nn.Linear(8, 6), random_loras(8, 6, [2] * n), router)

    few, many = container.DENSE_MAX_EXPERTS, container.DENSE_MAX_EXPERTS + 1
    phatgoose = make(many, PhatgooseRouter(torch.randn(many, 8), 2))
    assert phatgoose.path == "sparse"
    assert make(many, ArrowRouter(torch.randn(many, 8), 2)).path == "sparse"
    assert make(many, FixedWeights(torch.full((many,), 1 / many))).path == "dense"
    small = make(few, PhatgooseRouter(torch.randn(few, 8), 2))
    assert small.path == "sparse"
    fp32, bf16 = torch.float32, torch.bfloat16
    # CPU: every expert up to DENSE_MAX_EXPERTS; then, up to 32 pairs, the C kernel in fp32
    # and bf16 (torch's gathers in other dtypes, or with it off); compiled beyond
    assert small.sparse_kernel(200, "cpu", fp32) == "dense"
    assert phatgoose.sparse_kernel(32, "cpu", fp32) == "native"
    assert phatgoose.sparse_kernel(32, "cpu", bf16) == "native"
    assert phatgoose.sparse_kernel(32, "cpu", torch.float64) == "gather"
    with torch.autocast("cpu", dtype=bf16):
        assert phatgoose.sparse_kernel(32, "cpu", fp32) == "native"
    with torch.autocast("cpu", dtype=torch.float16):
        assert phatgoose.sparse_kernel(32, "cpu", fp32) == "gather"
    monkeypatch.setattr(container, "CPU_NATIVE_DECODE", False)
    assert phatgoose.sparse_kernel(32, "cpu", fp32) == "gather"
    assert phatgoose.sparse_kernel(33, "cpu", fp32) == "compiled-gather"
    monkeypatch.setattr(container, "CPU_COMPILED_DELTA", False)
    assert phatgoose.sparse_kernel(33, "cpu", fp32) == "sparse-matmul"
    monkeypatch.setattr(container, "CPU_COMPILED_DELTA", True)
    # GPU, eager: the fused kernel at every size (E <= 8 too)
    for layer in (small, phatgoose):
        assert layer.sparse_kernel(1, "cuda", bf16) == "fused"
        assert layer.sparse_kernel(2048, "cuda", bf16) == "fused"
    assert phatgoose.sparse_kernel(1, "cuda", torch.float64) == "dense"  # no fp64 kernel
    huge = container.GPU_DENSE_MAX_EXPERTS + 1
    routed = make(huge, PhatgooseRouter(torch.randn(huge, 8), 2))
    assert routed.sparse_kernel(1, "cuda", bf16) == "gather"  # above FUSED_MAX_EXPERTS too
    assert routed.sparse_kernel(2048, "cuda", bf16) == "grouped"
    # GPU, compiled or captured into a CUDA graph: fused for a decoding step (up to 8 tokens:
    # a batch of 8), then every expert
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert phatgoose.sparse_kernel(1, "cuda", bf16) == "fused"
    assert phatgoose.sparse_kernel(8, "cuda", bf16) == "fused"
    assert phatgoose.sparse_kernel(9, "cuda", bf16) == "dense"
    monkeypatch.setattr(container, "FUSED_ROUTING", False)
    assert phatgoose.sparse_kernel(1, "cuda", bf16) == "dense"


def test_sparse_path_keeps_batch_shape_and_dtype():
    torch.manual_seed(1)
    layer = RoutedLinear.from_experts(nn.Linear(8, 6), random_loras(8, 6, [2] * 12),
                                      PhatgooseRouter(torch.randn(12, 8), 2))
    layer.path = "sparse"
    x = torch.randn(2, 40, 8)
    out = layer(x)
    assert out.shape == (2, 40, 6) and out.dtype == torch.float32
    layer.path = "dense"
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-4)


def test_grouped_matmul_and_its_fallback_equal_a_loop(monkeypatch):
    torch.manual_seed(2)
    x, w = torch.randn(10, 6), torch.randn(4, 6, 3)
    ends = torch.tensor([3, 3, 7, 10])  # expert 1 gets no rows
    expected = torch.cat([x[:3] @ w[0], x[3:7] @ w[2], x[7:] @ w[3]])
    torch.testing.assert_close(grouped_matmul(x, w, ends), expected)

    def refuse(*args, **kwargs):
        raise RuntimeError("grouped_mm: unsupported here")

    monkeypatch.setattr(F, "grouped_mm", refuse)
    torch.testing.assert_close(grouped_matmul(x, w, ends), expected)


@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_shared_projection_reuses_one_matmul_only_for_the_same_input(path):
    torch.manual_seed(3)
    layers = [RoutedLinear.from_experts(nn.Linear(8, 5), random_loras(8, 5, [2] * 12),
                                        PhatgooseRouter(torch.randn(12, 8), 2))
              for _ in range(3)]  # more than DENSE_MAX_EXPERTS: the sparse kernels
    for layer in layers:
        layer.path = path
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    own = [layer(x) for layer in layers]
    own_y = layers[2](y)
    SharedProjection(layers)
    calls = []
    for layer in layers:
        layer.router.project = lambda x, calls=calls: calls.append(1)  # must not be called
    shared = [layers[0](x), layers[1](x)]
    assert calls == []
    for a, b in zip(shared, own):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(layers[2](y), own_y)  # another input: projected afresh


def test_shared_projection_converts_a_bf16_input_to_fp32_once_for_all_members():
    torch.manual_seed(3)
    layers = [RoutedLinear.from_experts(nn.Linear(8, 5), random_loras(8, 5, [2] * 12),
                                        PhatgooseRouter(torch.randn(12, 8), 2)).bfloat16()
              for _ in range(3)]
    group = SharedProjection(layers)
    x = torch.randn(4, 8).bfloat16()
    served = [layer.routing_inputs(x) for layer in layers]
    assert all(s[0] is served[0][0] for s in served) and served[0][0].dtype == torch.float32
    torch.testing.assert_close(served[0][0], x.float(), rtol=0, atol=0)
    for layer, (_, projection) in zip(layers, served):
        torch.testing.assert_close(projection, layer.router.project(x), rtol=1e-6, atol=1e-6)
    assert group._input is None  # every member served: nothing held


def test_routed_llama_shares_qkv_and_gate_up_and_matches_dense(llama, tmp_path, monkeypatch):
    dirs = [random_expert(llama, tmp_path / f"e{i}", seed=i) for i in range(5)]
    library = ExpertLibrary.build(tmp_path / "lib", dirs)
    ids = torch.randint(2, 100, (3, 30))
    route(llama.model, library, method="phatgoose", top_k=2)
    modules = routed_modules(llama.model)
    groups = {id(m.shared[0]) for m in modules.values() if m.shared}
    n_layers = llama.model.config.num_hidden_layers
    assert len(groups) == 2 * n_layers  # q/k/v and gate/up in every layer
    assert all(m.shared is None for n, m in modules.items() if n.endswith(("o_proj", "down_proj")))
    assert all(m.path == "sparse" for m in modules.values())
    monkeypatch.setattr(container, "DENSE_MAX_EXPERTS", 0)  # the sparse kernels at 5 experts
    sparse = llama.model(ids).logits
    for m in modules.values():
        m.path = "dense"
    dense = llama.model(ids).logits
    unroute(llama.model)
    torch.testing.assert_close(sparse, dense, atol=1e-4 * float(dense.abs().max()), rtol=0)


def test_an_fp64_model_routes_in_fp64_and_fp32_models_in_fp32():
    """Scores are never below fp32 (a bf16 model routes in fp32); an fp64 model keeps fp64, so
    near-tied scores are not decided by fp32 rounding (benchmarks/arrow_equivalence_fp64.py)."""
    torch.manual_seed(4)
    vectors, x = torch.randn(12, 8), torch.randn(6, 8)
    router = PhatgooseRouter(vectors, top_k=2)
    assert router.scores(x.bfloat16()).dtype == torch.float32
    scores = router.double().scores(x.double())
    assert scores.dtype == torch.float64
    centred = x.double() - x.double().mean(-1, keepdim=True)
    sigma = (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    v = router.vectors  # stored standardised when the router was made, so summing to ~0
    torch.testing.assert_close(scores, x.double() @ v.T / sigma / math.sqrt(8), atol=1e-12,
                               rtol=1e-12)
    layers = [RoutedLinear.from_experts(nn.Linear(8, 5), random_loras(8, 5, [2] * 12),
                                        PhatgooseRouter(torch.randn(12, 8), 2)).double()
              for _ in range(2)]
    group = SharedProjection(layers)
    assert group.inputs(0, x.double())[1].dtype == torch.float64
    torch.testing.assert_close(group.inputs(1, x.double())[1],
                               layers[1].router.project(x.double()), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n_experts,then", [(12, "native"), (4, "dense")])
def test_a_fused_kernel_triton_cannot_run_falls_back_to_the_torch_kernels(
        n_experts, then, monkeypatch):
    """Triton refusing the kernel on a device (here: too little shared memory) turns the fused
    kernel off with a warning, and the forward computes the same delta with the kernel chosen
    without it (from the first call on)."""
    from triton.runtime.errors import OutOfResources

    def refuse(*args, **kwargs):
        raise OutOfResources(300_000, 232_448, "shared memory")

    def unused(*args, **kwargs):
        raise AssertionError(f"the {then} kernel should run")

    monkeypatch.setattr(container, "FUSED_ON_CPU", True)
    monkeypatch.setattr(container, "FUSED_ROUTING", True)  # restored after the test
    monkeypatch.setattr(container.fused, "add_routed_delta_", refuse)
    monkeypatch.setattr(container, "grouped_matmul", unused)
    monkeypatch.setattr(RoutedLinear, "_add_sparse_delta", unused)
    monkeypatch.setattr(RoutedLinear, "_add_gathered_delta", unused)
    torch.manual_seed(8)
    layer = RoutedLinear.from_experts(nn.Linear(16, 12), random_loras(16, 12, [4] * n_experts),
                                      PhatgooseRouter(torch.randn(n_experts, 16), 2))
    layer.requires_grad_(False)  # frozen, as routed (the C kernel runs only then)
    x = torch.randn(1, 16)
    assert layer.sparse_kernel(1, "cpu", x.dtype) == "fused"
    with pytest.warns(RuntimeWarning, match="fused routing kernel cannot run on cpu"):
        out = layer(x)
    assert container.FUSED_ROUTING is False  # not tried again
    assert layer.sparse_kernel(1, "cpu", x.dtype) == then
    layer.path = "dense"
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


def test_top_k_routers_refuse_fewer_than_one_expert_per_token():
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        PhatgooseRouter(torch.randn(4, 8), top_k=0)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        ArrowRouter(torch.randn(4, 8), top_k=0)


def test_compiled_delta_failure_warns_and_falls_back_to_sparse_kernels(monkeypatch):
    """Where torch.compile cannot build the delta (no C++ compiler, say), the forward warns,
    turns the compiled delta off for the process and routes with the sparse kernels, with the
    same result as the dense reference."""
    def cannot_compile(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed(
            "inductor", RuntimeError("no C++ compiler found\nmore"), None)

    monkeypatch.setattr(container, "CPU_COMPILED_DELTA", True)
    monkeypatch.setattr(container, "compiled_routed_output", cannot_compile)
    torch.manual_seed(5)
    d_in, d_out, n_experts = 16, 12, 10
    layer = RoutedLinear.from_experts(
        nn.Linear(d_in, d_out), random_loras(d_in, d_out, [4] * n_experts),
        PhatgooseRouter(torch.randn(n_experts, d_in), 2))
    x = torch.randn(100, d_in)
    assert layer.sparse_kernel(100, "cpu", x.dtype) == "compiled-gather"
    with pytest.warns(RuntimeWarning, match="compiled routing delta cannot be built here"):
        sparse = layer(x)
    assert container.CPU_COMPILED_DELTA is False
    assert layer.sparse_kernel(100, "cpu", x.dtype) == "sparse-matmul"
    layer.path = "dense"
    torch.testing.assert_close(sparse, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arrow", [False, True])
@pytest.mark.parametrize("ab_dtype", [torch.float32, torch.bfloat16])
def test_routed_output_compiles_once_per_layer_shape_for_any_token_count(arrow, ab_dtype):
    """The compiled routed output (scores, top-k, softmax, delta, added to the base output)
    equals the router's choices and an einsum of the chosen experts, rounded once to the
    output's dtype (bf16 here); a new number of tokens reuses the graph: only the tokens are
    dynamic."""
    torch.manual_seed(6)
    E, r, d_in, d_out, k = 6, 3, 20, 28, 2
    A, B = torch.randn(E, r, d_in).to(ab_dtype), torch.randn(E, r, d_out).to(ab_dtype)
    vectors = torch.randn(E, d_in)
    router = ArrowRouter(vectors, k, temperature=0.7) if arrow else PhatgooseRouter(vectors, k)
    torch._dynamo.reset()
    counts = []
    for n in (40, 75, 40):
        x, out = torch.randn(n, d_in), torch.randn(n, d_out).bfloat16()
        projection = router.project(x)
        weights, experts = router.select(projection, x)
        expected = torch.einsum("nkr,nkrd->nd", torch.einsum(
            "nkri,ni->nkr", A[experts].float(), x) * weights[..., None], B[experts].float())
        routed = container.compiled_routed_output(out, x, projection, router.vectors, A, B, k,
                                                  0, arrow, 1e-5, 0.7)
        assert routed.dtype == torch.bfloat16
        # equal up to one bf16 rounding step (the fp32 sums may round either way)
        torch.testing.assert_close(routed.float(), (out.float() + expected).bfloat16().float(),
                                   atol=1e-6, rtol=2**-7)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[0] >= 1 and counts == [counts[0]] * 3


@pytest.mark.parametrize("kind", ["phatgoose", "arrow"])
@pytest.mark.parametrize("model_dtype", ["bf16", "bf16-autocast"])
def test_bf16_router_matmul_picks_candidates_rescored_in_fp32(kind, model_dtype, monkeypatch):
    """A model computing in bf16 routes many tokens on CPU from a bf16 router matmul that only
    picks k + EXTRA_CANDIDATES candidates, scored again in fp32: the same choices and output as
    the exact fp32 router, also where bf16 scores cannot tell the best expert apart."""
    monkeypatch.setattr(container, "BF16_ROUTER_MATMUL", True)
    torch.manual_seed(8)
    d_in, d_out, n_experts, tokens = 64, 40, 12, 300
    x = torch.randn(tokens, d_in)
    vectors = torch.randn(n_experts, d_in)
    # experts 0 and 1 both close to token 0, expert 1 a hair closer: its score beats expert
    # 0's by far less than bf16 can tell
    vectors[0] = standardise(x[0]) + 0.3 * vectors[0]
    vectors[1] = vectors[0] + 3e-3 * standardise(x[0])
    router = (PhatgooseRouter(vectors, top_k=1) if kind == "phatgoose"
              else ArrowRouter(vectors, top_k=1, temperature=0.5))
    assert router.select(router.project(x), x)[1][0, 0] == 1
    approximate = container.bf16_projection(x, router.vectors).abs()  # positive for both
    assert approximate[0, 0] >= approximate[0, 1]  # bf16 alone: expert 0, or a tie
    layer = RoutedLinear.from_experts(
        nn.Linear(d_in, d_out), random_loras(d_in, d_out, [4] * n_experts), router)
    layer.path = "sparse"
    if model_dtype == "bf16":
        layer = layer.to(torch.bfloat16)
        x_in, context = x.bfloat16(), contextlib.nullcontext()
    else:
        x_in, context = x, torch.autocast("cpu", dtype=torch.bfloat16)
    # the same numbers in fp32, routed exactly (by the same kernel)
    reference = copy.deepcopy(layer).float()
    assert reference.router.select(reference.router.project(x_in.float()), x_in.float())[1][
        0, 0] == 1
    original, calls = container.bf16_projection, []
    monkeypatch.setattr(container, "bf16_projection",
                        lambda *args: calls.append(1) or original(*args))
    assert not reference.bf16_candidates(x)  # fp32, no autocast: the exact router
    def no_sparse_kernels(*args, **kwargs):
        raise AssertionError("the compiled routing should run, not the sparse kernels")

    with context, monkeypatch.context() as no_fallback:
        no_fallback.setattr(torch.sparse, "sampled_addmm", no_sparse_kernels)
        assert layer.bf16_candidates(x_in)
        out = layer(x_in).float()
    assert calls and container.CPU_COMPILED_DELTA  # compiled, from the bf16 matmul
    expected = reference(x_in.float())
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))
    # token 0 got expert 1's delta, not expert 0's, which differs by far more than bf16's error
    A, B = reference.lora_A, reference.lora_B
    with_expert_0 = reference.base(x_in.float()[0]) + B[0].T @ (A[0] @ x_in.float()[0])
    assert (out[0] - expected[0]).abs().max() < (with_expert_0 - expected[0]).abs().max() / 4


def test_shared_projection_serves_bf16_candidates_and_exact_projections_apart(monkeypatch):
    """Under bf16 autocast, q/k/v-like siblings share one bf16 router matmul for their
    candidates; a sibling with too few experts for candidates gets the exact fp32 projection
    of the same input. Each routes as it would alone, by the exact fp32 router."""
    monkeypatch.setattr(container, "BF16_ROUTER_MATMUL", True)
    torch.manual_seed(9)
    d_in, tokens = 48, 260
    members = [RoutedLinear.from_experts(
        nn.Linear(d_in, d_out), random_loras(d_in, d_out, [4] * n_experts),
        PhatgooseRouter(torch.randn(n_experts, d_in), 2)) for d_out, n_experts in
        ((32, 12), (16, 12), (16, 4))]  # 4 experts: no room for k + 2 candidates
    references = copy.deepcopy(members)
    group = SharedProjection(members)
    for m in members:
        m.path = "sparse"
    x = torch.randn(tokens, d_in)
    original, modes = container.bf16_projection, []
    monkeypatch.setattr(container, "bf16_projection",
                        lambda *args: modes.append("bf16") or original(*args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [m.bf16_candidates(x) for m in members] == [True, True, False]
        outs = [m(x).float() for m in members]
    assert modes == ["bf16"]  # one bf16 matmul for the group
    assert group._input is None  # every member served: the input let go
    monkeypatch.setattr(container, "BF16_ROUTER_MATMUL", False)
    for out, reference in zip(outs, references):
        reference.path = "sparse"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(x).float()  # alone, by the exact fp32 router
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


def test_past_the_compiled_graphs_limit_a_new_layer_shape_runs_the_sparse_kernels(monkeypatch):
    """Past COMPILED_GRAPHS, a layer shape that would need a new graph runs the sparse kernels
    (not the compiled function eagerly, which would form (n, k, r, d) tensors), with the same
    result; the compiled path stays on for the shapes it has."""
    monkeypatch.setattr(container, "COMPILED_GRAPHS", 1)
    torch._dynamo.reset()
    torch.manual_seed(10)
    layers = [RoutedLinear.from_experts(
        nn.Linear(d_in, 12), random_loras(d_in, 12, [4] * 10),
        PhatgooseRouter(torch.randn(10, d_in), 2)) for d_in in (16, 20)]
    sparse_kernel_calls = []
    original = RoutedLinear._add_sparse_delta
    monkeypatch.setattr(RoutedLinear, "_add_sparse_delta",
                        lambda *args: sparse_kernel_calls.append(1) or original(*args))
    for calls, layer in zip(([], [1]), layers):
        x = torch.randn(100, layer.lora_A.shape[-1])
        sparse = layer(x)
        assert sparse_kernel_calls == calls and container.CPU_COMPILED_DELTA
        layer.path = "dense"
        torch.testing.assert_close(sparse, layer(x), atol=1e-5, rtol=1e-5)
