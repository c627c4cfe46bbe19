"""The routed delta in C (``routing.native``): the few-token kernel (router, top-k and delta in
one call) against torch's computation, its choices at ties, its build cache and fallback, its
argument checks, and decoding with it; the many-token kernel (the delta of chosen experts)
against fp64 and in a routed forward."""

import copy
import math

import pytest
import torch
from conftest import random_loras
from torch import nn

from phatgoose.models import resolve_target_modules
from phatgoose.routing import ArrowRouter, PhatgooseRouter, RoutedLinear, container, native
from phatgoose.routing.container import share_projections


def reference(x, vectors, A, B, k, arrow, eps=1e-5, temperature=1.0):
    """The routed delta written out in fp64 torch ops, one token at a time."""
    x, vectors, A, B = x.double(), vectors.double(), A.double(), B.double()
    out = torch.zeros(x.shape[0], B.shape[-1], dtype=torch.float64)
    for t, xt in enumerate(x):
        projection = vectors @ xt
        if arrow:
            scores = projection.abs() / temperature
        else:
            sigma = torch.sqrt(xt.var(unbiased=False) + eps)
            scores = projection / sigma / math.sqrt(x.shape[1])
        values, experts = scores.topk(k)
        for w, e in zip(values.softmax(0), experts):
            out[t] += w * (A[e] @ xt) @ B[e]
    return out


def layer_of(d_in, d_out, experts, router_kind="phatgoose", k=2, seed=0):
    torch.manual_seed(seed)
    vectors = torch.randn(experts, d_in)
    router = (PhatgooseRouter(vectors, k) if router_kind == "phatgoose"
              else ArrowRouter(vectors, k, temperature=0.7))
    layer = RoutedLinear.from_experts(nn.Linear(d_in, d_out),
                                      random_loras(d_in, d_out, [4] * experts), router)
    return layer.requires_grad_(False)  # frozen, as routed models are


@pytest.mark.parametrize("arrow", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("d_in,d_out,experts,tokens", [(70, 45, 11, 1), (64, 96, 40, 5),
                                                       (13, 7, 3, 2)])
def test_kernel_equals_the_routed_delta_computed_in_fp64(arrow, k, d_in, d_out, experts,
                                                         tokens):
    """Dimensions on and off the kernel's 32-wide blocks, k up to E, both scoring rules."""
    torch.manual_seed(k + d_in)
    x = torch.randn(tokens, d_in) * 3 + 1
    vectors = torch.randn(experts, d_in)
    A, B = torch.randn(experts, 4, d_in), torch.randn(experts, 4, d_out)
    out = torch.randn(tokens, d_out)
    expected = out.double() + reference(x, vectors, A, B, k, arrow, temperature=0.7)
    native.add_routed_delta_(x, out, native.prepare(vectors, A, B, k, arrow, 1e-5, 0.7))
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * float(
        expected.abs().max()))


@pytest.mark.parametrize("arrow", [False, True])
def test_bf16_tensors_are_read_computed_in_fp32_and_the_output_rounded_once(arrow):
    """bf16 x, out, vectors and stacks (a bf16 model): the delta of their bf16 values, computed
    in fp32, added to out and rounded to bf16 once."""
    torch.manual_seed(9)
    bf16 = torch.bfloat16
    x, vectors = torch.randn(3, 70).to(bf16), torch.randn(10, 70).to(bf16)
    A, B = torch.randn(10, 4, 70).to(bf16), torch.randn(10, 4, 50).to(bf16)
    out = torch.randn(3, 50).to(bf16)
    exact = out.double() + reference(x, vectors, A, B, 2, arrow)
    native.add_routed_delta_(x, out, native.prepare(vectors, A, B, 2, arrow, 1e-5, 1.0))
    assert out.dtype == bf16
    # one rounding: within half a bf16 step (2^-8 relative) of the exact sum, plus fp32's error
    torch.testing.assert_close(out.double(), exact, rtol=2**-8 + 1e-5, atol=1e-5)
    # fp32 x and stacks with a bf16 out (an fp32 model under bf16 autocast): the fp32 sum,
    # rounded to nearest even as torch rounds it
    out16 = torch.randn(3, 50).to(bf16)
    out32 = out16.float()
    prepared = native.prepare(vectors.float(), A.float(), B.float(), 2, arrow, 1e-5, 1.0)
    native.add_routed_delta_(x.float(), out16, prepared)
    native.add_routed_delta_(x.float(), out32, prepared)
    assert torch.equal(out16, out32.to(bf16))


