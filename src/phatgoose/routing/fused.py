"""A routed module's whole routing in one Triton kernel (GPU): router scores, top-k, softmax and
the chosen experts' LoRA, added into the base layer's output.

For a block of tokens x (T, d_in), one program computes
    s = (x . v_i) / sigma_x / sqrt(d_in)   (PHATGOOSE; the vectors v stored standardised)
    s = |x . v_i| / temperature            (Arrow)
in fp32 (IEEE, not TF32, as ``scoring_matmul``), keeps each token's top k (the first index on
exact ties), w = softmax over the k, and adds sum_j w_j B_{e_j} A_{e_j} x to a slice of the
output columns (factors pre-scaled, gathered by expert; accumulated in fp32, rounded once).
The grid is (token blocks, column slices): with few tokens (decoding) the programs of one
block each recompute the routing and write their own columns, so that the work spreads over
the GPU; no atomics, no sort.

On a GPU the unfused routing runs ten or more small kernels per module, each bound by its
latency at SmolLM2's size; this is one (docs/PERFORMANCE.md has the measurements). Triton is
optional: GPU builds of torch bring it; on CPU the kernel runs only under Triton's interpreter
(``TRITON_INTERPRET=1``, the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Experts the kernel routes among: the scores of a block of tokens stay in registers.
FUSED_MAX_EXPERTS = 256
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:
    import triton
    import triton.language as tl
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    # what Triton raises when it cannot compile or launch the kernel on a device (the routed
    # module then falls back to the torch kernels, see RoutedLinear._add_fused_delta)
    KERNEL_ERRORS: tuple[type[Exception], ...] = (CompilationError, OutOfResources, PTXASError)
except ImportError:
    triton = None
    KERNEL_ERRORS = ()


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one launch. ``block_t`` tokens per program (16 or more: scores by
    ``tl.dot``; fewer: by broadcast products); ``block_d``, ``block_a``, ``block_o``: chunk widths
    of the score, A and B loops; ``out_per_program`` output columns per program."""

    block_t: int
    block_d: int
    block_a: int
    block_o: int
    out_per_program: int
    num_warps: int = 4


# The tiling heuristic's knobs (benchmarks/fused_routing.py sweeps them on a GPU).
DECODE_TOKENS = 8  # up to this many tokens: small token blocks, output columns split
DECODE_COLUMNS = 64  # output columns per program when decoding
# tokens per program when decoding (None: all, up to DECODE_TOKENS). One token per program was
# 4.3x faster at 8 tokens on an H200 (CUDA graph, E = 64: 4.30 ms against 18.3 for 30 layers),
# and as fast at one token; 16384-element tiles with 8 warps were 2-10% faster than 8192 with 4
# at 1, 8 and 2048 tokens (docs/PERFORMANCE.md)
DECODE_BLOCK_T: int | None = 1
TILE = 16384  # elements per register tile (64 fp32 registers per thread at 8 warps)
NUM_WARPS = 8


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _clamp(n: int, low: int, high: int) -> int:
    return max(low, min(high, n))


