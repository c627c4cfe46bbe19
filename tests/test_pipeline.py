"""The config-driven pipeline on a tiny local model: every method in one table, and a rerun
that trains nothing (everything cached)."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_llama

from phatgoose import pipeline
from phatgoose.errors import PhatgooseError
from phatgoose.eval.report import write_report
from phatgoose.eval.stats import paired_bootstrap
from phatgoose.models import device_name
from phatgoose.pipeline import ORACLE, OWN_EXPERT, PipelineConfig, run_pipeline

METHODS = ["base", "phatgoose", "arrow", "average-activation", "retrieval", "uniform",
           "merged-factors", "multitask", "oracle"]


def jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_pipeline_runs_every_method_and_resumes(tokenizer, tmp_path, monkeypatch):
    real_evaluate = pipeline.evaluate
    model_dir = tmp_path / "model"
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    parity = jsonl(tmp_path / "parity.jsonl", [
        {"input": f"Is {n} even?", "choices": ["yes", "no"], "target": "yes" if n % 2 == 0
         else "no"} for n in range(30)])
    colors = jsonl(tmp_path / "colors.jsonl", [
        {"input": f"Color {n}?", "choices": ["red", "blue"], "target": ["red", "blue"][n % 2]}
        for n in range(30)])
    held_out = jsonl(tmp_path / "held.jsonl", [
        {"input": f"Number {n}: red or blue?", "choices": ["red", "blue"],
         "target": ["red", "blue"][n % 3 % 2]} for n in range(30)])
    config = PipelineConfig.from_dict({
        "model": str(model_dir), "workdir": str(tmp_path / "run"),
        "experts": [parity, colors], "suites": {"held-in": [parity, colors],
                                                 "held-out": [held_out]},
        "methods": METHODS, "top_k_ablation": [1], "routing_examples": 3,
        "split": {"max_test": 5},
        "expert": {"steps": 3, "batch_size": 4, "rank": 2, "lr": 0.01, "eval_every": 3},
        "gate": {"steps": 2, "batch_size": 4, "lr": 0.01},
    })
    messages = []
    first = run_pipeline(config, log=messages.append)
    rows = first["summaries"]
    assert list(rows) == [ORACLE if m == "oracle" else m for m in METHODS if m != "multitask"] + [
        "phatgoose@k1", "multitask", OWN_EXPERT]
    assert first["suites"] == {"held-in": ["parity", "colors"], "held-out": ["held"]}
    assert all(rows[m]["tasks"]["held"]["n"] == 5 for m in rows if m != OWN_EXPERT)
    # held-in tasks get the expert trained on them, held-out tasks the oracle
    assert set(rows[OWN_EXPERT]["tasks"]) == {"parity", "colors"}
    assert rows[OWN_EXPERT]["tasks"]["parity"]["expert"] == "parity"
    assert set(rows[ORACLE]["tasks"]) == {"held"}
    assert set(rows["phatgoose@k1"]["tasks"]) == {"parity", "colors", "held"}
    mt = json.loads((tmp_path / "run" / "multitask" / "expert.json").read_text())
    assert mt["config"]["steps"] == 2 * 3  # compute equal to the experts' combined steps
    assert first["table"].splitlines()[0] == "| method | held | parity | colors | average |"
    assert not any("cached" in m for m in messages)
    # before the gates, each held-in expert was checked against the base model on its own
    # test split, with the paired interval that the report recomputes from the predictions
    for task in ("parity", "colors"):
        check = next(m for m in messages if m.startswith(f"expert {task}: "))
        own, base = rows[OWN_EXPERT]["tasks"][task], rows["base"]["tasks"][task]
        assert f"{own['accuracy']:.3f} on its test split against {base['accuracy']:.3f}" in check
        preds = {m: [json.loads(line)["correct"] for line in
                     (tmp_path / "run" / f"predictions-{m}.jsonl").read_text().splitlines()
                     if json.loads(line)["task"] == task] for m in (f"expert_{task}", "base")}
        diff, low, high = paired_bootstrap(preds[f"expert_{task}"], preds["base"])
        assert f"expert - base {diff:+.3f} [{low:+.3f}, {high:+.3f}]" in check
        assert check.endswith("beats the base model" if low > 0 else "tune it")
    shares = json.loads((tmp_path / "run" / "routing_shares.json").read_text())
    for task in ("parity", "colors", "held"):
        for module_shares in shares["tasks"][task].values():
            assert abs(sum(module_shares) - 1) < 1e-5 and len(module_shares) == 2
    assert (tmp_path / "run" / "routing_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "run" / "routing_layers.png").stat().st_size > 1000

    messages.clear()
    calls = []
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: calls.append(a))
    second = run_pipeline(config, log=messages.append)
    assert sum("cached" in m for m in messages) == 5  # 2 experts, 2 gates, multitask
    checks = [i for i, m in enumerate(messages) if "on its test split" in m]
    gates = [i for i, m in enumerate(messages) if m.startswith("gate ")]
    assert len(checks) == 2 and len(gates) == 2 and max(checks) < min(gates)
    assert calls == []  # every (method, task) evaluation came from the cache
    assert second["summaries"] == rows
    # the cost of each stage is what its cached items recorded when they were made
    compute = second["compute_s"]
    assert compute == first["compute_s"]
    metas = [json.loads((d / "expert.json").read_text())
             for d in (tmp_path / "run" / "experts").iterdir()]
    assert len(metas) == 2
    assert compute["train experts"] == round(sum(m["metrics"]["train_seconds"] for m in metas), 1)
    assert {"train gates", "train multitask", "eval base", "eval phatgoose",
            "eval single experts", "eval own experts"} <= set(compute)
    assert second["timings_s"]["train experts"] < compute["train experts"] + 1
    # each item recorded the device that made it, with the processor: all of it on this CPU
    cpu = device_name(torch.device("cpu"))
    by_device = second["compute_s_by_device"]
    assert set(by_device) == set(compute)
    assert all(set(d) == {cpu} and d[cpu] == compute[s] for s, d in by_device.items())

    # new gates: the routed methods are evaluated again; the base model, each single expert
    # and each own expert depend on none of it, and come from the cache
    monkeypatch.undo()
    evaluated, adapters = [], []
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: evaluated.append(k["desc"])
                        or real_evaluate(*a, **k))
    monkeypatch.setattr(pipeline, "evaluate_adapter", lambda *a, **k: adapters.append(a[1]))
    run_pipeline(replace(config, gate=replace(config.gate, lr=0.02)), log=messages.append)
    assert adapters == []  # own experts and multitask: cached
    assert "eval phatgoose" in evaluated and "eval arrow" in evaluated
    assert not [d for d in evaluated if d == "eval base" or d.startswith("eval single:")]

    report = write_report(tmp_path / "run", second, "Results", "phatgoose bench x.yaml")
    text = report.read_text()
    assert "## held-in" in text and "## held-out" in text
    assert "phatgoose minus each method (paired bootstrap" in text
    assert "## Does each expert beat the base model on its own task?" in text
    assert "![PHATGOOSE routing share per task and expert](routing_heatmap.png)" in text
    assert "| stage | this run | computed |" in text and "| total |" in text
    assert f"shows its whole cost). All of it on {cpu}." in text
    # an item made on another device (say a GPU run that shared the cache): a column each
    cached = next((tmp_path / "run" / "eval" / "base").glob("*.json"))
    data = json.loads(cached.read_text())
    gpu = "cuda (NVIDIA H100 80GB HBM3)"
    cached.write_text(json.dumps({**data, "device": gpu, "seconds": 2.5}))
    mixed = run_pipeline(config, log=messages.append)
    assert mixed["compute_s_by_device"]["eval base"][gpu] == 2.5
    text = write_report(tmp_path / "run", mixed, "Results", "x").read_text()
    assert f"| stage | this run | computed | on {cpu} | on {gpu} |" in text
    assert "Then split by the device that computed them." in text
    row = next(line for line in text.splitlines() if line.startswith("| eval base |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert float(cells[2]) == round(float(cells[3]) + 2.5, 1) and cells[4] == "2.5"
    expert = rows[ORACLE]["tasks"]["held"]["expert"]
    assert expert in ("parity", "colors")
    csv_rows = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "suite,method,task,n,accuracy,low,high"
    # held-in: 2 tasks x every method but the oracle; held-out: 1 task x all but own expert
    assert len(csv_rows) == 1 + 2 * (len(rows) - 1) + (len(rows) - 1)
    base_row = next(r for r in csv_rows if r.startswith("held-out,base,held,"))
    accuracy, low, high = map(float, base_row.split(",")[4:])
    assert accuracy == rows["base"]["tasks"]["held"]["accuracy"] and low <= accuracy <= high


def test_a_config_asking_for_fewer_than_one_expert_per_token_is_refused():
    base = {"experts": ["a.jsonl"]}
    assert PipelineConfig.from_dict({**base, "top_k": 1, "top_k_ablation": [1, 4]}).top_k == 1
    with pytest.raises(PhatgooseError, match="must be at least 1.*got 0"):
        PipelineConfig.from_dict({**base, "top_k": 0})
    with pytest.raises(PhatgooseError, match="must be at least 1.*got -1"):
        PipelineConfig.from_dict({**base, "top_k_ablation": [2, -1]})


def test_expert_overrides_change_one_recipe_and_bad_ones_are_refused():
    base = {"experts": ["a.jsonl", "b.jsonl"], "expert": {"steps": 300, "lr": 1e-3}}
    config = PipelineConfig.from_dict({**base, "expert_overrides": {"b.jsonl": {"steps": 600}}})
    assert config.expert_config("a.jsonl") == config.expert  # untouched: same cache key
    assert (config.expert_config("b.jsonl").steps, config.expert_config("b.jsonl").lr) == (
        600, 1e-3)
    with pytest.raises(PhatgooseError, match="names 'c.jsonl', which is not one of the experts"):
        PipelineConfig.from_dict({**base, "expert_overrides": {"c.jsonl": {"steps": 1}}})
    with pytest.raises(PhatgooseError, match=r"unknown keys \['step'\] in expert_overrides"):
        PipelineConfig.from_dict({**base, "expert_overrides": {"a.jsonl": {"step": 1}}})
    with pytest.raises(PhatgooseError, match=r"unknown keys \['targets'\]"):  # one module set
        PipelineConfig.from_dict({**base, "expert_overrides": {"a.jsonl": {"targets": ["q"]}}})
    with pytest.raises(PhatgooseError, match="must map recipe keys to values"):
        PipelineConfig.from_dict({**base, "expert_overrides": {"a.jsonl": 600}})
    with pytest.raises(PhatgooseError, match="init must be"):  # at parse time, not mid-run
        PipelineConfig.from_dict({**base, "expert_overrides": {"a.jsonl": {"init": "bad"}}})
