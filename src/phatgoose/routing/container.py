"""The routed module: a base linear layer plus E LoRA experts mixed per token by a router."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from phatgoose.library.expert import LoraWeights, stack_experts
from phatgoose.models import base as models_base
from phatgoose.models import linear_dims
from phatgoose.routing import fused, native
from phatgoose.routing.routers import (
    ArrowRouter,
    PhatgooseRouter,
    TopKRouter,
    arrow_scores,
    autocast_off,
    phatgoose_scores,
    scoring,
    scoring_dtype,
    scoring_matmul,
    top_k,
    top_k_weights,
)

# Below this many (token, expert) pairs the sparse path gathers the chosen experts' factors
# (decoding); above it, on CPU, it runs a compiled gather-and-reduce or sparse matmuls (in fp32
# or fp64), else pairs are sorted by expert and run as grouped matmuls (prefill).
GATHER_MAX_PAIRS = 64
# Up to this many experts (off GPUs), computing every expert (one concatenated LoRA of rank
# E r) costs about what the sparse path's routing costs, so the sparse path does that too.
# Measured on CPU in fp32 (8 x 256-token prefill): the sparse kernels 4% faster at E = 8 and
# 13% at E = 12; computing every expert 1.5x faster at E = 4 for rank classification.
DENSE_MAX_EXPERTS = 8
# Many tokens on CPU never take the grouped path, whatever the model's dtype: torch's CPU
# grouped matmul and index_add_ are scalar loops in bf16 (measured 8x slower than the base
# model's forward at E = 12). Tests turn this off to reach the grouped path on CPU.
CPU_SPARSE_MATMULS = True
# Many tokens on CPU, routed by PHATGOOSE or Arrow, run as one compiled function per layer
# shape (``compiled_routed_output``): the scores' scale, top-k, softmax, a gather-and-reduce
# for the delta and its addition to the base output, which inductor fuses into a few C++ loops.
# The delta alone was 1.5-1.9x faster than torch's sparse kernels (``_add_sparse_delta``) at
# 2048 tokens, E = 64 and 256 (benchmarks/cpu_delta.py). It needs a C++ compiler: where it
# cannot compile, the first failure turns it off for the process, with a warning, and the
# sparse kernels run instead.
CPU_COMPILED_DELTA = True
# Where the model computes in bf16 (autocast, or bf16 weights) on a CPU with native bf16
# matmuls (AMX, AVX512-BF16), the router's matmul for those many tokens runs in bf16 too: 4.8x
# faster than fp32 on an AMD EPYC with AVX512-BF16. Its bf16 scores (8 bits of mantissa) would
# flip near-tied choices, so they only pick each token's k + EXTRA_CANDIDATES best experts,
# whose scores are then computed again in fp32 (``routed_output``), the top k taken from those.
# None: where bf16 matmuls are native (``models.bf16_is_faster``); tests set it.
BF16_ROUTER_MATMUL: bool | None = None
EXTRA_CANDIDATES = 2
# A few tokens (decoding) on CPU, in fp32 or bf16 (bf16 autocast too), routed by PHATGOOSE or
# Arrow: the router, top-k, softmax and delta as one C function (``native.add_routed_delta_``,
# computing in fp32), built at first use by the system's C compiler; where it cannot be built,
# the first failure turns it off for the process, with a warning, and torch's ops run
# (``_add_gathered_delta``).
CPU_NATIVE_DECODE = True
# Many tokens on CPU in fp32 (prefill), routed by PHATGOOSE or Arrow: the compiled function
# chooses the experts (``compiled_routed_choices``: scores, top-k, softmax) and the C kernel
# adds their delta (``native.add_chosen_delta_``), the (token, slot) pairs grouped by expert
# for A and the tokens streamed past blocks of B: the delta 1.2-2x faster than inductor's
# gather-and-reduce at E = 64 (docs/PERFORMANCE.md). Where the kernel cannot be built, both
# C paths turn off (one warning) and ``compiled_routed_output`` runs.
CPU_NATIVE_PREFILL = True
# what torch.compile raises when it cannot build a kernel (no compiler, a broken toolchain)
COMPILE_ERRORS = (torch._dynamo.exc.BackendCompilerFailed, OSError)
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
# On a GPU the sparse path's kernel depends on how the forward is launched (measured on an
# H200 in bf16, SmolLM2's 210 modules, E = 8 to 256; docs/PERFORMANCE.md):
# - launched op by op (eager): the fused Triton kernel, router, top-k and LoRA in one launch
#   per module (``fused.add_routed_delta_``; PHATGOOSE and Arrow routers, up to
#   FUSED_MAX_EXPERTS experts, with Triton), at every size: 2.7x faster than the unfused
#   kernels at one token, 5x at 2048 (E = 64), and 2.4-4x faster than the dense path;
# - replayed as a CUDA graph (``torch.compile``, ``torch.cuda.graph``), where launching costs
#   nothing: the fused kernel for a decoding step (up to FUSED_MAX_TOKENS tokens, one token
#   per program: 2.3x faster than the unfused kernels at one token and 3.7x at 8, E = 64),
#   then every expert's LoRA as the dense path computes it, up to GPU_DENSE_MAX_EXPERTS: a
#   few large matmuls, 1.5x faster than the fused kernel at 2048 tokens (E = 64).
# Where the fused kernel does not apply (no Triton, fp64, other routers, more experts), a GPU
# computes every expert up to GPU_DENSE_MAX_EXPERTS, eager too: faster than the unfused sparse
# kernels at every size measured (eager, E = 256: 1.1-1.8x; E = 1024, prefill: 21x).
# FUSED_ROUTING = False turns the fused kernel off; FUSED_ON_CPU runs it on CPU too (under
# Triton's interpreter: the tests).
FUSED_ROUTING = True
FUSED_ON_CPU = False
FUSED_MAX_TOKENS = fused.DECODE_TOKENS
GPU_DENSE_MAX_EXPERTS = 1024


def _native_unavailable(err: Exception) -> None:
    """The C kernel cannot be built here: both its paths off for the process, with a warning."""
    global CPU_NATIVE_DECODE, CPU_NATIVE_PREFILL
    CPU_NATIVE_DECODE = CPU_NATIVE_PREFILL = False
    warnings.warn(f"the native routing kernel cannot be built here ({err}); routing with "
                  "torch's ops instead", RuntimeWarning, stacklevel=4)


class RoutedLinear(nn.Module):
    """y = base(x) + sum_e w_e(x) * s_e * B_e A_e x, with w = router(x) of shape (..., E).

    The experts come stacked and pre-scaled: ``lora_A`` (E, r, d_in) and ``lora_B`` (E, r, d_out)
    (``stack_experts``, or ``ExpertLibrary.stacked``); ``from_experts`` stacks a list.

    Two paths compute the same thing:
    - ``dense`` (the reference; the only one for dense routers such as uniform mixing or gate
      training): every expert's r hidden units, scaled by its weight; one concatenated LoRA of
      rank E r. Never forms a tokens x experts x d_out tensor.
    - ``sparse`` (the default for ``TopKRouter``s): only the k chosen experts run per token,
      k r (d_in + d_out) multiply-adds, by the kernel ``sparse_kernel`` picks for the tokens,
      device and dtype: with few tokens, gathering their factors (in the stacks' dtype,
      outside autocast); with many, on CPU, one compiled function that routes and adds a
      gather-and-reduce delta (``compiled_routed_output``; in bf16, from a bf16 router matmul
      that picks candidates; else sparse matmuls; a bf16 model's delta in fp32), elsewhere
      grouped matmuls over (token, slot) pairs sorted by expert. Where it is faster, the dense
      path's matmuls instead (up to ``DENSE_MAX_EXPERTS`` experts on CPU; on a GPU, more than
      one token replayed as a CUDA graph). On a GPU, router, top-k and LoRA otherwise run as
      one Triton kernel (``routing.fused``).
    Top-k routers project the input with one matmul, shared with sibling modules that read the
    same input (see ``SharedProjection``).

    A routed model compiles with ``torch.compile`` (no graph breaks in this module); for
    decoding, that fuses the routing's small operations (see docs/PERFORMANCE.md).
    """

    def __init__(
        self, base: nn.Module, lora_A: Tensor, lora_B: Tensor, router: nn.Module
    ) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base)
        if lora_A.ndim != 3 or lora_A.shape[0] == 0 or lora_B.shape != (
                *lora_A.shape[:2], d_out) or lora_A.shape[2] != d_in:
            raise ValueError(
                f"expert stacks of shapes {tuple(lora_A.shape)} and {tuple(lora_B.shape)} do not "
                f"fit a {d_in} -> {d_out} layer: expected (E, r, {d_in}) and (E, r, {d_out})"
            )
        self.base = base
        self.router = router
        dtype = next(base.parameters()).dtype
        A, B, rank = lora_A.to(dtype), lora_B.to(dtype), lora_A.shape[1]
        self.num_experts, self.rank, self.d_out = A.shape[0], rank, d_out
        self.register_buffer("lora_A", A, persistent=False)
        self.register_buffer("lora_B", B, persistent=False)
        self.path: Literal["sparse", "dense"] = (
            "sparse" if isinstance(router, TopKRouter) else "dense")
        self.shared: tuple[SharedProjection, int] | None = None
        # the C kernel's packed arguments and the router settings they hold: _native_arguments
        self._native: tuple[native.Prepared, tuple[int, dict]] | None = None

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the C kernel's packed arguments (addresses of this
        module's tensors, not the copy's); they are packed again at first use."""
        return {**super().__getstate__(), "_native": None}

    @classmethod
    def from_experts(
        cls, base: nn.Module, experts: list[LoraWeights], router: nn.Module
    ) -> RoutedLinear:
        """Stack ``experts`` (see ``stack_experts``) and route among them."""
        if not experts:
            raise ValueError("a routed module needs at least one expert")
        return cls(base, *stack_experts(experts, next(base.parameters()).dtype), router)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (some models read it, e.g. T5 for its dtype)."""
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.path == "dense":
            return self.base(x) + self.dense_delta(x)
        return self.sparse_forward(x)

    def mixing_weights(self, x: Tensor) -> Tensor:
        """The router's weights (..., E), zero for experts it does not use."""
        if not isinstance(self.router, TopKRouter):
            return self.router(x)
        x_scoring, projection = self.routing_inputs(x)
        return self.router.dense_weights(projection, x_scoring)

    def dense_delta(self, x: Tensor) -> Tensor:
        """sum_e w_e (x A_e^T) B_e as two plain matmuls of one rank E r LoRA (the stacks seen
        as (E r, d_in) and (E r, d_out)), each expert's r hidden units scaled by its weight."""
        weights = self.mixing_weights(x).to(x.dtype)  # (..., E)
        hidden = F.linear(x, self.lora_A.view(-1, self.lora_A.shape[-1]))  # (..., E r)
        hidden = (hidden.unflatten(-1, (self.num_experts, self.rank)) * weights.unsqueeze(-1))
        return hidden.flatten(-2) @ self.lora_B.view(-1, self.d_out)

    def routing_inputs(self, x: Tensor, bf16: bool = False) -> tuple[Tensor, Tensor]:
        """``x`` in the routing precision (``scoring``) and the router's projection of it,
        both shared with the sibling modules that read the same input (converted once). With
        ``bf16``: ``x`` as it is and an approximate projection, a bf16 matmul
        (``bf16_projection``)."""
        # Under torch.compile each module projects its own input: the sharing's identity check
        # would break the graph.
        if self.shared is not None and not torch.compiler.is_compiling():
            group, index = self.shared
            return group.inputs(index, x, bf16)
        if bf16:
            return x, bf16_projection(x, self.router.vectors)
        x_scoring = scoring(x)
        return x_scoring, self.router.project(x_scoring)

    def bf16_candidates(self, x: Tensor) -> bool:
        """Whether the router's matmul of ``x`` (many tokens on CPU) runs in bf16 and only
        picks candidates (``BF16_ROUTER_MATMUL``): where the model computes in bf16."""
        in_bf16 = x.dtype == torch.bfloat16 or (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        if not in_bf16 or self.num_experts <= self.router.top_k + EXTRA_CANDIDATES:
            return False
        return (models_base.bf16_is_faster(torch.device("cpu")) if BF16_ROUTER_MATMUL is None
                else BF16_ROUTER_MATMUL)

    def sparse_forward(self, x: Tensor) -> Tensor:
        out = self.base(x).contiguous()  # added into in place, through a flat view
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, self.d_out)
        kernel = self.sparse_kernel(flat_x.shape[0], flat_x.device.type, flat_x.dtype)
        if kernel == "fused":
            if self._add_fused_delta(flat_x, flat_out):
                return out
            # Triton could not run it here (and it is now off): choose again
            kernel = self.sparse_kernel(flat_x.shape[0], flat_x.device.type, flat_x.dtype)
        if kernel == "dense":
            return out + self.dense_delta(x)
        if kernel == "native":
            if self._add_native_delta(flat_x, flat_out):
                return out
            kernel = "gather"  # see _add_native_delta
        if kernel == "compiled-gather":
            candidates = self.bf16_candidates(flat_x)
            x_routing, projection = self.routing_inputs(x, bf16=candidates)
            x_routing = x_routing.reshape(flat_x.shape)
            projection = projection.reshape(flat_x.shape[0], -1)
            if not candidates and self._add_chosen_delta(x_routing, projection, flat_out):
                return out
            routed = (self._compiled_output(x_routing, projection, flat_out, candidates)
                      if CPU_COMPILED_DELTA else None)  # off if the choices could not compile
            if routed is not None:
                return routed.view(out.shape)
            kernel = "sparse-matmul"  # it could not be built here
        # x in fp32 (or fp64): the router and a bf16 model's CPU delta read it
        x_scoring, projection = self.routing_inputs(x)
        x_scoring = x_scoring.reshape(flat_x.shape)
        weights, experts = self.router.select(projection.reshape(flat_x.shape[0], -1), x_scoring)
        n, k = experts.shape
        if kernel == "sparse-matmul":  # a bf16 model's delta in fp32, like x_scoring
            return self._add_sparse_delta(x_scoring, out, flat_out, weights, experts)
        if kernel == "gather":  # few tokens: gather the chosen experts' factors
            self._add_gathered_delta(flat_x, x_scoring, flat_out, weights, experts)
            return out
        weights = weights.to(x.dtype)
        # many tokens: (token, slot) pairs sorted by expert, one grouped matmul per factor,
        # each pair's output added into its token's row. The group ends come from a search in
        # the sorted experts, not bincount, whose output size waits on the device (a host
        # sync per module on a GPU, a graph break under torch.compile).
        sorted_experts, order = experts.reshape(-1).sort(stable=True)
        token = order // k
        ends = torch.searchsorted(sorted_experts, torch.arange(
            self.num_experts, device=experts.device), right=True)
        hidden = grouped_matmul(flat_x.index_select(0, token), self.lora_A.transpose(1, 2),
                                ends)
        hidden = hidden * weights.reshape(-1, 1).index_select(0, order)
        flat_out.index_add_(0, token, grouped_matmul(hidden, self.lora_B, ends))
        return out

    def _add_fused_delta(self, flat_x: Tensor, flat_out: Tensor) -> bool:
        """flat_out += the delta by the fused kernel; False if Triton could not compile or
        launch it on this device (an unsupported GPU, say), which then turns it off for the
        process, with a warning, rather than failing the forward. Such errors come before the
        kernel writes anything."""
        global FUSED_ROUTING
        try:
            fused.add_routed_delta_(
                flat_x, flat_out, self.router.vectors, self.lora_A, self.lora_B,
                self.router.top_k, **self._scoring_rule())
            return True
        except fused.KERNEL_ERRORS as err:
            if torch.compiler.is_compiling():
                raise
            FUSED_ROUTING = False
            warnings.warn(f"the fused routing kernel cannot run on {flat_x.device} "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); routing "
                          "with the torch kernels instead", RuntimeWarning, stacklevel=3)
            return False

    def sparse_kernel(self, n_tokens: int, device: str, dtype: torch.dtype) -> str:
        """The kernel that computes the sparse path for ``n_tokens`` tokens on ``device`` (a
        device type) in ``dtype``: "fused", "dense", "native", "gather", "compiled-gather",
        "sparse-matmul" or "grouped"."""
        gpu = device == "cuda"
        # read without nn.Module's attribute lookup (about 1 µs each): this runs in every
        # module at every decoded token
        router, stacks_dtype = self._modules["router"], self._buffers["lora_A"].dtype
        routable = type(router) in (PhatgooseRouter, ArrowRouter)
        if gpu or (FUSED_ON_CPU and device == "cpu"):
            fusable = (FUSED_ROUTING and fused.triton is not None and routable
                       and self.num_experts <= fused.FUSED_MAX_EXPERTS
                       and dtype in fused.FUSED_DTYPES and stacks_dtype in fused.FUSED_DTYPES)
            if fusable and (n_tokens <= FUSED_MAX_TOKENS or not replayed(gpu)):
                return "fused"
        if self.num_experts <= (GPU_DENSE_MAX_EXPERTS if gpu else DENSE_MAX_EXPERTS):
            return "dense"
        if n_tokens * min(router.top_k, self.num_experts) <= GATHER_MAX_PAIRS:
            native_ok = (CPU_NATIVE_DECODE and routable and device == "cpu"
                         and dtype in native.DTYPES and stacks_dtype in native.DTYPES
                         and router._buffers["vectors"].dtype in native.DTYPES
                         and (not torch.is_autocast_enabled("cpu")
                              or torch.get_autocast_dtype("cpu") == torch.bfloat16)
                         and not torch.compiler.is_compiling())
            return "native" if native_ok else "gather"
        if CPU_SPARSE_MATMULS and device == "cpu" and not torch.compiler.is_compiling():
            return "compiled-gather" if CPU_COMPILED_DELTA and routable else "sparse-matmul"
        return "grouped"

    def _add_gathered_delta(self, flat_x: Tensor, x_scoring: Tensor, flat_out: Tensor,
                            weights: Tensor, experts: Tensor) -> None:
        """Few tokens (decoding): out_t += sum_j w_tj B_e A_e x_t over each token's k chosen
        experts e = experts[t, j], their factors gathered, as two batched matmuls, each a row
        vector times a matrix (x_t^T A^T: the matrix-times-column form took 4x longer on CPU at
        8 tokens). Computed in the stacks' dtype and outside autocast: at a few rows the cost is
        dispatch, and autocast would cast both gathered factors to bf16 in every module
        (measured: 1.14x faster routed decoding at batch 1 under bf16 autocast, E = 64; see
        docs/PERFORMANCE.md)."""
        n, k = experts.shape
        dtype = self.lora_A.dtype
        x = x_scoring if x_scoring.dtype == dtype else flat_x.to(dtype)
        pairs = experts.reshape(-1)
        with autocast_off(flat_x.device.type):
            A = self.lora_A.index_select(0, pairs).view(n, k * self.rank, x.shape[-1])
            hidden = torch.bmm(x.unsqueeze(1), A.transpose(1, 2)).view(n, k, self.rank)
            hidden = (hidden * weights.to(dtype).unsqueeze(-1)).view(n, 1, k * self.rank)
            B = self.lora_B.index_select(0, pairs).view(n, k * self.rank, self.d_out)
            flat_out += torch.bmm(hidden, B).view(n, self.d_out)  # the bmm sums over the k

    def _add_native_delta(self, flat_x: Tensor, flat_out: Tensor) -> bool:
        """flat_out += the delta by the C kernel (``native``); False where autograd records
        (it is not differentiable, and writes behind autograd's back), where the output is
        neither fp32 nor bf16, or where the kernel cannot be built, which then turns it off
        for the process, with a warning."""
        if (torch.is_grad_enabled() and (flat_x.requires_grad or flat_out.requires_grad)) or (
                flat_out.dtype not in native.DTYPES):
            return False
        try:
            native.add_routed_delta_(flat_x.contiguous(), flat_out, self._native_arguments())
            return True
        except native.NativeBuildError as err:
            _native_unavailable(err)
            return False

    def _add_chosen_delta(self, x: Tensor, projection: Tensor, flat_out: Tensor) -> bool:
        """Many tokens in fp32 on CPU: flat_out += the delta of the experts that
        ``compiled_routed_choices`` picks from ``projection``, added by the C kernel
        (``native.add_chosen_delta_``). False where it does not apply (other dtypes, autograd
        recording, ``CPU_NATIVE_PREFILL`` off) or cannot run here (no compiler for either)."""
        fp32 = torch.float32
        if not (CPU_NATIVE_PREFILL and x.dtype == fp32 and flat_out.dtype == fp32
                and self._buffers["lora_A"].dtype == fp32
                and self._modules["router"]._buffers["vectors"].dtype == fp32) or (
                torch.is_grad_enabled() and (x.requires_grad or flat_out.requires_grad)):
            return False
        choices = self._compiled_choices(x, projection)
        if choices is None:
            return False
        weights, experts = choices
        try:
            native.add_chosen_delta_(x.contiguous(), flat_out, experts.contiguous(),
                                     weights.contiguous(), self._native_arguments())
            return True
        except native.NativeBuildError as err:
            _native_unavailable(err)
            return False

    def _native_arguments(self) -> native.Prepared:
        """The C kernel's fixed arguments, packed once and again only when the stacks, the
        vectors (replaced by ``.to()``, say; moved by a deepcopy), the router's k or its scoring
        rule change. Read without nn.Module's attribute lookup: at one token, microseconds
        count."""
        router = self._modules["router"]
        tensors = (router._buffers["vectors"], self._buffers["lora_A"], self._buffers["lora_B"])
        settings = (router.top_k, self._scoring_rule())
        cached = self._native
        if (cached is None or cached[1] != settings
                or any(a is not b for a, b in zip(cached[0].tensors, tensors))
                or cached[0].addresses != tuple(t.data_ptr() for t in tensors)):
            cached = self._native = (native.prepare(*tensors, settings[0], **settings[1]),
                                     settings)
        return cached[0]

    def _scoring_rule(self) -> dict:
        """How the fused and compiled kernels score this module's router: Arrow's |x . p| / T
        or PHATGOOSE's standardised dot product (with its LayerNorm eps)."""
        router = self._modules["router"]
        settings = vars(router)  # not getattr's default: a missing attribute costs µs
        return {"arrow": type(router) is ArrowRouter, "eps": settings.get("eps", 1e-5),
                "temperature": settings.get("temperature", 1.0)}

    def _compiled_output(self, x: Tensor, projection: Tensor, flat_out: Tensor,
                         candidates: bool) -> Tensor | None:
        """Many tokens on CPU: ``compiled_routed_output``, the router's choices from
        ``projection`` (with ``candidates``, bf16 scores that pick candidates) and the delta
        computed in fp32 for a bf16 model (like ``_add_sparse_delta``, rounded once); None
        where it cannot run (``_run_compiled``)."""
        k = self.router.top_k
        return self._run_compiled(lambda vectors: compiled_routed_output(
            flat_out, x, projection, vectors, self.lora_A, self.lora_B, k,
            k + EXTRA_CANDIDATES if candidates else 0, **self._scoring_rule()))

    def _compiled_choices(self, x: Tensor, projection: Tensor) -> tuple[Tensor, Tensor] | None:
        """(weights, experts) of each token's k best experts by ``compiled_routed_choices``;
        None where it cannot run (``_run_compiled``)."""
        return self._run_compiled(lambda vectors: compiled_routed_choices(
            x, projection, vectors, self.router.top_k, 0, **self._scoring_rule()))

    def _run_compiled(self, run: Callable[[Tensor], Any]) -> Any:
        """``run(vectors)``, a compiled routing function given this module's routing vectors
        (its shared group's where the router shares a projection); None past the compiled
        graphs' limit (this call then runs the sparse kernels), or if torch.compile could not
        build it here, which then turns compiled routing off for the process, with a
        warning."""
        global CPU_COMPILED_DELTA
        vectors = (self.router.vectors if self.shared is None
                   else self.shared[0].member_vectors(self.shared[1]))
        try:
            return run(vectors)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            return None
        except COMPILE_ERRORS as err:
            CPU_COMPILED_DELTA = False
            warnings.warn(f"the compiled routing delta cannot be built here ({type(err).__name__}"
                          f": {str(err).splitlines()[0][:200]}); routing with torch's sparse "
                          "kernels instead", RuntimeWarning, stacklevel=4)
            return None

    def _add_sparse_delta(
        self, flat_x: Tensor, out: Tensor, flat_out: Tensor, weights: Tensor, experts: Tensor
    ) -> Tensor:
        """Many tokens on CPU: the chosen experts' hidden units as a sparse (tokens, E r) CSR
        matrix H with k r entries per row, H = (x A^T) sampled at those entries (SDDMM), scaled
        by the weights, then out += H B (sparse x dense, accumulated in place), A and B being
        the stacks seen as (E r, d_in) and (E r, d_out). Unlike sorting pairs by expert, no
        (pairs, d_out) tensor is written and read back (measured 1.6x faster at E = 64).
        ``flat_x`` comes in fp32 for a model in another dtype than fp32 and fp64 (bf16): the
        delta is computed in fp32 and added once."""
        n, k = experts.shape
        A, B = self.lora_A.to(flat_x.dtype), self.lora_B.to(flat_x.dtype)
        weights = weights.to(flat_x.dtype)
        experts, slot = experts.sort(dim=-1)  # CSR columns ascending within each row
        weights = weights.gather(-1, slot)
        columns = (experts.unsqueeze(-1) * self.rank + torch.arange(
            self.rank, device=experts.device)).reshape(-1)
        rows = torch.arange(0, n * k * self.rank + 1, k * self.rank, device=experts.device)
        shape = (n, self.num_experts * self.rank)
        # the indices are valid by construction: skip torch's invariant checks, explicitly
        pattern = torch.sparse_csr_tensor(rows, columns, flat_x.new_zeros(columns.shape), shape,
                                          check_invariants=False)
        hidden = torch.sparse.sampled_addmm(
            pattern, flat_x, A.reshape(shape[1], -1).T, beta=0.0).values()
        hidden = (hidden.view(n, k, self.rank) * weights.unsqueeze(-1)).reshape(-1)
        H = torch.sparse_csr_tensor(rows, columns, hidden, shape, check_invariants=False)
        if flat_out.dtype == flat_x.dtype:
            flat_out.addmm_(H, B.reshape(shape[1], -1))
        else:  # accumulated in fp32, rounded once: torch's mixed-dtype add_ is 10x slower
            flat_out.copy_(flat_out.to(flat_x.dtype).addmm_(H, B.reshape(shape[1], -1)))
        return out


