"""Routed inference speed and memory on SmolLM2-135M with E synthetic rank-8 experts on all 7
linear modules of its 30 layers (issue 4): prefill and decode against the base model, the
dense reference path, PEFT's Arrow on the same adapters, peak RSS, library load time, and the
arithmetic that bounds what is achievable; and, with ``--compiled-prefill`` and
``--compiled-decode``, prefill and decoding (static KV cache) with both models under
``torch.compile`` (with CUDA graphs on CUDA).

    python benchmarks/routed_inference.py                      # CPU, fp32, E = 8 64 256 1024
    python benchmarks/routed_inference.py --experts --peft --load --compiled-decode 64
    python benchmarks/routed_inference.py --device cuda --dtype bf16 --out gpu.json
    python benchmarks/routed_inference.py --device cuda --dtype bf16 --experts --peft --load \
        --compiled-prefill 64 --compiled-decode 64

Each E runs in its own process (so peak RSS is per E). The base model has SmolLM2-135M's exact
architecture with random weights (speed does not depend on the values); the experts and router
vectors are random too. Writes JSON (``--out``) and a throughput-vs-E plot beside it.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from phatgoose.library.expert import LoraWeights
from phatgoose.models import linear_dims, resolve_target_modules
from phatgoose.routing import ArrowRouter, PhatgooseRouter, RoutedLinear, container
from phatgoose.routing.attach import set_module
from phatgoose.routing.container import share_projections
from phatgoose.routing.routers import top_right_singular_vector

SMOLLM2_135M = dict(  # SmolLM2-135M-Instruct's config
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
    eos_token_id=2, pad_token_id=2,
)
RANK, TOP_K, BATCH, SEQ, NEW_TOKENS = 8, 2, 8, 256, 64
# model weights' dtype; "bf16-autocast": fp32 weights run under bf16 autocast, as phatgoose's
# evaluation does by default on CPUs with AMX and on GPUs
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-autocast": torch.float32}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def base_model(device: str, dtype: torch.dtype | str) -> LlamaForCausalLM:
    """SmolLM2-135M with random weights, frozen. ``dtype``: a torch dtype or a ``DTYPES``
    name. For "bf16-autocast" the fp32 weights are marked as requiring grad, as phatgoose's
    evaluation marks them (``experts.loop.inference_autocast``), so that autocast casts each
    weight once per autocast region rather than on every forward."""
    torch.manual_seed(0)
    weights = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(device, weights).eval()
    model.requires_grad_(dtype == "bf16-autocast")
    return model


def multiply_adds(model, experts: int, shared: bool) -> dict[str, float]:
    """Per token: base linears + output head; router E x d_in per module (per distinct input
    when siblings share one matmul); top-k LoRA k r (d_in + d_out) per module."""
    dims = {n: linear_dims(model.get_submodule(n)) for n in resolve_target_modules(model)}
    base = sum(i * o for i, o in dims.values()) + model.lm_head.weight.numel()
    inputs = {n.rpartition(".")[0] + (".qkv" if n.endswith(("q_proj", "k_proj", "v_proj"))
                                      else ".gate_up" if n.endswith(("gate_proj", "up_proj"))
                                      else n): i for n, (i, _) in dims.items()}
    router = experts * (sum(inputs.values()) if shared else sum(i for i, _ in dims.values()))
    lora = TOP_K * RANK * sum(i + o for i, o in dims.values())
    return {"base": base, "router": router, "lora": lora, "ratio": (base + router + lora) / base}


def synthetic_experts(model, experts: int, seed: int = 1) -> dict[str, list[LoraWeights]]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in resolve_target_modules(model):
        d_in, d_out = linear_dims(model.get_submodule(name))
        A = torch.randn(experts, RANK, d_in, generator=generator) / d_in**0.5
        B = torch.randn(experts, d_out, RANK, generator=generator) * 0.02
        out[name] = [LoraWeights(A[e], B[e], 2.0) for e in range(experts)]
    return out


def route_synthetic(model, loras: dict[str, list[LoraWeights]], method: str) -> None:
    generator = torch.Generator().manual_seed(2)
    device = model.lm_head.weight.device
    for name in list(loras):  # popped as stacked: the experts are in memory once, as in route()
        weights = loras.pop(name)
        base = model.get_submodule(name)
        if method == "arrow":
            router = ArrowRouter(torch.stack([top_right_singular_vector(w.A, w.B)
                                              for w in weights]), TOP_K)
        else:
            router = PhatgooseRouter(torch.randn(len(weights), weights[0].A.shape[1],
                                                 generator=generator), TOP_K)
        set_module(model, name, RoutedLinear.from_experts(base, weights, router).to(device))
    share_projections({n: m for n, m in model.named_modules() if isinstance(m, RoutedLinear)})


def set_path(model, path: str) -> None:
    """Every routed module's path. "sparse" runs its default kernels (``sparse_kernel``),
    except that on CPU it keeps the sparse kernels at E <= 8 too (measured at every E)."""
    if path == "sparse":
        container.DENSE_MAX_EXPERTS = 0
    for m in model.modules():
        if isinstance(m, RoutedLinear):
            m.path = path


def progress(message: str) -> None:
    """A line on stderr, so that a child that times out shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def compare_logits(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Max difference relative to the largest logit, and how many tokens differ by more than
    1e-4 of it (a top-k choice that flips on a near-tie changes a token's logits visibly)."""
    scale = theirs.abs().max()
    per_token = (ours - theirs).abs().amax(-1) / scale
    return {"max_rel_diff": float(per_token.max()),
            "tokens_differing": int((per_token > 1e-4).sum()), "tokens": per_token.numel()}


def timed(fn, repeats: int, device: str, warm_up: bool = True) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (unless the caller warmed
    up already)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def decode_seconds_per_token(model, batch: int, device: str, repeats: int) -> float:
    prompt = torch.randint(3, 40000, (batch, 32), device=device)
    def run():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    return timed(run, repeats, device) / NEW_TOKENS


def decode_steps(model, forward, batch: int, device: str, steps: int = NEW_TOKENS) -> float:
    """Seconds per greedy decoding step of ``forward`` (the model, or it compiled) after an
    eager 32-token prefill, with a static KV cache (fixed shapes, as compiling needs)."""
    prompt = torch.randint(3, 40000, (batch, 32), device=device)
    cache = StaticCache(config=model.config, max_cache_len=32 + steps)
    logits = model(prompt, cache=cache, cache_position=torch.arange(32)).logits
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        token = logits[:, -1:].argmax(-1)
        logits = forward(token, cache=cache,
                         cache_position=torch.tensor([32 + i], device=device)).logits
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def compile_mode(device: str) -> str:
    """On CUDA, CUDA graphs (``reduce-overhead``): one launch replays the whole forward, which is
    what a routed forward of many small kernels needs there; on CPU, inductor's default."""
    return "reduce-overhead" if device == "cuda" else "default"


def base_then_routed(model, experts: int):
    """Yield "base"; then route ``model`` among E synthetic experts (top-2, sparse path), with
    torch.compile's caches reset, and yield "routed"."""
    yield "base"
    torch._dynamo.reset()
    route_synthetic(model, synthetic_experts(model, experts), "phatgoose")
    set_path(model, "sparse")
    yield "routed"


def compiled_prefill(experts: int, args) -> dict:
    """Prefill (8 x 256 tokens) time, eager and under torch.compile, base model and routed
    (top-2, sparse path), both compiled the same way, and the compiled routed logits against
    the eager ones."""
    from torch._dynamo.utils import counters

    device = args.device
    model = base_model(device, args.dtype)
    ids = torch.randint(3, 40000, (BATCH, SEQ), device=device)
    mode = compile_mode(device)
    result = {"experts": experts, "device": device, "dtype": args.dtype, "mode": mode,
              "torch": torch.__version__}
    with torch.no_grad():
        for name in base_then_routed(model, experts):
            counters.clear()
            progress(f"{name}: eager")
            eager = model(ids, use_cache=False).logits.float()
            result[f"{name}_eager_s"] = timed(lambda: model(ids, use_cache=False), args.repeats,
                                              device)
            compiled = torch.compile(model, dynamic=False, mode=mode)
            progress(f"{name}: compiling ({mode})")
            start = time.perf_counter()
            for _ in range(3):  # CUDA graphs are recorded on the second or third call
                logits = compiled(ids, use_cache=False).logits.float()
            if device == "cuda":
                torch.cuda.synchronize()
            result[f"{name}_compile_s"] = time.perf_counter() - start
            result[f"{name}_graph_breaks"] = sum(counters["graph_break"].values())
            result[f"{name}_compiled_vs_eager"] = compare_logits(logits, eager)
            progress(f"{name}: timing compiled")
            result[f"{name}_compiled_s"] = timed(lambda c=compiled: c(ids, use_cache=False),
                                                 args.repeats, device)
    result["rss_gib"] = peak_rss_gib()
    return result


def compiled_decode(experts: int, args) -> dict:
    """Decode time per token, eager and under torch.compile, base model and routed (top-2,
    sparse path): like for like, both models compiled the same way."""
    device = args.device
    model = base_model(device, args.dtype)
    result = {"experts": experts, "device": device, "dtype": args.dtype,
              "mode": compile_mode(device), "torch": torch.__version__}
    with torch.no_grad():
        for name in base_then_routed(model, experts):
            compiled = torch.compile(model, fullgraph=True, dynamic=False,
                                     mode=compile_mode(device))
            for b in args.decode_batches:
                decode_steps(model, model, b, device, 4)  # warm-up
                result[f"{name}_eager_b{b}_s"] = min(decode_steps(model, model, b, device)
                                                     for _ in range(args.repeats))
                progress(f"{name}: compiling decode, batch {b}")
                start = time.perf_counter()
                decode_steps(model, compiled, b, device, 3)  # compiles (and records) batch b
                result[f"{name}_compile_b{b}_s"] = time.perf_counter() - start
                result[f"{name}_compiled_b{b}_s"] = min(decode_steps(model, compiled, b, device)
                                                        for _ in range(args.repeats))
    result["rss_gib"] = peak_rss_gib()
    return result


def one(experts: int, args) -> dict:
    """Every measurement for one E, in this process."""
    device = args.device
    model = base_model(device, args.dtype)
    ids = torch.randint(3, 40000, (BATCH, SEQ), device=device)
    result = {"experts": experts, "device": device, "dtype": args.dtype,
              "threads": torch.get_num_threads(),
              "multiply_adds": multiply_adds(model, experts, shared=False),
              "multiply_adds_shared_router": multiply_adds(model, experts, shared=True)}
    with torch.no_grad():
        result["base_prefill_s"] = timed(lambda: model(ids), args.repeats, device)
        result["base_decode_s_per_token"] = {
            b: decode_seconds_per_token(model, b, device, args.repeats) for b in (1, 8)}
        result["rss_base_gib"] = peak_rss_gib()
        start = time.perf_counter()
        route_synthetic(model, synthetic_experts(model, experts), "phatgoose")
        result["route_s"] = time.perf_counter() - start
        set_path(model, "sparse")  # measured at every E, also where dense is the default
        result["library_gib"] = library_gib(model)
        sparse_logits = model(ids).logits
        result["sparse_prefill_s"] = timed(lambda: model(ids), args.repeats, device)
        result["sparse_decode_s_per_token"] = {
            b: decode_seconds_per_token(model, b, device, args.repeats) for b in (1, 8)}
        result["rss_routed_gib"] = peak_rss_gib()
        set_path(model, "dense")
        dense_logits = model(ids).logits
        result["dense_prefill_s"] = timed(lambda: model(ids), 1 if experts > 256 else
                                          args.repeats, device)
        result["sparse_vs_dense_max_rel_diff"] = float(
            (sparse_logits - dense_logits).abs().max() / dense_logits.abs().max())
    return result


def write_peft_adapters(loras: dict[str, list[LoraWeights]], root: Path) -> list[str]:
    experts = len(next(iter(loras.values())))
    paths = []
    for e in range(experts):
        out = root / f"expert{e}"
        out.mkdir(parents=True)
        tensors = {}
        for name, weights in loras.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = weights[e].A.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = weights[e].B.contiguous()
        save_file(tensors, out / "adapter_model.safetensors")
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
            "target_modules": sorted({n.rpartition(".")[2] for n in loras}),
            "lora_dropout": 0.0, "bias": "none"}))
        paths.append(str(out))
    return paths


