"""Rank classification and generation against independent computations."""

import json
import sys

import torch
from conftest import toy_examples
from torch.utils._python_dispatch import TorchDispatchMode

from phatgoose.data.tasks import Example
from phatgoose.eval import EvalConfig, choice_nll, evaluate, evaluate_task, markdown_table, summary
from phatgoose.eval.evaluate import TaskResult, predictions_path, write_predictions
from phatgoose.experts.loop import inference_autocast


def reference_nll(base, prompt: str, choice: str) -> float:
    """Mean NLL of the choice tokens, one unpadded forward on the whole text."""
    tok = base.tokenizer
    p = tok(prompt).input_ids
    c = tok(" " + choice, add_special_tokens=False).input_ids
    if base.is_seq2seq:
        logits = base.model(input_ids=torch.tensor([p]), labels=torch.tensor([c])).logits[0]
        logp = logits.log_softmax(-1)
        return -sum(logp[i, t].item() for i, t in enumerate(c)) / len(c)
    ids = torch.tensor([p + c])
    logp = base.model(input_ids=ids).logits[0].log_softmax(-1)
    return -sum(logp[len(p) + i - 1, t].item() for i, t in enumerate(c)) / len(c)


def test_choice_scores_match_unbatched_reference(base):
    examples = [
        Example("Is 3 odd?", ("yes",), ("yes", "no", "maybe so")),
        Example("Convert 3 meters to centimeters, quickly and exactly.", ("300 cm",),
                ("300 cm", "3 cm")),
    ]
    scores = choice_nll(base, examples, EvalConfig(batch_size=3))  # batches cut across examples
    for e, row in zip(examples, scores):
        expected = [reference_nll(base, e.prompt, c) for c in e.choices]
        assert row == __import__("pytest").approx(expected, abs=1e-4)


def test_rank_classification_accuracy_and_predictions(llama, tmp_path):
    examples = toy_examples(6)
    results = evaluate(llama, {"toy": examples}, EvalConfig(batch_size=4))
    r = results["toy"]
    scores = choice_nll(llama, examples, EvalConfig())
    predicted = [e.choices[min(range(2), key=s.__getitem__)] for e, s in zip(examples, scores)]
    expected = sum(p in e.targets for p, e in zip(predicted, examples)) / len(examples)
    assert r.kind == "multiple_choice" and r.n == 6 and r.accuracy == expected
    assert [p["prediction"] for p in r.predictions] == predicted
    write_predictions(tmp_path / "p.jsonl", results)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and rows[0]["task"] == "toy" and "nll" in rows[0]


def test_predictions_file_is_named_per_method_and_updated_per_task(tmp_path):
    path = predictions_path(tmp_path, "expert:color.rgb")
    assert path == tmp_path / "predictions-expert_color.rgb.jsonl"
    a = TaskResult("a", "multiple_choice", 1.0, [{"correct": True}])
    b = TaskResult("b", "multiple_choice", 0.0, [{"correct": False}, {"correct": False}])
    write_predictions(path, {"a": a, "b": b})
    write_predictions(path, {"b": TaskResult("b", "multiple_choice", 1.0, [{"correct": True}])})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"task": "a", "index": 0, "correct": True},
                    {"task": "b", "index": 0, "correct": True}]  # b replaced, a kept
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_generation_exact_match(base):
    prompt = Example("Say something", ("x",))
    tok = base.tokenizer
    ids = tok([prompt.prompt], return_tensors="pt")
    out = base.model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if not base.is_seq2seq:
        out = out[:, ids.input_ids.shape[1]:]
    greedy = tok.decode(out[0], skip_special_tokens=True).strip().split("\n")[0].strip()
    hit = Example("Say something", (greedy.upper() + "  ",))  # case and spacing are normalised
    miss = Example("Say something", (greedy + " nope",))
    results = evaluate(base, {"gen": [hit, miss]}, EvalConfig(max_new_tokens=4, batch_size=2))
    assert results["gen"].kind == "generation"
    assert [p["correct"] for p in results["gen"].predictions] == [True, False]
    assert results["gen"].predictions[0]["prediction"] == greedy
    assert greedy or base.is_seq2seq  # the tiny Llama says something; the tiny T5 may not