def gathered_delta(x: Tensor, A: Tensor, B: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
    """sum_j w_tj (x_t . A_e^T) B_e over each token's chosen experts e = experts[t, j]: (n, d_out)
    from x (n, d_in), the stacks A (E, r, d_in) and B (E, r, d_out) (their gathered rows cast
    to x's dtype), experts and weights (n, k). Written as gathers and reductions for inductor
    (``compiled_routed_output``), which fuses each into one loop over the tokens: no
    (n, k, r, d) tensor is formed there (it would be, eagerly)."""
    hidden = (A[experts].to(x.dtype) * x[:, None, None, :]).sum(-1) * weights[..., None]
    return (hidden[..., None] * B[experts].to(x.dtype)).sum((1, 2))  # hidden: (n, k, r)


def routed_choices(x: Tensor, projection: Tensor, vectors: Tensor, k: int, candidates: int,
                   arrow: bool, eps: float, temperature: float) -> tuple[Tensor, Tensor]:
    """Each token's k best experts and their weights, (n, k) each: chosen from the router's
    projection x . v_e (n, E) as ``PhatgooseRouter`` does (``phatgoose_scores``) or, if
    ``arrow``, ``ArrowRouter`` (``arrow_scores``), weighted by the softmax over the k. With
    ``candidates`` > 0, ``projection`` is approximate (bf16): its ``candidates`` highest scores
    per token (the same order as the router's scores: a positive per-token scale, or the
    absolute value) pick the candidates, whose x . v_e is computed again from ``vectors`` (E,
    d_in), exactly, before the k best are taken from them. Computed in x's scoring dtype (fp32
    or fp64, ``scoring``)."""
    x = scoring(x)
    if candidates:
        order = projection.to(x.dtype)
        _, chosen = top_k(order.abs() if arrow else order, candidates, many_rows=True,
                          max_passes=4)
        projection = (vectors[chosen].to(x.dtype) * x[:, None, :]).sum(-1)  # (n, candidates)
    scores = (arrow_scores(projection, temperature) if arrow
              else phatgoose_scores(projection, x, eps))
    weights, experts = top_k_weights(scores, k, many_rows=True)
    if candidates:
        experts = chosen.gather(-1, experts)
    return weights, experts


def routed_output(out: Tensor, x: Tensor, projection: Tensor, vectors: Tensor, A: Tensor,
                  B: Tensor, k: int, candidates: int, arrow: bool, eps: float,
                  temperature: float) -> Tensor:
    """out + the delta of each token's k best experts (``routed_choices``, then
    ``gathered_delta``), computed in x's scoring dtype and rounded once to out's: (n, d_out)."""
    weights, experts = routed_choices(x, projection, vectors, k, candidates, arrow, eps,
                                      temperature)
    delta = gathered_delta(scoring(x), A, B, experts, weights)
    return (out.to(delta.dtype) + delta).to(out.dtype)


# routed_output and routed_choices, each compiled at its first call
_compiled: dict[Callable, Callable] = {}
# the most graphs each compiles; past it, calls run the sparse kernels
COMPILED_GRAPHS = 64


def _call_compiled(function: Callable, tokens: tuple[Tensor, ...], *args: Any) -> Any:
    """``function(*args)`` compiled once per layer shape (d_in, d_out, E, r, k, dtypes, router
    kind), for any number of tokens (dimension 0 of ``tokens`` marked dynamic; the other sizes
    stay static, which inductor vectorises: all-dynamic shapes ran 1.6x slower)."""
    if function not in _compiled:
        _compiled[function] = torch.compile(function, dynamic=False)
    for t in tokens:
        torch._dynamo.mark_dynamic(t, 0)
    # one graph per layer shape and dtypes: a model has a few, several libraries a few more
    # than dynamo's default limit of 8. Past the limit, dynamo raises (FailOnRecompileLimitHit)
    # rather than run it eagerly, which would form (n, k, r, d) tensors.
    with torch._dynamo.config.patch(recompile_limit=COMPILED_GRAPHS,
                                    fail_on_recompile_limit_hit=True):
        return _compiled[function](*args)


def compiled_routed_output(out: Tensor, x: Tensor, projection: Tensor, vectors: Tensor,
                           A: Tensor, B: Tensor, k: int, candidates: int, arrow: bool,
                           eps: float, temperature: float) -> Tensor:
    """``routed_output``, compiled (``_call_compiled``)."""
    return _call_compiled(routed_output, (out, x, projection), out, x, projection, vectors, A,
                          B, k, candidates, arrow, eps, temperature)


def compiled_routed_choices(x: Tensor, projection: Tensor, vectors: Tensor, k: int,
                            candidates: int, arrow: bool, eps: float, temperature: float
                            ) -> tuple[Tensor, Tensor]:
    """``routed_choices``, compiled (``_call_compiled``)."""
    return _call_compiled(routed_choices, (x, projection), x, projection, vectors, k,
                          candidates, arrow, eps, temperature)


def bf16_projection(x: Tensor, vectors: Tensor) -> Tensor:
    """x . v_e for every expert as one bf16 matmul (fp32 accumulation, bf16 output): (..., E),
    approximate, to pick candidates (``routed_output``)."""
    with autocast_off(x.device.type):
        return x.to(torch.bfloat16) @ vectors.to(torch.bfloat16).T


def replayed(gpu: bool) -> bool:
    """Whether this forward is being compiled (``torch.compile``) or captured into a CUDA
    graph: it will be replayed without launching each kernel from Python."""
    return torch.compiler.is_compiling() or (
        gpu and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def grouped_matmul(x: Tensor, weights: Tensor, ends: Tensor) -> Tensor:
    """Rows ends[e-1]:ends[e] of x times weights[e] (E, d, f), for every e: (N, f).

    torch's grouped matmul where it supports the device and dtype; else a loop over experts.
    Under torch.compile, grouped_mm traces only in bf16 (with 16-byte-aligned rows): other
    dtypes run the loop outside the graph (one graph break per module)."""
    aligned = x.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0 and weights.shape[-1] % 8 == 0
    if torch.compiler.is_compiling() and not aligned:
        return _grouped_matmul_loop(x, weights, ends)
    try:
        return F.grouped_mm(x, weights, offs=ends.to(torch.int32))
    except (RuntimeError, NotImplementedError, AttributeError):
        return _grouped_matmul_loop(x, weights, ends)


@torch.compiler.disable
def _grouped_matmul_loop(x: Tensor, weights: Tensor, ends: Tensor) -> Tensor:
    sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    parts = [p @ weights[e] for e, p in enumerate(x.split(sizes)) if p.shape[0]]
    return torch.cat(parts) if parts else x.new_zeros(0, weights.shape[-1])


class SharedProjection:
    """One router matmul for sibling modules that read the same input (q/k/v, gate/up).

    The first member called with an input projects it onto every member's routing vectors at
    once; the others reuse that projection when they are called with the very same tensor
    (checked by identity and version, so a member called with another input computes its own).
    """

    def __init__(self, members: list[RoutedLinear]) -> None:
        self.vectors = torch.cat([m.router.vectors.float() for m in members])
        self.sizes = [m.router.vectors.shape[0] for m in members]
        self._key: tuple[int, int] | None = None
        self._input: Tensor | None = None
        # per bf16 mode (see ``inputs``): x as the members route it, and their projections
        self._modes: dict[bool, tuple[Tensor, tuple[Tensor, ...]]] = {}
        self._served: set[int] = set()
        for i, m in enumerate(members):
            m.shared = (self, i)

    def inputs(self, index: int, x: Tensor, bf16: bool = False) -> tuple[Tensor, Tensor]:
        """Member ``index``'s ``RoutedLinear.routing_inputs(x, bf16)``: x in the routing
        precision (with ``bf16``: as it is) and its projection on that member's vectors."""
        key = (id(x), x._version)
        if self._input is not x or self._key != key:
            self._input, self._key, self._modes, self._served = x, key, {}, set()
        if bf16 not in self._modes:  # members may differ (another E, the dense path)
            x_scoring = x if bf16 else scoring(x)
            dtype = scoring_dtype(x.dtype)
            if self.vectors.device != x.device or self.vectors.dtype != dtype:
                self.vectors = self.vectors.to(x.device, dtype)
            projection = (bf16_projection(x, self.vectors) if bf16
                          else scoring_matmul(x_scoring, self.vectors))
            self._modes[bf16] = x_scoring, projection.split(self.sizes, dim=-1)
        x_scoring, parts = self._modes[bf16]
        self._served.add(index)
        if len(self._served) == len(self.sizes):  # every member served: let the input go
            self._input, self._key, self._modes = None, None, {}
        return x_scoring, parts[index]

    def member_vectors(self, index: int) -> Tensor:
        """Member ``index``'s routing vectors, as the group projects with them."""
        start = sum(self.sizes[:index])
        return self.vectors[start:start + self.sizes[index]]


# Module-name suffixes that read the same input in common architectures (Llama/Mistral/Qwen,
# T5, BERT-style attention).
SHARED_INPUT_SIBLINGS = (
    ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
    ("q", "k", "v"), ("wi_0", "wi_1"), ("query", "key", "value"),
)


def share_projections(modules: dict[str, RoutedLinear]) -> list[SharedProjection]:
    """Group the top-k routed modules of one parent whose names are input-sharing siblings."""
    groups = []
    for siblings in SHARED_INPUT_SIBLINGS:
        by_parent: dict[str, list[RoutedLinear]] = {}
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            if child in siblings and isinstance(module.router, TopKRouter):
                by_parent.setdefault(parent, []).append(module)
        for members in by_parent.values():
            if len(members) > 1 and len({m.router.vectors.shape[1] for m in members}) == 1:
                groups.append(SharedProjection(members))
    return groups
