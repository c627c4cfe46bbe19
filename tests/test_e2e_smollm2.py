"""End to end on the real embedded SmolLM2-135M-Instruct: 2 tiny experts, their gates, a
library, routed evaluation and routed generation. Slow (a few minutes on 2 CPU cores)."""

import json

import pytest
import torch

from phatgoose.cli import main
from phatgoose.library import ExpertLibrary
from phatgoose.models import load_base_model
from phatgoose.routing import route, routed_modules, unroute

pytestmark = pytest.mark.slow


def write_task(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    parity = [{"input": f"Is {n} even or odd?", "choices": ["even", "odd"],
               "target": "even" if n % 2 == 0 else "odd"} for n in range(60)]
    fruit = ["apple", "banana", "lemon", "cherry", "grape", "lime"]
    colors = ["red", "yellow", "yellow", "red", "purple", "green"]
    color = [{"input": f"What color is a ripe {f} ({i})?", "choices": sorted(set(colors)),
              "target": c} for i in range(10) for f, c in zip(fruit, colors)]
    return {"parity": write_task(root / "parity.jsonl", parity),
            "color": write_task(root / "color.jsonl", color)}


def test_pipeline_on_smollm2(tasks, tmp_path):
    fast = ["--steps", "3", "--batch-size", "4", "--max-input-tokens", "64", "--split-max-test",
            "8", "--split-max-validation", "4"]
    for name, task in tasks.items():
        assert main(["train-expert", "--task", str(task), "--out", str(tmp_path / name),
                     "--rank", "4", "--alpha", "8", "--lr", "2e-3", "--eval-every", "3",
                     *fast]) == 0
        assert main(["train-gate", str(tmp_path / name), "--lr", "1e-2", *fast[:-4]]) == 0
    assert main(["library", "build", str(tmp_path / "lib"),
                 *(str(tmp_path / n) for n in tasks)]) == 0
    assert main(["library", "verify", str(tmp_path / "lib"), "--model",
                 "embedded:smollm2-135m-instruct"]) == 0
    assert main(["eval", "--library", str(tmp_path / "lib"), "--task", str(tasks["parity"]),
                 "--method", "base", "phatgoose", "--split-max-test", "8",
                 "--out", str(tmp_path / "eval"), "--predictions"]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    for method in ("base", "phatgoose"):
        assert results[method]["tasks"]["parity"]["n"] == 8
        assert 0.0 <= results[method]["tasks"]["parity"]["accuracy"] <= 1.0
    nll = {m: [json.loads(line)["nll"] for line in
               (tmp_path / "eval" / f"predictions-{m}.jsonl").read_text().splitlines()]
           for m in ("base", "phatgoose")}
    assert nll["base"] != nll["phatgoose"]  # the routed experts change the scores

    base = load_base_model()
    library = ExpertLibrary(tmp_path / "lib")
    route(base.model, library, top_k=2)
    assert len(routed_modules(base.model)) == 30 * 7
    ids = base.tokenizer(["Is 7 even or odd?\nAnswer:"], return_tensors="pt").input_ids
    out = base.model.generate(input_ids=ids, max_new_tokens=5, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    forced = base.model(input_ids=out.sequences[:, :-1]).logits[:, ids.shape[1] - 1:]
    assert torch.equal(forced.argmax(-1), out.sequences[:, ids.shape[1]:])
    torch.testing.assert_close(forced, torch.stack(out.logits, 1), atol=1e-3, rtol=1e-3)
    unroute(base.model)