def test_under_autocast_the_kernel_matches_torchs_ops(monkeypatch):
    """An fp32 model decoding under bf16 autocast: the C kernel and torch's gathers both add
    the fp32 delta to the bf16 base output once."""
    layer = layer_of(64, 40, 12)
    x = torch.randn(1, 3, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.sparse_kernel(3, "cpu", x.dtype) == "native"
        ours = layer(x)
        monkeypatch.setattr(container, "CPU_NATIVE_DECODE", False)
        theirs = layer(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours, theirs, rtol=2**-7, atol=0)


def test_a_bf16_model_routes_as_its_fp32_twin(monkeypatch):
    layer = layer_of(64, 40, 12).to(torch.bfloat16)
    assert layer.router.vectors.dtype == layer.lora_A.dtype == torch.bfloat16
    x = torch.randn(2, 64).to(torch.bfloat16)
    assert layer.sparse_kernel(2, "cpu", x.dtype) == "native"
    out = layer(x)
    twin = copy.deepcopy(layer).float()
    twin.path = "dense"
    reference_out = twin(x.float())
    scale = float(reference_out.abs().max())
    torch.testing.assert_close(out.float(), reference_out, rtol=0, atol=1e-2 * scale)


def test_tied_scores_choose_distinct_experts_the_lower_index_first():
    """Experts 1 and 3 share their vector (and expert 0's is far away): a token's top 2 are 1
    and 3, each weighted 1/2, never the same expert twice."""
    d = 40
    vectors = torch.randn(4, d)
    vectors[3] = vectors[1]
    x = vectors[1:2] * 5
    A, B = torch.randn(4, 2, d), torch.randn(4, 2, 6)
    out = torch.zeros(1, 6)
    native.add_routed_delta_(x, out, native.prepare(vectors, A, B, 2, True, 1e-5, 1.0))
    half = [0.5 * (A[e] @ x[0]) @ B[e] for e in (1, 3)]
    torch.testing.assert_close(out[0], half[0] + half[1], rtol=1e-5, atol=1e-4)


def test_nan_input_still_chooses_valid_experts():
    """A NaN row gives NaN outputs, not a read outside the stacks."""
    x = torch.full((1, 33), float("nan"))
    out = torch.zeros(1, 5)
    native.add_routed_delta_(x, out, native.prepare(
        torch.randn(6, 33), torch.randn(6, 2, 33), torch.randn(6, 2, 5), 2, False, 1e-5, 1.0))
    assert out.isnan().all()


def test_bad_arguments_get_one_line_errors():
    vectors, A, B = torch.randn(6, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 5)
    with pytest.raises(ValueError, match="contiguous fp32 or bf16 CPU tensors, got a "
                                         "torch.float64 tensor on cpu"):
        native.prepare(vectors.double(), A, B, 2, False, 1e-5, 1.0)
    with pytest.raises(ValueError, match="mismatched stacks"):
        native.prepare(vectors, A, B.bfloat16(), 2, False, 1e-5, 1.0)
    with pytest.raises(ValueError, match="mismatched stacks"):
        native.prepare(vectors[:, :7].contiguous(), A, B, 2, False, 1e-5, 1.0)
    prepared = native.prepare(vectors, A, B, 2, False, 1e-5, 1.0)
    with pytest.raises(ValueError, match="got a non-contiguous torch.float32"):
        native.add_routed_delta_(torch.randn(8, 3).T, torch.zeros(3, 5), prepared)
    with pytest.raises(ValueError, match=r"do not fit a 8 -> 5 layer"):
        native.add_routed_delta_(torch.randn(3, 8), torch.zeros(3, 4), prepared)


def test_built_once_into_the_cache_and_loaded_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PHATGOOSE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    native.library()
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
    # a later process loads it without compiling
    def no_compiling(*args, **kwargs):
        raise AssertionError("the kernel should come from the cache")

    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native.subprocess, "run", no_compiling)
    prepared = native.prepare(torch.randn(3, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 4), 1,
                              False, 1e-5, 1.0)
    native.add_routed_delta_(torch.randn(1, 8), torch.zeros(1, 4), prepared)
    assert native._library is not None