def kernel_config(n_tokens: int, d_in: int, d_out: int, e_pad: int, pairs: int) -> KernelConfig:
    """Tiles sized so that each loop runs few iterations (each waits on its loads) and each
    register tile holds about ``TILE`` elements; ``pairs`` = padded k x padded rank."""
    for knob in (TILE, DECODE_COLUMNS, DECODE_BLOCK_T or 1):
        if knob != _pow2(knob):
            raise ValueError(f"the fused kernel's tiling knobs must be powers of two, got {knob}")
    if n_tokens <= DECODE_TOKENS:
        t = DECODE_BLOCK_T or _pow2(n_tokens)
        return KernelConfig(block_t=t, block_d=_clamp(TILE // (t * e_pad), 16, _pow2(d_in)),
                            block_a=_clamp(TILE // (t * pairs), 16, _pow2(d_in)),
                            block_o=_clamp(TILE // (t * pairs), 16, DECODE_COLUMNS),
                            out_per_program=DECODE_COLUMNS, num_warps=NUM_WARPS)
    return KernelConfig(block_t=16, block_d=_clamp(TILE // (16 * e_pad) * 4, 16, 64),
                        block_a=_clamp(TILE // (16 * pairs), 16, 128),
                        block_o=_clamp(TILE // (16 * pairs), 16, 128),
                        out_per_program=_pow2(d_out), num_warps=NUM_WARPS)


if triton is not None:

    @triton.jit
    def routed_delta_kernel(
        x_ptr, out_ptr, v_ptr, a_ptr, b_ptr,
        n_tokens, n_experts, x_stride, scale, eps,
        D_IN: tl.constexpr, D_OUT: tl.constexpr, ARROW: tl.constexpr, K: tl.constexpr,
        K_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_A: tl.constexpr,
        BLOCK_O: tl.constexpr, OUT_PER_PROGRAM: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_tokens
        rows = rows.to(tl.int64)  # offsets past 2^31 elements
        experts = tl.arange(0, E_PAD)

        # scores: x . v for every expert, in fp32; in the same pass, the first two moments of
        # x - x_0 (shifted by each row's first element, so that a large mean does not cancel)
        shift = tl.load(x_ptr + rows * x_stride, mask=row_ok, other=0.0).to(tl.float32)
        dots = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for start in range(0, D_IN, BLOCK_D):
            d = start + tl.arange(0, BLOCK_D)
            inside = row_ok[:, None] & (d[None, :] < D_IN)
            x = tl.load(x_ptr + rows[:, None] * x_stride + d[None, :],
                        mask=inside, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + experts[None, :] * D_IN + d[:, None],
                        mask=(experts[None, :] < n_experts) & (d[:, None] < D_IN),
                        other=0.0).to(tl.float32)
            if BLOCK_T >= 16:
                dots += tl.dot(x, v, input_precision="ieee")
            else:
                dots += tl.sum(x[:, :, None] * v[None, :, :], axis=1)
            shifted = tl.where(inside, x - shift[:, None], 0.0)
            total += tl.sum(shifted, axis=1)
            squares += tl.sum(shifted * shifted, axis=1)
        if ARROW:
            scores = tl.abs(dots) * scale
        else:  # 1 / sigma_x, LayerNorm's (biased variance plus eps); a per-token scale, so
            # its rounding never changes which experts are chosen
            mean = total / D_IN  # of x - x_0
            variance = tl.maximum(squares / D_IN - mean * mean, 0.0)
            scores = dots * (scale / tl.sqrt(variance + eps))[:, None]
        scores = tl.where(experts[None, :] < n_experts, scores, float("-inf"))

        # top k: K passes of max / argmax, each removing the expert it chose
        slots = tl.arange(0, K_PAD)
        top_scores = tl.full((BLOCK_T, K_PAD), float("-inf"), dtype=tl.float32)
        top_experts = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.max(scores, axis=1)
            choice = tl.argmax(scores, axis=1, tie_break_left=True).to(tl.int32)
            top_scores = tl.where(slots[None, :] == j, best[:, None], top_scores)
            top_experts = tl.where(slots[None, :] == j, choice[:, None], top_experts)
            scores = tl.where(experts[None, :] == choice[:, None], float("-inf"), scores)
        weights = tl.exp(top_scores - tl.max(top_scores, axis=1)[:, None])
        weights = weights / tl.sum(weights, axis=1)[:, None]

        # each (slot, rank) column of the chosen experts: its expert, weight and rank index
        pair = tl.arange(0, K_PAD * R_PAD)
        slot_of, rank_of = pair // R_PAD, pair % R_PAD
        pick = slot_of[None, :, None] == slots[None, None, :]  # (1, K R, K)
        expert_of = tl.sum(tl.where(pick, top_experts[:, None, :], 0), axis=2)  # (T, K R)
        weight_of = tl.sum(tl.where(pick, weights[:, None, :], 0.0), axis=2)
        pair_ok = row_ok[:, None] & ((slot_of < K) & (rank_of < R))[None, :]
        factor_rows = expert_of * R + rank_of[None, :]  # the row of the (E R, d) stacks

        # hidden = A_e x (T, K R), gathered by expert, then scaled by the weights
        hidden = tl.zeros((BLOCK_T, K_PAD * R_PAD), dtype=tl.float32)
        for start in range(0, D_IN, BLOCK_A):
            d = start + tl.arange(0, BLOCK_A)
            x = tl.load(x_ptr + rows[:, None] * x_stride + d[None, :],
                        mask=row_ok[:, None] & (d[None, :] < D_IN), other=0.0).to(tl.float32)
            a = tl.load(a_ptr + factor_rows[:, :, None] * D_IN + d[None, None, :],
                        mask=pair_ok[:, :, None] & (d[None, None, :] < D_IN), other=0.0)
            hidden += tl.sum(a.to(tl.float32) * x[:, None, :], axis=2)
        hidden = hidden * weight_of

        # out[:, this program's columns] += hidden B_e, summed over the k experts and ranks
        first = tl.program_id(1) * OUT_PER_PROGRAM
        for start in range(0, OUT_PER_PROGRAM, BLOCK_O):
            o = first + start + tl.arange(0, BLOCK_O)
            b = tl.load(b_ptr + factor_rows[:, :, None] * D_OUT + o[None, None, :],
                        mask=pair_ok[:, :, None] & (o[None, None, :] < D_OUT), other=0.0)
            delta = tl.sum(b.to(tl.float32) * hidden[:, :, None], axis=1)
            where = out_ptr + rows[:, None] * D_OUT + o[None, :]
            keep = row_ok[:, None] & (o[None, :] < D_OUT)
            y = tl.load(where, mask=keep, other=0.0).to(tl.float32) + delta
            tl.store(where, y.to(out_ptr.dtype.element_ty), mask=keep)


def add_routed_delta_(
    x: Tensor, out: Tensor, vectors: Tensor, lora_A: Tensor, lora_B: Tensor, top_k: int, *,
    arrow: bool = False, temperature: float = 1.0, eps: float = 1e-5,
) -> None:
    """out (N, d_out) += the top-k routed LoRA delta of x (N, d_in), in one kernel launch.

    ``vectors`` (E, d_in) fp32: PHATGOOSE's standardised gates (``arrow=False``) or Arrow's
    prototypes; ``lora_A`` (E, r, d_in) and ``lora_B`` (E, r, d_out), pre-scaled, in the model's
    dtype (``out``'s). Routes as ``PhatgooseRouter``/``ArrowRouter`` then the sparse path do."""
    n, d_in = x.shape
    n_experts, rank, d_out = lora_B.shape
    # the kernel reads rows of x at a stride, every other tensor packed (no-ops when they are)
    vectors, lora_A, lora_B = vectors.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    k = min(top_k, n_experts)
    k_pad, r_pad, e_pad = _pow2(k), _pow2(rank), max(16, _pow2(n_experts))
    config = kernel_config(n, d_in, d_out, e_pad, k_pad * r_pad)
    grid = (-(-n // config.block_t), -(-d_out // config.out_per_program))
    routed_delta_kernel[grid](
        x, out, vectors, lora_A, lora_B, n, n_experts, x.stride(0),
        1.0 / temperature if arrow else 1.0 / math.sqrt(d_in), eps,
        D_IN=d_in, D_OUT=d_out, ARROW=arrow, K=k, K_PAD=k_pad, R=rank, R_PAD=r_pad,
        E_PAD=e_pad, BLOCK_T=config.block_t, BLOCK_D=config.block_d, BLOCK_A=config.block_a,
        BLOCK_O=config.block_o, OUT_PER_PROGRAM=config.out_per_program,
        num_warps=config.num_warps,
    )