def peft_arrow_injected(model, loras: dict[str, list[LoraWeights]], arrow_config):
    """What ``create_arrow_model`` builds, without its adapter loading, whose cost grows as E^2:
    each ``load_adapter`` walks every module of the model, and each adapter adds modules. Here
    PEFT's own ``LoraLayer.update_layer`` adds each adapter to each layer (one walk in all), the
    weights are copied in, and the Arrow router is added as ``create_arrow_model`` adds it. The
    forward is PEFT's Arrow forward, unchanged."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.arrow import TASK_ADAPTER_PREFIX

    targets = sorted({n.rpartition(".")[2] for n in loras})
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=False)
    names = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(next(iter(loras.values()))))]
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if isinstance(m, LoraLayer)}
    assert set(layers) == set(loras), "the injected layers are not the experts' modules"
    with torch.no_grad():
        for i, name in enumerate(names):
            if i:
                peft_model.peft_config[name] = config
            for module, layer in layers.items():
                if i:
                    layer.update_layer(name, RANK, 2 * RANK, config=config)
                layer.lora_A[name].weight.copy_(loras[module][i].A)
                layer.lora_B[name].weight.copy_(loras[module][i].B)
    arrow_config.task_adapter_names, arrow_config.gks_adapter_names = names, []
    peft_model.add_adapter("arrow_router", LoraConfig(arrow_config=arrow_config,
                                                      target_modules=targets, r=RANK))
    peft_model.set_adapter("arrow_router")
    return peft_model


def exact_peft_prototypes() -> None:
    """PEFT finds each Arrow prototype by 15 power iterations from a random start, which leaves
    errors of about 1e-3 and so different outputs; give it the exact singular vector (as
    phatgoose computes it) so that the outputs can be compared."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    ArrowLoraLinearLayer.top_right_singular_vec_from_BA = (
        lambda self, A, B, iters=15, eps=1e-8: top_right_singular_vector(A, B))