def test_an_unwritable_cache_is_a_build_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PHATGOOSE_CACHE", str(blocker))
    monkeypatch.setattr(native, "_library", None)
    with pytest.raises(native.NativeBuildError, match="cannot build"):
        native.library()


def test_a_compiler_command_with_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("PHATGOOSE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "env cc")
    monkeypatch.setattr(native, "_library", None)
    native.library()
    assert len(list((tmp_path / "kernels").glob("*.so"))) == 1


def test_a_compiler_without_openmp_builds_it_single_threaded(tmp_path, monkeypatch):
    monkeypatch.setenv("PHATGOOSE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "OPENMP", "-fno-such-option")
    torch.manual_seed(2)
    x, vectors = torch.randn(5, 40), torch.randn(7, 40)
    A, B = torch.randn(7, 3, 40), torch.randn(7, 3, 9)
    out = torch.zeros(5, 9)
    native.add_routed_delta_(x, out, native.prepare(vectors, A, B, 2, False, 1e-5, 1.0))
    torch.testing.assert_close(out.double(), reference(x, vectors, A, B, 2, False),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])
def test_without_a_working_compiler_routing_falls_back_to_torch_with_a_warning(
        compiler, tmp_path, monkeypatch):
    """No C compiler on PATH, or one that fails: one warning, the kernel off for the process,
    and the same output from torch's ops."""
    monkeypatch.setenv("PHATGOOSE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(container, "CPU_NATIVE_DECODE", True)
    monkeypatch.setattr(container, "CPU_NATIVE_PREFILL", True)
    layer = layer_of(24, 10, 12)
    x = torch.randn(3, 24)
    assert layer.sparse_kernel(3, "cpu", x.dtype) == "native"
    with pytest.warns(RuntimeWarning, match="native routing kernel cannot be built here"):
        out = layer(x)
    assert container.CPU_NATIVE_DECODE is False and container.CPU_NATIVE_PREFILL is False
    assert layer.sparse_kernel(3, "cpu", x.dtype) == "gather"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written
    layer.path = "dense"
    torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


def test_a_deep_copy_reads_its_own_stacks():
    """The kernel reads tensors by address: a copied module must not read the original's."""
    layer = layer_of(24, 10, 12)
    x = torch.randn(2, 24)
    before = layer(x)  # packs the original's addresses
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        layer.lora_B.zero_()
    torch.testing.assert_close(twin(x), before, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)
    # and changed router settings are seen: the temperature, then k
    layer = layer_of(24, 10, 12, router_kind="arrow")
    layer(x)
    for setting, value in (("temperature", 100.0), ("top_k", 3)):
        setattr(layer.router, setting, value)
        native_out = layer(x)
        layer.path = "dense"
        torch.testing.assert_close(native_out, layer(x), rtol=1e-5, atol=1e-5)
        layer.path = "sparse"


def test_where_autograd_records_torchs_ops_run(monkeypatch):
    """The kernel is not differentiable and writes out behind autograd's back: it runs only
    where nothing needs gradients (here, a frozen layer and an input without them)."""
    calls = []
    kernel = native.add_routed_delta_
    monkeypatch.setattr(native, "add_routed_delta_", lambda *a: calls.append(1) or kernel(*a))
    layer = layer_of(24, 10, 12)
    layer(torch.randn(2, 24))
    assert calls == [1]
    x = torch.randn(2, 24, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    layer.base.requires_grad_(True)
    layer(torch.randn(2, 24)).sum().backward()
    assert layer.base.weight.grad is not None
    assert calls == [1]


def test_greedy_decoding_with_the_kernel_generates_what_torch_ops_generate(llama, monkeypatch):
    """A tiny Llama routed among 12 experts on every linear module (shared q/k/v and gate/up
    projections included): the same tokens and the same logits, step by step."""
    model = llama.model
    torch.manual_seed(5)
    modules = {}
    for name in resolve_target_modules(model):
        base = model.get_submodule(name)
        d_out, d_in = base.weight.shape
        router = PhatgooseRouter(torch.randn(12, d_in), 2)
        modules[name] = RoutedLinear.from_experts(base, random_loras(d_in, d_out, [4] * 12),
                                                  router)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, modules[name])
    share_projections(modules)
    prompt = torch.randint(2, 200, (2, 5))
    calls = []
    kernel = native.add_routed_delta_
    monkeypatch.setattr(native, "add_routed_delta_",
                        lambda *args: calls.append(args[0].shape[0]) or kernel(*args))
    runs = []
    for on in (True, False):
        container.CPU_NATIVE_DECODE = on
        try:
            runs.append(model.generate(prompt, max_new_tokens=8, min_new_tokens=8,
                                       do_sample=False, pad_token_id=0, output_logits=True,
                                       return_dict_in_generate=True))
        finally:
            container.CPU_NATIVE_DECODE = True
    steps = 8 * len(modules)  # the prompt and 7 one-token steps per module, then none
    assert len(calls) == steps and set(calls) == {10, 2}
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits),
                               rtol=1e-4, atol=1e-4)


