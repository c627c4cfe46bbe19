"""Average-activation routing vectors: batched and padded computation against an unpadded
one-example-at-a-time reference, storage and reuse, and routing with them."""

import pytest
import torch
from conftest import random_expert, toy_examples

from phatgoose.data.encode import encode
from phatgoose.library import ExpertLibrary
from phatgoose.library.expert import read_safetensors
from phatgoose.routing import RoutedLinear, route, routed_modules, standardise, unroute
from phatgoose.routing.attach import AVERAGE_ACTIVATION
from phatgoose.routing.vectors import average_activations, store_average_activations


@pytest.fixture
def library(base, tmp_path):
    dirs = [random_expert(base, tmp_path / f"e{i}", seed=i) for i in range(2)]
    return ExpertLibrary.build(tmp_path / "lib", dirs)


def reference_means(base, library, name, examples):
    """Each example alone (no padding): mean of each module's input over its tokens."""
    route(base.model, library, method=f"single:{name}")
    seen, totals = {}, {}
    hooks = [m.register_forward_pre_hook(
        lambda _, args, n=n: seen.__setitem__(n, args[0][0].float().mean(0)))
        for n, m in routed_modules(base.model).items()]
    for e in examples:
        enc = encode(base.tokenizer, e.prompt, e.continuation, base.is_seq2seq)
        ids = torch.tensor([enc.input_ids])
        if base.is_seq2seq:
            base.model(input_ids=ids, labels=torch.tensor([enc.labels]))
        else:
            base.model(input_ids=ids)
        for n, v in seen.items():
            totals[n] = totals.get(n, 0) + v
    for h in hooks:
        h.remove()
    unroute(base.model)
    return {n: v / len(examples) for n, v in totals.items()}


def test_batched_averages_match_one_example_at_a_time(base, library):
    examples = toy_examples(7) + [toy_examples(1)[0].__class__("A much longer input " * 3,
                                                                ("red",), ("red", "blue"))]
    batched = average_activations(base, library, "e1", examples, batch_size=3)
    expected = reference_means(base, library, "e1", examples)
    assert set(batched) == set(expected) == set(library.lora("e1"))
    for module in expected:
        torch.testing.assert_close(batched[module], expected[module], atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, RoutedLinear) for m in base.model.modules())


def test_stored_once_then_reused_and_routed(base, library):
    data = {"e0": toy_examples(6), "e1": toy_examples(5, seed=2)}
    with pytest.raises(Exception, match="compute them first"):
        route(base.model, library, method="average-activation")
    assert store_average_activations(base, library, data, batch_size=4) == ["e0", "e1"]
    assert store_average_activations(base, library, data, batch_size=4) == []  # reused
    assert store_average_activations(base, library, data, max_examples=3) == ["e0", "e1"]
    stored = read_safetensors(library.expert_dir("e1") / AVERAGE_ACTIVATION)
    route(base.model, library, method="average-activation", top_k=1)
    for module, layer in routed_modules(base.model).items():
        torch.testing.assert_close(layer.router.vectors[1], standardise(stored[module]))
    unroute(base.model)