def test_summary_and_markdown_table(llama):
    rows = {"base": summary(evaluate(llama, {"a": toy_examples(4), "b": toy_examples(2, 1)}))}
    assert rows["base"]["average"] == (rows["base"]["tasks"]["a"]["accuracy"]
                                       + rows["base"]["tasks"]["b"]["accuracy"]) / 2
    table = markdown_table(rows).splitlines()
    assert table[0] == "| method | a | b | average |"
    assert table[2].startswith("| base | ") and len(table) == 3


def test_shared_prompt_scores_equal_full_forward_scores(llama, tmp_path, monkeypatch):
    """The KV-cache path scores every choice as one full forward per choice does, routed too."""
    from conftest import random_expert

    from phatgoose.library import ExpertLibrary
    from phatgoose.routing import route

    examples = [
        Example("Is 3 odd?", ("yes",), ("yes", "no", "maybe so, or not at all")),
        Example("Pick a color.", ("red",), ("red", "blue green")),
        Example("One choice", ("a b c",), ("a b c",)),
    ]
    dirs = [random_expert(llama, tmp_path / f"e{i}", seed=i) for i in range(3)]
    for routed in (False, True):
        if routed:
            route(llama.model, ExpertLibrary.build(tmp_path / "lib", dirs), top_k=2)
        full = choice_nll(llama, examples, EvalConfig(share_prompt=False, batch_size=2))
        for batch_size, choice_tokens in ((1, 2048), (2, 2048), (16, 2048), (16, 1)):
            # prompts of different lengths share a left-padded batch; choices are cut into
            # forwards of at most choice_tokens tokens, each on its own copy of the cache
            monkeypatch.setattr(sys.modules["phatgoose.eval.evaluate"], "CHOICE_TOKENS",
                                choice_tokens)
            shared = choice_nll(llama, examples, EvalConfig(batch_size=batch_size))
            for s, f in zip(shared, full):
                assert s == __import__("pytest").approx(f, abs=1e-4)


class WeightCasts(TorchDispatchMode):
    """Counts fp32 -> bf16 casts of 2-D tensors (the weights autocast casts for matmuls)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and args[0].ndim == 2
                and args[0].dtype == torch.float32 and kwargs.get("dtype") == torch.bfloat16):
            self.count += 1
        return func(*args, **kwargs)


def test_bf16_evaluation_casts_each_weight_once_and_scores_as_autocast_does(base):
    model, config = base.model, EvalConfig(bf16=True, batch_size=2)
    examples = toy_examples(4) + [Example("Say something", ("x",))]  # scored and generated
    plain = choice_nll(base, examples[:4], config)  # autocast entered per forward
    result = evaluate_task(base, "toy", examples, config)
    assert [p["nll"] for p in result.predictions[:4]] == [[round(x, 5) for x in row]
                                                         for row in plain]
    assert not any(p.requires_grad for p in model.parameters())  # frozen again
    ids = torch.tensor([[1, 5, 7, 9]])
    forward = (lambda: model(input_ids=ids, labels=ids)) if base.is_seq2seq else (
        lambda: model(input_ids=ids))
    weights = sum(m.weight.ndim == 2 for m in model.modules() if isinstance(m, torch.nn.Linear))
    with inference_autocast(model, True, torch.device("cpu")):
        with WeightCasts() as first:
            forward()
        with WeightCasts() as second:
            forward()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), WeightCasts() as plain:
        forward()
    assert first.count >= weights and plain.count >= weights  # every linear's weight cast...
    assert second.count <= first.count - weights  # ...once per region: not again