def chosen_reference(x, out, experts, weights, A, B):
    """out + sum_j w_tj (A_e x_t) B_e in fp64, pair by pair."""
    expected = out.double().clone()
    for t in range(x.shape[0]):
        for e, w in zip(experts[t], weights[t]):
            expected[t] += float(w) * (A[e].double() @ x[t].double()) @ B[e].double()
    return expected


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("d_in,d_out,rank,experts,tokens", [
    (37, 100, 8, 9, 300),   # d_in off the 8-wide lanes; 3 full 32-column blocks and a tail
    (64, 64, 11, 5, 257),   # rank 8 + 3 rows; every block full
    (13, 7, 4, 3, 2),       # narrower than one block, rank under 8, few tokens
    (24, 40, 8, 6, 0),      # no tokens
])
def test_chosen_delta_equals_fp64(k, d_in, d_out, rank, experts, tokens):
    """The many-token kernel adds each pair's delta, wherever the dimensions fall on its
    blocks, the threads' split and the lanes."""
    torch.manual_seed(k + d_in + tokens)
    x = torch.randn(tokens, d_in)
    A, B = torch.randn(experts, rank, d_in), torch.randn(experts, rank, d_out)
    chosen = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)]) if tokens else (
        torch.zeros(0, k, dtype=torch.int64))
    weights = torch.rand(tokens, k)
    out = torch.randn(tokens, d_out)
    expected = chosen_reference(x, out, chosen, weights, A, B)
    prepared = native.prepare(torch.randn(experts, d_in), A, B, k, False, 1e-5, 1.0)
    native.add_chosen_delta_(x, out, chosen, weights, prepared)
    scale = float(expected.abs().max()) if tokens else 1.0
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * scale)