def peft_arrow(experts: int, args) -> dict:
    """PEFT's Arrow vs phatgoose's arrow on the same adapters, top-k, dtype. Prototypes are
    built once, before the timed forwards."""
    from peft import ArrowConfig, create_arrow_model

    exact_peft_prototypes()
    dtype, device = DTYPES[args.dtype], args.device
    ids = torch.randint(3, 40000, (BATCH, SEQ), device=device)
    model = base_model(device, args.dtype)
    loras = synthetic_experts(model, experts)
    result = {"experts": experts}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        if args.peft_build == "load":  # injected adapters need no files
            paths = write_peft_adapters(loras, Path(tmp))
            progress(f"{experts} PEFT adapters written")
        route_synthetic(model, loras, "arrow")
        ours = model(ids).logits  # also the warm-up
        result["phatgoose_arrow_prefill_s"] = timed(lambda: model(ids), args.repeats, device,
                                                    warm_up=False)
        progress(f"phatgoose arrow: {result['phatgoose_arrow_prefill_s']:.1f} s per prefill")
        model = loras = None  # free our copy before PEFT loads its own
        start = time.perf_counter()
        arrow_config = ArrowConfig(top_k=TOP_K, router_temperature=1.0)
        if args.peft_build == "inject":  # the same experts again (seeded), into PEFT's layers
            peft_base = base_model(device, args.dtype)
            peft_model = peft_arrow_injected(peft_base, synthetic_experts(peft_base, experts),
                                             arrow_config)
        else:
            peft_model = create_arrow_model(base_model(device, args.dtype), paths, arrow_config)
        result["peft_build"] = args.peft_build
        peft_model.to(device, dtype).eval()
        # PEFT froze the base again: mark it as base_model does, so that both models get
        # autocast's weight cache under bf16-autocast
        peft_model.requires_grad_(args.dtype == "bf16-autocast")
        result["peft_load_s"] = time.perf_counter() - start
        progress(f"PEFT Arrow model built ({args.peft_build}): {result['peft_load_s']:.1f} s")
        try:
            start = time.perf_counter()
            theirs = peft_model(input_ids=ids).logits  # also the warm-up
            progress(f"PEFT first prefill: {time.perf_counter() - start:.1f} s")
            result["peft_arrow_prefill_s"] = timed(lambda: peft_model(input_ids=ids),
                                                   args.repeats, device, warm_up=False)
            result |= compare_logits(ours, theirs)
        except torch.OutOfMemoryError as err:
            result["peft_error"] = f"out of memory: {err}".splitlines()[0]
    result["rss_gib"] = peak_rss_gib()
    return result


