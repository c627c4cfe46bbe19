"""Routers: map a module input x (..., d_in) to mixing weights over E experts (..., E).

A router is a replaceable part of a routed module (see ``RoutedLinear``): it sees the raw module
input and returns one weight per expert and token, zero for experts it does not use.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scoring_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision routing scores are computed in for inputs of ``dtype``: fp32, or fp64 for
    fp64 inputs (never below fp32, whatever the model was cast to)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scoring(t: Tensor) -> Tensor:
    """``t`` in the scoring precision (``scoring_dtype``)."""
    return t.to(scoring_dtype(t.dtype))


def scoring_matmul(x: Tensor, vectors: Tensor) -> Tensor:
    """x @ vectors^T in the scoring precision (``scoring``), under autocast too: autocast would
    run it in bf16, which flips near-tied expert choices."""
    x = scoring(x)
    with autocast_off(x.device.type):
        return x @ vectors.to(x.dtype).T


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type``; a no-op one where it is off already
    (entering ``torch.autocast`` costs 1.6 µs on CPU, in every routed module's decoding step)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def standardise(t: Tensor, eps: float = 1e-5) -> Tensor:
    """Subtract the mean and divide by the standard deviation over the last dimension
    (a LayerNorm without learned scale or shift)."""
    return F.layer_norm(t, t.shape[-1:], eps=eps)


# From this many rows (a prefill) on CPU, ``top_k`` may take passes of max; below it
# (decoding), torch's topk, one op, since dispatch dominates there (equal times at 256 rows).
MANY_ROWS = 256


def top_k(scores: Tensor, k: int, many_rows: bool | None = None, max_passes: int = 2
          ) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k highest scores of each row, highest first, like ``topk``.

    torch's CPU topk runs a partial sort only when 64 k <= E; below that (E = 64 at k = 2, the
    default) its per-row nth_element took 3.1x as long as k passes of ``max`` (2048 x 64 scores,
    AMD EPYC, fp32; benchmarks/top_k_forms.py). So on CPU, for many rows and k <= ``max_passes``,
    the passes of max, each masking the expert it found. ``max_passes`` is 2 by default; the
    compiled routing's candidates use 4 (compiled, 4 passes took 0.27 ms against topk's 0.57 at
    2048 x 64, on an AMD EPYC with AVX-512).
    ``many_rows``: whether there are many (None: at least MANY_ROWS, and not under
    torch.compile, where the row count is symbolic)."""
    k, experts = min(k, scores.shape[-1]), scores.shape[-1]
    if many_rows is None:
        many_rows = (not torch.compiler.is_compiling()
                     and scores.numel() >= MANY_ROWS * experts)
    if not (k <= max_passes and 64 * k > experts and scores.device.type == "cpu"
            and many_rows):
        return scores.topk(k, dim=-1)
    values, indices = scores.max(dim=-1, keepdim=True)
    for _ in range(k - 1):
        masked = scores.scatter(-1, indices, float("-inf"))
        value, index = masked.max(dim=-1, keepdim=True)
        values, indices = torch.cat([values, value], -1), torch.cat([indices, index], -1)
    return values, indices