def test_chosen_delta_rejects_bad_arguments():
    torch.manual_seed(0)
    E, r, d_in, d_out, k, n = 4, 8, 16, 12, 2, 5
    A, B = torch.randn(E, r, d_in), torch.randn(E, r, d_out)
    prepared = native.prepare(torch.randn(E, d_in), A, B, k, False, 1e-5, 1.0)
    x, out = torch.randn(n, d_in), torch.randn(n, d_out)
    experts, weights = torch.zeros(n, k, dtype=torch.int64), torch.rand(n, k)
    with pytest.raises(ValueError, match="outside the library's 4"):
        native.add_chosen_delta_(x, out, experts + 4, weights, prepared)
    with pytest.raises(ValueError, match="outside"):
        native.add_chosen_delta_(x, out, experts - 1, weights, prepared)
    with pytest.raises(ValueError, match="do not fit a 16 -> 12 layer with k = 2"):
        native.add_chosen_delta_(x, out, experts[:, :1].contiguous(), weights, prepared)
    with pytest.raises(ValueError, match="do not fit"):
        native.add_chosen_delta_(torch.randn(n, 15), out, experts, weights, prepared)
    with pytest.raises(ValueError, match="contiguous fp32 CPU tensors"):
        native.add_chosen_delta_(x.bfloat16(), out, experts, weights, prepared)
    with pytest.raises(ValueError, match="int64 CPU tensor"):
        native.add_chosen_delta_(x, out, experts.int(), weights, prepared)
    bf16 = native.prepare(torch.randn(E, d_in), A.bfloat16(), B.bfloat16(), k, False, 1e-5, 1.)
    with pytest.raises(ValueError, match="contiguous fp32 CPU tensors"):
        native.add_chosen_delta_(x, out, experts, weights, bf16)
    untouched = out.clone()
    with pytest.raises(ValueError):
        native.add_chosen_delta_(x, out, experts + 4, weights, prepared)
    assert torch.equal(out, untouched)


@pytest.mark.parametrize("router_kind", ["phatgoose", "arrow"])
def test_prefill_through_the_c_delta_equals_the_compiled_gather(router_kind, monkeypatch):
    """A routed fp32 layer at many tokens: the compiled choices with the C kernel's delta give
    the compiled gather-and-reduce's output (and the dense reference's), rank 8 (the kernel's
    8-row dot products), outputs on and off its 32-column blocks; the C path really ran."""
    calls = []
    real = native.add_chosen_delta_

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(native, "add_chosen_delta_", counted)
    for d_out in (64, 50):
        torch.manual_seed(d_out)
        vectors = torch.randn(12, 40)
        router = (PhatgooseRouter(vectors, 2) if router_kind == "phatgoose"
                  else ArrowRouter(vectors, 2, temperature=0.7))
        layer = RoutedLinear.from_experts(nn.Linear(40, d_out),
                                          random_loras(40, d_out, [8] * 12), router)
        layer.requires_grad_(False).path = "sparse"
        x = torch.randn(2, 150, 40)
        assert layer.sparse_kernel(300, "cpu", x.dtype) == "compiled-gather"
        with torch.no_grad():
            native_out = layer(x)
            monkeypatch.setattr(container, "CPU_NATIVE_PREFILL", False)
            compiled_out = layer(x)
            monkeypatch.setattr(container, "CPU_NATIVE_PREFILL", True)
            layer.path = "dense"
            dense_out = layer(x)
        scale = float(dense_out.abs().max())
        torch.testing.assert_close(native_out, compiled_out, rtol=0, atol=1e-5 * scale)
        torch.testing.assert_close(native_out, dense_out, rtol=0, atol=1e-4 * scale)
    assert len(calls) == 2


def test_prefill_with_gradients_leaves_the_c_kernel(monkeypatch):
    """Where autograd records (x requires grad), the many-token path is the compiled one (the
    C kernel is not differentiable, and would fail this test), whose output has a gradient."""
    def unused(*args):
        raise AssertionError("the C kernel ran under autograd")

    monkeypatch.setattr(native, "add_chosen_delta_", unused)
    layer = layer_of(24, 40, 12)
    layer.path = "sparse"
    x = torch.randn(100, 24, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum() > 0