def library_gib(model) -> float:
    """GiB of the routed modules' expert stacks and routing vectors."""
    return sum(b.numel() * b.element_size() for m in model.modules()
               if isinstance(m, RoutedLinear)
               for b in (m.lora_A, m.lora_B, m.router.vectors)) / 2**30


def synthetic_library(experts: int, args) -> Path:
    """A real library of E synthetic experts (PEFT adapters and gates) under the workdir,
    written once and reused."""
    from phatgoose.library import ExpertLibrary
    from phatgoose.library.expert import EXPERT_META, GATES, write_json
    from phatgoose.models import fingerprint

    root = Path(args.workdir) / f"library-{experts}"
    if (root / "manifest.json").exists():
        return root
    model = base_model("cpu", torch.float32)
    loras = synthetic_experts(model, experts)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_peft_adapters(loras, Path(tmp))
        for path in paths:
            save_file({n: torch.randn(w[0].A.shape[1]) for n, w in loras.items()},
                      Path(path) / GATES)
            write_json(Path(path) / EXPERT_META, {
                "task": Path(path).name, "base_model": "smollm2-135m-random",
                "base_fingerprint": fingerprint(model), "metrics": {}})
        ExpertLibrary.build(root, [Path(p) for p in paths])
    return root


def library_load(experts: int, args) -> dict:
    """Time routing a model with a library of E experts on disk: first without the stack cache
    (read every expert's safetensors once, stack per module, write the cache), then with it."""
    from phatgoose.library import ExpertLibrary
    from phatgoose.library.library import STACKS
    from phatgoose.routing import route, unroute

    root = synthetic_library(experts, args)
    model = base_model("cpu", torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    with torch.no_grad():
        start = time.perf_counter()
        model(input_ids=ids)
        base_forward = time.perf_counter() - start
    shutil.rmtree(root / STACKS, ignore_errors=True)
    start = time.perf_counter()  # no stacked cache yet: read every expert, stack, write it
    route(model, ExpertLibrary(root), method="phatgoose", top_k=TOP_K)
    first = time.perf_counter() - start
    unroute(model)
    start = time.perf_counter()  # what every later load costs
    route(model, ExpertLibrary(root), method="phatgoose", top_k=TOP_K)
    loaded = time.perf_counter() - start
    with torch.no_grad():  # the stacks are memory-mapped: the first forward pages them in
        start = time.perf_counter()
        model(input_ids=ids)
        first_forward = time.perf_counter() - start
    return {"experts": experts, "first_load_and_route_s": first, "load_and_route_s": loaded,
            "first_forward_s": first_forward, "base_first_forward_s": base_forward,
            "rss_gib": peak_rss_gib()}


def stack_library(experts: int, args) -> dict:
    """Write the library of E experts and its stack cache (what ``memory`` then loads)."""
    from phatgoose.library import ExpertLibrary

    library = ExpertLibrary(synthetic_library(experts, args))
    start = time.perf_counter()
    library.stacked()
    return {"experts": experts, "stack_s": time.perf_counter() - start,
            "rss_gib": peak_rss_gib()}


def memory(experts: int, args) -> dict:
    """Peak RSS of a process that routes with a library of E experts the way users do
    (``route`` from the library's stack cache), against the base model's process plus the
    library's tensors: both after one 8 x 256-token prefill, the routed one on the sparse path."""
    from phatgoose.library import ExpertLibrary
    from phatgoose.routing import route

    library = ExpertLibrary(synthetic_library(experts, args))  # built by ``stack_library``
    model = base_model("cpu", torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    with torch.no_grad():
        model(input_ids=ids)
        rss_base = peak_rss_gib()
        route(model, library, method="phatgoose", top_k=TOP_K)
        set_path(model, "sparse")
        model(input_ids=ids)
    rss, library = peak_rss_gib(), library_gib(model)
    return {"experts": experts, "rss_base_gib": rss_base, "library_gib": library,
            "rss_routed_gib": rss, "ratio": rss / (rss_base + library)}


def child(flag: str, experts: int, args) -> dict:
    cmd = [sys.executable, __file__, flag, str(experts), "--device", args.device, "--dtype",
           args.dtype, "--repeats", str(args.repeats), "--workdir", args.workdir,
           "--child-timeout", str(args.child_timeout), "--peft-build", args.peft_build,
           "--decode-batches", *map(str, args.decode_batches)]
    print("$", " ".join(cmd[1:]), flush=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr or ""
        reached = [line for line in stderr.splitlines() if line.startswith("[")]
        return {"experts": experts, "error": f"timed out after {args.child_timeout} s",
                "progress": reached}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"experts": experts, "error": f"exit {done.returncode}: {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def eager_and_compiled_cells(r: dict, suffix: str) -> str:
    """Table cells of base and routed times (ms), eager then compiled, each pair with its
    routed / base ratio, from ``r``'s ``{base,routed}_{eager,compiled}<suffix>`` seconds."""
    be, re_, bc, rc = (r[f"{m}{suffix}"] * 1e3 for m in (
        "base_eager", "routed_eager", "base_compiled", "routed_compiled"))
    return (f"{be:.1f} | {re_:.1f} | {re_ / be:.2f}x | {bc:.1f} | {rc:.1f} "
            f"| **{rc / bc:.2f}x**")


def report(results: dict) -> None:
    print("\n| E | multiply-adds vs base (shared router) | prefill base (s) | dense | sparse "
          "| sparse / base throughput | decode b1 sparse/base | decode b8 sparse/base "
          "| peak RSS (GiB) | library (GiB) | sparse vs dense |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["routed"]:
        if "error" in r:
            print(f"| {r['experts']} | {r['error']} |")
            continue
        decode = [r["sparse_decode_s_per_token"][b] / r["base_decode_s_per_token"][b]
                  for b in ("1", "8")]
        print(f"| {r['experts']} | {r['multiply_adds']['ratio']:.2f}x "
              f"({r['multiply_adds_shared_router']['ratio']:.2f}x) | {r['base_prefill_s']:.2f} "
              f"| {r['dense_prefill_s']:.2f} | {r['sparse_prefill_s']:.2f} "
              f"| {r['base_prefill_s'] / r['sparse_prefill_s']:.2f} | {decode[0]:.2f}x "
              f"| {decode[1]:.2f}x | {r['rss_routed_gib']:.2f} | {r['library_gib']:.2f} "
              f"| {r['sparse_vs_dense_max_rel_diff']:.1e} |")
    if results.get("peft"):
        print("\n| E | phatgoose arrow (s) | PEFT arrow (s) | speed-up | max rel diff "
              "| tokens differing by > 1e-4 |")
        print("|---:|---:|---:|---:|---:|---:|")
        for r in results["peft"]:
            if "peft_arrow_prefill_s" in r:
                print(f"| {r['experts']} | {r['phatgoose_arrow_prefill_s']:.2f} "
                      f"| {r['peft_arrow_prefill_s']:.2f} "
                      f"| {r['peft_arrow_prefill_s'] / r['phatgoose_arrow_prefill_s']:.1f}x "
                      f"| {r['max_rel_diff']:.1e} "
                      f"| {r.get('tokens_differing', '-')} of {r.get('tokens', '-')} |")
            else:
                reached = f" (last step reached: {r['progress'][-1]})" if r.get("progress") else ""
                print(f"| {r['experts']} | {r.get('phatgoose_arrow_prefill_s', '-')} "
                      f"| {r.get('peft_error') or r.get('error')}{reached} | | | |")
    if results.get("compiled_decode"):
        print("\n| E | batch | base eager (ms/token) | routed eager | ratio | base compiled "
              "| routed compiled | ratio | compile s (base, routed) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results["compiled_decode"]:
            if "error" in r:
                print(f"| {r['experts']} | {r['error']} |")
                continue
            for b in (b for b in (1, 8) if f"base_eager_b{b}_s" in r):
                print(f"| {r['experts']} | {b} | {eager_and_compiled_cells(r, f'_b{b}_s')} "
                      f"| {r[f'base_compile_b{b}_s']:.0f}, {r[f'routed_compile_b{b}_s']:.0f} |")
    if results.get("compiled_prefill"):
        print("\n| E | mode | base eager (ms) | routed eager | routed / base | base compiled "
              "| routed compiled | routed / base | compile s (base, routed) | graph breaks "
              "| routed compiled vs eager |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results["compiled_prefill"]:
            if "error" in r:
                print(f"| {r['experts']} | {r['error']} |")
                continue
            diff = r["routed_compiled_vs_eager"]
            print(f"| {r['experts']} | {r['mode']} | {eager_and_compiled_cells(r, '_s')} "
                  f"| {r['base_compile_s']:.0f}, {r['routed_compile_s']:.0f} "
                  f"| {r['base_graph_breaks']}, {r['routed_graph_breaks']} "
                  f"| {diff['max_rel_diff']:.1e} ({diff['tokens_differing']} tokens) |")
    for r in results.get("memory", []):
        if "error" in r:
            print(f"\nmemory at E = {r['experts']}: {r['error']}")
            continue
        print(f"\nmemory at E = {r['experts']}: peak RSS routed {r['rss_routed_gib']:.2f} GiB "
              f"against base {r['rss_base_gib']:.2f} + library {r['library_gib']:.2f} GiB: "
              f"**{r['ratio']:.2f}x**")
    for r in results.get("load", []):
        print(f"\nlibrary of {r['experts']} experts: first load + route (stacks and caches "
              f"them) {r.get('first_load_and_route_s', float('nan')):.1f} s; later loads + route "
              f"{r.get('load_and_route_s', float('nan')):.2f} s; first routed forward "
              f"{r.get('first_forward_s', float('nan')):.2f} s (base model's first forward "
              f"{r.get('base_first_forward_s', float('nan')):.2f} s) {r.get('error', '')}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["routed"] if "error" not in r]
    if not rows:
        return
    E = [r["experts"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(E, [r["base_prefill_s"] / r["sparse_prefill_s"] for r in rows], "o-",
            label="phatgoose sparse path")
    ax.plot(E, [r["base_prefill_s"] / r["dense_prefill_s"] for r in rows], "s--",
            label="dense reference path")
    ax.plot(E, [1 / r["multiply_adds"]["ratio"] for r in rows], ":", color="gray",
            label="bound: 1 / multiply-add ratio")
    peft = {r["experts"]: r for r in results.get("peft", []) if "peft_arrow_prefill_s" in r}
    base = {r["experts"]: r["base_prefill_s"] for r in rows}
    pe = [e for e in peft if e in base]
    if pe:
        ax.plot(pe, [base[e] / peft[e]["peft_arrow_prefill_s"] for e in pe], "^-",
                label="PEFT Arrow")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts E")
    ax.set_ylabel("prefill throughput / base model")
    first = rows[0] if rows else {"device": "?", "dtype": "?"}
    ax.set_title(f"SmolLM2-135M, rank 8, top-2, batch {BATCH}x{SEQ} "
                 f"({first['device']}, {first['dtype']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="*", default=[8, 64, 256, 1024])
    parser.add_argument("--peft", type=int, nargs="*", default=[8, 64, 256],
                        help="E at which to compare with PEFT's Arrow")
    parser.add_argument("--peft-build", choices=["load", "inject"], default="load",
                        help="build PEFT's Arrow model with create_arrow_model (load: its "
                             "loading grows as E^2), or by adding the adapters to PEFT's "
                             "layers directly (inject: the same model, built in linear time)")
    parser.add_argument("--load", type=int, nargs="*", default=[256],
                        help="E at which to time loading a library from disk")
    parser.add_argument("--memory", type=int, nargs="*", default=[],
                        help="E at which to measure peak RSS routing from a library on disk")
    parser.add_argument("--compiled-decode", type=int, nargs="*", default=[],
                        help="E at which to time decoding under torch.compile")
    parser.add_argument("--compiled-prefill", type=int, nargs="*", default=[],
                        help="E at which to time prefill under torch.compile (CUDA graphs on "
                             "CUDA)")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8],
                        choices=[1, 8], help="batch sizes of the compiled decoding")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "phatgoose-bench"))
    parser.add_argument("--out", default="routed_inference.json")
    parser.add_argument("--child-timeout", type=int, default=3600,
                        help="seconds allowed for each E's process")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--peft-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--load-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compiled-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefill-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stack-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag, fn in (("one", one), ("peft_one", peft_arrow), ("load_one", library_load),
                     ("compiled_one", compiled_decode), ("prefill_one", compiled_prefill),
                     ("stack_one", stack_library),
                     ("memory_one", memory)):
        if getattr(args, flag) is not None:
            with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                                enabled=args.dtype == "bf16-autocast"):
                print(json.dumps(fn(getattr(args, flag), args)))
            return
    results = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
               "routed": [], "peft": [], "load": [], "compiled_prefill": [],
               "compiled_decode": [], "memory": []}
    for key, flag, values in (("routed", "--one", args.experts), ("peft", "--peft-one", args.peft),
                              ("load", "--load-one", args.load),
                              ("compiled_prefill", "--prefill-one", args.compiled_prefill),
                              ("compiled_decode", "--compiled-one", args.compiled_decode),
                              ("memory", "--memory-one", args.memory)):
        for e in values:
            if key == "memory":  # the library and its stack cache are built in their own process
                results.setdefault("stack", []).append(child("--stack-one", e, args))
            results[key].append(child(flag, e, args))
            print(json.dumps(results[key][-1]), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # kept if cut short
    report(results)
    plot(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