def top_k_weights(scores: Tensor, k: int, many_rows: bool | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Softmax over the k highest scores of each row: (weights, indices), each (..., k), fp32.
    (``many_rows``: see ``top_k``.)"""
    values, indices = top_k(scoring(scores), k, many_rows)
    return values.softmax(dim=-1), indices


def top_k_softmax(scores: Tensor, k: int) -> Tensor:
    """Dense form of ``top_k_weights``: (..., E), zero outside each row's top k."""
    weights, indices = top_k_weights(scores, k)
    return torch.zeros_like(scores, dtype=weights.dtype).scatter(-1, indices, weights)


def check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1 (experts per token), got {top_k}")


class TopKRouter(nn.Module):
    """A router that scores the E experts from one matmul of the input with its ``vectors``
    (E, d_in) (``project``, which routed modules may share, see ``SharedProjection``) and keeps
    the top k (``select``, defined by each router)."""

    vectors: Tensor
    top_k: int

    def project(self, x: Tensor) -> Tensor:
        """x . v_i for every expert: (..., E), in fp32 (or fp64, see ``scoring``)."""
        return scoring_matmul(x, self.vectors)

    def select(self, projection: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(weights, expert indices), each (..., k), from ``project(x)``."""
        raise NotImplementedError

    def dense_weights(self, projection: Tensor, x: Tensor) -> Tensor:
        """``select``'s weights as (..., E), zero for the experts not chosen."""
        weights, indices = self.select(projection, x)
        return torch.zeros_like(projection).scatter(-1, indices, weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense_weights(self.project(x), x)


class PhatgooseRouter(TopKRouter):
    """PHATGOOSE routing: s_i = LN(x) . LN(v_i) / sqrt(d_in); top-k; softmax over the k.

    ``vectors`` (E, d_in) are the experts' trained gates (or any other routing vectors, e.g.
    average activations), stored standardised. Since a standardised v~ sums to zero,
    LN(x) . v~ = (x - mean(x)) . v~ / sigma_x = (x . v~) / sigma_x: the router is one matmul of
    the raw input with the stored vectors (``project``), then a per-token scale (``select``).
    Scores are computed in fp32 (fp64 for an fp64 model) whatever the model's dtype."""

    def __init__(self, vectors: Tensor, top_k: int = 2, eps: float = 1e-5) -> None:
        super().__init__()
        if vectors.ndim != 2:
            raise ValueError(f"routing vectors must be (experts, d_in), got {tuple(vectors.shape)}")
        check_top_k(top_k)
        self.top_k = top_k
        self.eps = eps
        self.register_buffer("vectors", standardise(vectors.float(), eps))

    def scores_from(self, projection: Tensor, x: Tensor) -> Tensor:
        return phatgoose_scores(projection, x, self.eps)

    def scores(self, x: Tensor) -> Tensor:
        return self.scores_from(self.project(x), x)

    def select(self, projection: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return top_k_weights(self.scores_from(projection, x), self.top_k)


def phatgoose_scores(projection: Tensor, x: Tensor, eps: float = 1e-5) -> Tensor:
    """PHATGOOSE's scores LN(x) . LN(v_i) / sqrt(d) from the projection x . v~_i (v~ the
    standardised vectors): projection / sigma_x / sqrt(d), sigma_x in the scoring precision."""
    d = x.shape[-1]
    # 1 / sigma_x from LayerNorm's own kernel (one op; var() is ~5x slower on CPU; the norm
    # of the centred rows, faster alone, saved nothing in a whole prefill)
    inv_sigma = torch.native_layer_norm(scoring(x).reshape(-1, d), [d], None, None,
                                        eps)[2].view(*x.shape[:-1], 1)
    return projection * (inv_sigma * (1 / math.sqrt(d)))


def arrow_scores(projection: Tensor, temperature: float = 1.0) -> Tensor:
    """Arrow's scores |x . p_i| / temperature from the projection x . p_i."""
    return projection.abs() / temperature


class SigmoidGate(nn.Module):
    """The PHATGOOSE gate being trained: weight sigmoid(v . x) on the raw module input, one
    vector per expert, initialised to zeros (so every gate starts at 0.5)."""

    def __init__(self, d_in: int, experts: int = 1) -> None:
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(experts, d_in))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(scoring_matmul(x, self.vectors))


class FixedWeights(nn.Module):
    """The same weights for every token: uniform mixing (1/E each) or one single expert."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights.float())

    def forward(self, x: Tensor) -> Tensor:
        return self.weights.expand(*x.shape[:-1], -1)


class ArrowRouter(TopKRouter):
    """Arrow (Ostapenko et al., 2024): score |x . p_i| with p_i the top right singular vector of
    expert i's B A; softmax over the top k of score / temperature. Training-free."""

    def __init__(self, prototypes: Tensor, top_k: int = 2, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"Arrow temperature must be positive, got {temperature}")
        check_top_k(top_k)
        self.top_k, self.temperature = top_k, temperature
        self.register_buffer("vectors", prototypes.float())

    def select(self, projection: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return top_k_weights(arrow_scores(projection, self.temperature), self.top_k)


def top_right_singular_vector(A: Tensor, B: Tensor) -> Tensor:
    """The top right singular vector of B A (d_out x d_in) without forming it: with B = Q R,
    B A = Q (R A) and Q has orthonormal columns, so B A and the small R A (r x d_in) share their
    right singular vectors. Unique up to sign."""
    _, R = torch.linalg.qr(B.float())
    return torch.linalg.svd(R @ A.float(), full_matrices=False).Vh[0]
