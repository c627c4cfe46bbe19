"""The config-driven pipeline on a tiny local model: every method in one table, and a rerun
that trains nothing (everything cached)."""

import json

from conftest import tiny_llama

from phatgoose.eval.report import write_report
from phatgoose.pipeline import ORACLE, PipelineConfig, run_pipeline

METHODS = ["base", "phatgoose", "arrow", "average-activation", "retrieval", "uniform",
           "merged-factors", "multitask", "oracle"]


def jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_pipeline_runs_every_method_and_resumes(tokenizer, tmp_path):
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
        "experts": [parity, colors], "eval_tasks": [held_out], "methods": METHODS,
        "split": {"max_test": 5},
        "expert": {"steps": 3, "batch_size": 4, "rank": 2, "lr": 0.01, "eval_every": 3},
        "gate": {"steps": 2, "batch_size": 4, "lr": 0.01},
    })
    messages = []
    first = run_pipeline(config, log=messages.append)
    rows = first["summaries"]
    assert list(rows) == [ORACLE if m == "oracle" else m for m in METHODS]
    assert all(rows[m]["tasks"]["held"]["n"] == 5 for m in rows)
    assert rows["uniform"] != rows["base"] or rows["uniform"]["tasks"]["held"]["accuracy"] >= 0
    mt = json.loads((tmp_path / "run" / "multitask" / "expert.json").read_text())
    assert mt["config"]["steps"] == 2 * 3  # compute equal to the experts' combined steps
    assert first["table"].splitlines()[0] == "| method | held | average |"
    assert not any("cached" in m for m in messages)

    messages.clear()
    second = run_pipeline(config, log=messages.append)
    assert sum("cached" in m for m in messages) == 5  # 2 experts, 2 gates, multitask
    assert second["summaries"] == rows  # deterministic

    report = write_report(tmp_path / "run", second, "Results", "phatgoose bench x.yaml")
    text = report.read_text()
    assert "| base | " in text and "## phatgoose minus each method" in text
    expert = rows[ORACLE]["tasks"]["held"]["expert"]
    assert expert in ("parity", "colors")
    csv_rows = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert csv_rows[0] == "method,task,n,accuracy,low,high"
    assert len(csv_rows) == 1 + 2 * len(METHODS)  # each method: the task and the average
    base_row = next(r for r in csv_rows if r.startswith("base,held,"))
    accuracy, low, high = map(float, base_row.split(",")[3:])
    assert accuracy == rows["base"]["tasks"]["held"]["accuracy"] and low <= accuracy <= high
