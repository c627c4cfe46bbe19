"""A routed module's whole routing in one Triton kernel (GPU): router scores, top-k, softmax and
the chosen experts' LoRA, added into the base layer's output.

For a block of tokens x (T, d_in), one program computes
    s = (x . v_i) / sigma_x / sqrt(d_in)   (PHATGOOSE; the vectors v stored standardised)
    s = |x . v_i| / temperature            (Arrow)
in fp32 (IEEE, not TF32, as ``scoring_matmul``), keeps each token's top k (the first index on
exact ties), w = softmax over the k, and adds sum_j w_j B_{e_j} A_{e_j} x to the output rows
(factors pre-scaled, gathered by expert; products accumulated in fp32, rounded once).

On a GPU the unfused routing runs ten or more small kernels per module, each bound by its
latency at SmolLM2's size (docs/PERFORMANCE.md); this is one. Each program writes only its own
rows: no atomics, no sort. Triton is imported on first use; on CPU the kernel runs only under
Triton's interpreter (``TRITON_INTERPRET=1``, the tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Experts the kernel routes among: the scores of a block of tokens stay in registers.
FUSED_MAX_EXPERTS = 256
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_TOKENS = 16  # tl.dot's smallest tile

try:  # optional: GPU machines have it; on CPU the kernel runs only under its interpreter
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def routed_delta_kernel(
        x_ptr, out_ptr, v_ptr, a_ptr, b_ptr,
        n_tokens, n_experts, x_stride, scale, eps,
        D_IN: tl.constexpr, D_OUT: tl.constexpr, ARROW: tl.constexpr, K: tl.constexpr,
        K_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_tokens
        experts = tl.arange(0, E_PAD)
        cols = tl.arange(0, BLOCK_D)

        # scores: x . v for every expert, in fp32 (and, for PHATGOOSE, x's mean)
        dots = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for start in range(0, D_IN, BLOCK_D):
            d = start + cols
            x = tl.load(x_ptr + rows[:, None] * x_stride + d[None, :],
                        mask=row_ok[:, None] & (d[None, :] < D_IN), other=0.0).to(tl.float32)
            v = tl.load(v_ptr + experts[None, :] * D_IN + d[:, None],
                        mask=(experts[None, :] < n_experts) & (d[:, None] < D_IN), other=0.0)
            dots += tl.dot(x, v.to(tl.float32), input_precision="ieee")
            total += tl.sum(x, axis=1)
        if ARROW:
            scores = tl.abs(dots) * scale
        else:  # 1 / sigma_x as LayerNorm computes it: biased variance, centred, plus eps
            mean = total / D_IN
            centred = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for start in range(0, D_IN, BLOCK_D):
                d = start + cols
                x = tl.load(x_ptr + rows[:, None] * x_stride + d[None, :],
                            mask=row_ok[:, None] & (d[None, :] < D_IN), other=0.0)
                x = tl.where(d[None, :] < D_IN, x.to(tl.float32) - mean[:, None], 0.0)
                centred += tl.sum(x * x, axis=1)
            scores = dots * (scale / tl.sqrt(centred / D_IN + eps))[:, None]
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

        # hidden = A_e x (T, K R), gathered by expert, then scaled by the weights
        hidden = tl.zeros((BLOCK_T, K_PAD * R_PAD), dtype=tl.float32)
        factor_rows = expert_of * R + rank_of[None, :]  # the row of the (E R, d) stacks
        for start in range(0, D_IN, BLOCK_D):
            d = start + cols
            x = tl.load(x_ptr + rows[:, None] * x_stride + d[None, :],
                        mask=row_ok[:, None] & (d[None, :] < D_IN), other=0.0).to(tl.float32)
            a = tl.load(a_ptr + factor_rows[:, :, None] * D_IN + d[None, None, :],
                        mask=pair_ok[:, :, None] & (d[None, None, :] < D_IN), other=0.0)
            hidden += tl.sum(a.to(tl.float32) * x[:, None, :], axis=2)
        hidden = hidden * weight_of

        # out += hidden B_e, summed over the k experts and their ranks
        outs = tl.arange(0, BLOCK_O)
        for start in range(0, D_OUT, BLOCK_O):
            o = start + outs
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
    x, lora_A, lora_B = x.contiguous(), lora_A.contiguous(), lora_B.contiguous()  # no-ops
    k = min(top_k, n_experts)
    scale = 1.0 / temperature if arrow else 1.0 / math.sqrt(d_in)
    e_pad = max(16, 1 << (n_experts - 1).bit_length())
    routed_delta_kernel[(-(-n // BLOCK_TOKENS),)](
        x, out, vectors, lora_A, lora_B, n, n_experts, x.stride(0), scale, eps,
        D_IN=d_in, D_OUT=d_out, ARROW=arrow, K=k, K_PAD=1 << (k - 1).bit_length(), R=rank,
        R_PAD=1 << (rank - 1).bit_length(), E_PAD=e_pad, BLOCK_T=BLOCK_TOKENS,
        BLOCK_D=32 if e_pad <= 128 else 16, BLOCK_O=32,
    )

