"""The PHATGOOSE router against a hand-computed reference."""

import math

import pytest
import torch

from phatgoose.routing import FixedWeights, PhatgooseRouter, SigmoidGate, standardise
from phatgoose.routing.routers import MANY_ROWS, top_k


def manual_standardise(v: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = sum(v.tolist()) / len(v)
    var = sum((t - mean) ** 2 for t in v.tolist()) / len(v)  # biased, as LayerNorm
    return torch.tensor([(t - mean) / math.sqrt(var + eps) for t in v.tolist()])


def test_standardise_matches_hand_computation():
    v = torch.tensor([1.0, 2.0, 4.0, 9.0])
    torch.testing.assert_close(standardise(v), manual_standardise(v))
    assert abs(standardise(v).mean()) < 1e-6


def test_router_scores_topk_and_weights_by_hand():
    torch.manual_seed(0)
    d, experts = 16, 5
    vectors = torch.randn(experts, d) * 3 + 1
    x = torch.randn(3, d) * 2 - 0.5
    router = PhatgooseRouter(vectors, top_k=2)
    weights = router(x)
    for t in range(3):
        xs = manual_standardise(x[t])
        scores = [float(xs @ manual_standardise(vectors[i])) / math.sqrt(d) for i in range(experts)]
        top = sorted(range(experts), key=lambda i: -scores[i])[:2]
        exps = [math.exp(scores[i]) for i in top]
        expected = torch.zeros(experts)
        for i, e in zip(top, exps):
            expected[i] = e / sum(exps)
        torch.testing.assert_close(weights[t], expected, atol=1e-5, rtol=1e-5)
        assert set(weights[t].nonzero().flatten().tolist()) == set(top)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3))


def test_topk_softmax_equals_renormalised_full_softmax():
    """The reference takes a softmax over all experts, keeps the top k and renormalises."""
    torch.manual_seed(1)
    router = PhatgooseRouter(torch.randn(8, 32), top_k=3)
    x = torch.randn(2, 7, 32)
    full = router.scores(x).softmax(-1)
    values, indices = full.topk(3, dim=-1)
    renormalised = torch.zeros_like(full).scatter(
        -1, indices, values / values.sum(-1, keepdim=True)
    )
    torch.testing.assert_close(router(x), renormalised, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(router(x).sum(-1), torch.ones(2, 7))
    assert ((router(x) > 0).sum(-1) == 3).all()


def test_router_is_scale_and_shift_invariant_and_top_k_is_capped():
    torch.manual_seed(2)
    vectors = torch.randn(2, 8)
    x = torch.randn(4, 8)
    router = PhatgooseRouter(vectors, top_k=5)  # more than the 2 experts: all are used
    shifted = PhatgooseRouter(vectors * 7 + 3, top_k=5)
    torch.testing.assert_close(router(x), shifted(x * 0.5 - 2), atol=1e-4, rtol=1e-4)
    assert (router(x) > 0).all()


def test_sigmoid_gate_starts_at_one_half_and_uses_raw_input():
    gate = SigmoidGate(4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(gate(x), torch.full((3, 1), 0.5))
    with torch.no_grad():
        gate.vectors.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(gate(x)[:, 0], torch.sigmoid(x[:, 0]))


def test_fixed_weights_broadcast_per_token():
    router = FixedWeights(torch.tensor([0.25, 0.75]))
    assert router(torch.randn(2, 3, 5)).shape == (2, 3, 2)
    torch.testing.assert_close(router(torch.randn(4, 5))[2], torch.tensor([0.25, 0.75]))


def test_routing_scores_and_gates_stay_fp32_under_bf16_autocast():
    """autocast would run the router's matmul in bf16 (it did, in the pipeline's bf16 stages)."""
    torch.manual_seed(0)
    x, vectors = torch.randn(64, 32), torch.randn(16, 32)
    router, gate = PhatgooseRouter(vectors), SigmoidGate(32, experts=16)
    with torch.no_grad():
        gate.vectors.copy_(vectors)
    exact = router.scores(x), gate(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = router.scores(x), gate(x)
        assert (x @ vectors.T).dtype == torch.bfloat16  # what autocast does to a plain matmul
    for reference, got in zip(exact, under_autocast):
        assert got.dtype == torch.float32 and torch.equal(got, reference)


@pytest.mark.parametrize("experts", [12, 64, 127, 200])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("rows", [4, MANY_ROWS])
def test_top_k_matches_torch_topk_in_every_form(experts, k, rows):
    torch.manual_seed(experts * 10 + k)
    scores = torch.randn(rows, experts)
    values, indices = top_k(scores, k)
    expected = scores.topk(k, dim=-1)
    assert torch.equal(indices, expected.indices)
    assert torch.equal(values, expected.values)


def test_top_k_takes_passes_of_max_where_cpu_topk_is_slow(monkeypatch):
    scores = torch.randn(MANY_ROWS, 64)
    expected = scores.topk(2, dim=-1)

    def no_topk(*args, **kwargs):
        raise AssertionError("torch's topk ran")

    monkeypatch.setattr(torch.Tensor, "topk", no_topk)
    values, indices = top_k(scores, 2)  # 64 k > E: passes of max
    assert torch.equal(indices, expected.indices) and torch.equal(values, expected.values)
    with pytest.raises(AssertionError, match="topk ran"):
        top_k(scores[:4], 2)  # few rows: torch's topk
    with pytest.raises(AssertionError, match="topk ran"):
        top_k(torch.randn(MANY_ROWS, 128), 2)  # 64 k <= E: torch's partial sort


@pytest.mark.parametrize("k", [3, 4])
def test_top_k_takes_up_to_max_passes_of_max_as_asked(k, monkeypatch):
    """``max_passes`` raises the k done by passes of max (the compiled routing's candidates,
    k + 2 of them), ``many_rows`` states the row count (symbolic under torch.compile): the same
    values and experts as torch's topk, highest first."""
    torch.manual_seed(k)
    scores = torch.randn(40, 64)
    expected = scores.topk(k, dim=-1)

    def no_topk(*args, **kwargs):
        raise AssertionError("torch's topk ran")

    monkeypatch.setattr(torch.Tensor, "topk", no_topk)
    values, indices = top_k(scores, k, many_rows=True, max_passes=4)
    assert torch.equal(indices, expected.indices) and torch.equal(values, expected.values)
    with pytest.raises(AssertionError, match="topk ran"):
        top_k(scores, k, many_rows=True)  # k above the default 2 passes
    with pytest.raises(AssertionError, match="topk ran"):
        top_k(scores, k, max_passes=4)  # 40 rows: not many, unless told


def test_top_k_with_tied_scores_returns_two_distinct_experts():
    scores = torch.zeros(MANY_ROWS, 64)
    scores[:, 7] = scores[:, 30] = 5.0
    values, indices = top_k(scores, 2)
    assert torch.equal(values, torch.full((MANY_ROWS, 2), 5.0))
    assert torch.equal(indices.sort(dim=-1).values, torch.tensor([[7, 30]]).expand(MANY_ROWS, 2))
