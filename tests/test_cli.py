"""The command line: --help everywhere, YAML configs, and one-line errors for bad input."""

import json

import pytest
import yaml
from conftest import random_expert, tiny_gpt2, tiny_llama

from phatgoose.cli import build_parser, main
from phatgoose.models import load_base_model
from phatgoose.models.base import wrap_model

COMMANDS = [
    ["data"], ["data", "bigbench"], ["train-expert"], ["train-gate"], ["library"],
    ["library", "build"], ["library", "add"], ["library", "list"], ["library", "show"],
    ["library", "verify"], ["library", "vectors"], ["eval"], ["pipeline"], ["bench"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*command, "--help"])
    assert exit.value.code == 0
    assert "usage: phatgoose" in capsys.readouterr().out


@pytest.fixture
def model_dir(tokenizer, tmp_path):
    """A tiny Llama saved as a local checkpoint, loadable with --model PATH."""
    path = tmp_path / "tiny-llama"
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "toy.jsonl"
    rows = [{"input": f"Number {i}: color?", "choices": ["red", "blue"],
             "target": "red" if i % 2 == 0 else "blue"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_expert_gate_library_eval_from_the_command_line(model_dir, task_file, tmp_path,
                                                              capsys):
    config = tmp_path / "expert.yaml"
    config.write_text(yaml.safe_dump({"model": str(model_dir), "task": str(task_file), "steps": 3,
                                      "batch_size": 4, "rank": 2, "lr": 0.01, "eval_every": 3}))
    code, out, err = run(["train-expert", "--config", config, "--out", tmp_path / "e1",
                          "--steps", 2, "--log", tmp_path / "log.jsonl"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "e1" / "expert.json").read_text())
    assert meta["config"]["steps"] == 2  # the command line wins over the config file
    assert meta["config"]["rank"] == 2 and meta["config"]["lr"] == 0.01  # from the config
    code, out, err = run(["train-gate", tmp_path / "e1", "--model", model_dir, "--task",
                          task_file, "--steps", 2, "--batch-size", 4], capsys)
    assert code == 0, err
    assert (tmp_path / "e1" / "gates.safetensors").exists()
    code, out, err = run(["library", "build", tmp_path / "lib", tmp_path / "e1"], capsys)
    assert code == 0 and "1 experts" in out
    code, out, err = run(["library", "list", tmp_path / "lib"], capsys)
    assert "| toy | toy |" in out
    code, out, err = run(["library", "verify", tmp_path / "lib", "--model", model_dir], capsys)
    assert code == 0 and "is sound" in out, err
    code, out, err = run(["library", "vectors", tmp_path / "lib", "--model", model_dir,
                          "--max-examples", 10], capsys)
    assert code == 0 and "computed for 1 expert(s), 0 reused" in out, err
    assert (tmp_path / "lib" / "experts" / "toy" / "average_activation.safetensors").exists()
    code, out, err = run(["eval", "--model", model_dir, "--library", tmp_path / "lib", "--task",
                          task_file, "--method", "base", "phatgoose", "single:toy",
                          "average-activation", "--out", tmp_path / "eval", "--predictions"],
                         capsys)
    assert code == 0, err
    assert out.splitlines()[0] == "| method | toy | average |"
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results) == {"base", "phatgoose", "single:toy", "average-activation"}
    # with one expert, every routing method is that expert alone
    assert results["phatgoose"] == results["single:toy"] == results["average-activation"]
    assert results["base"]["tasks"]["toy"]["n"] == 6  # 20% of 30 examples
    assert (tmp_path / "eval" / "predictions-single_toy.jsonl").exists()


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("phatgoose")]  # no progress
    assert len(lines) == 1 and lines[0].startswith("phatgoose: error: "), err
    for needle in needles:
        assert needle in lines[0]


def test_missing_corrupt_and_empty_task_files(model_dir, tmp_path, capsys):
    args = ["train-expert", "--model", model_dir, "--out", tmp_path / "e"]
    one_line_error(*run([*args, "--task", tmp_path / "nope.json"], capsys)[::2], "does not exist")
    bad = tmp_path / "bad" / "task.json"
    bad.parent.mkdir()
    bad.write_text("{oops")
    one_line_error(*run([*args, "--task", bad], capsys)[::2], "task.json", "JSON")
    empty = tmp_path / "empty" / "task.json"
    empty.parent.mkdir()
    empty.write_text(json.dumps({"examples": [{"input": "", "target": "x"}]}))
    one_line_error(*run([*args, "--task", empty], capsys)[::2], "no usable examples")
    assert not (tmp_path / "e").exists()


def test_nan_loss_from_the_command_line(model_dir, task_file, tmp_path, capsys):
    code, _, err = run(["train-expert", "--model", model_dir, "--task", task_file, "--out",
                        tmp_path / "e", "--steps", 5, "--batch-size", 4, "--lr", 1e30],
                       capsys)
    one_line_error(code, err, "NaN/inf at step", "kept the last good parameters")
    meta = json.loads((tmp_path / "e" / "expert.json").read_text())
    assert meta["metrics"]["diverged_at"] is not None


def test_library_errors_from_the_command_line(tokenizer, model_dir, tmp_path, capsys):
    llama = load_base_model(str(model_dir))
    other = wrap_model(tiny_llama(len(tokenizer), seed=5), tokenizer, "other")
    run(["library", "build", tmp_path / "lib", random_expert(llama, tmp_path / "a", 0)], capsys)
    code, _, err = run(["library", "add", tmp_path / "lib",
                        random_expert(other, tmp_path / "b", 1)], capsys)
    one_line_error(code, err, "retrain it on the library's base model")
    gpt2_dir = tmp_path / "gpt2"
    tiny_gpt2(len(tokenizer)).save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)
    code, _, err = run(["library", "verify", tmp_path / "lib", "--model", gpt2_dir], capsys)
    one_line_error(code, err, "differ from the base model")
    (tmp_path / "lib" / "experts" / "a" / "gates.safetensors").write_text("not tensors")
    code, _, err = run(["library", "verify", tmp_path / "lib"], capsys)
    one_line_error(code, err, "not a valid safetensors file")
    code, _, err = run(["eval", "--task", "x", "--method", "phatgoose"], capsys)
    one_line_error(code, err, "--library")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="is not an expert library"):
        main(["library", "list", str(tmp_path), "--debug"])


def test_unknown_config_keys_are_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("stepz: 3\n")
    code, _, err = run(["train-expert", "--config", config, "--task", "t", "--out", "o"], capsys)
    one_line_error(code, err, "unknown options ['stepz']")
    assert build_parser().parse_args(["eval", "--task", "t"]).top_k == 2


def test_bench_bf16_flags_set_autocast_in_every_stage(tmp_path, monkeypatch, capsys):
    from phatgoose import pipeline
    from phatgoose.eval import report

    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({"experts": ["a"], "workdir": str(tmp_path / "run"),
                                      "gate": {"steps": 3, "bf16": False}}))
    seen, commands = [], []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda c: seen.append(c) or {})
    monkeypatch.setattr(report, "write_report", lambda work, result, title, command:
                        commands.append(command) or config)
    assert main(["bench", str(config), "--bf16", "--workdir", str(tmp_path / "bf16")]) == 0
    assert seen[0].expert.bf16 and seen[0].gate.bf16 and seen[0].eval.bf16
    assert seen[0].gate.steps == 3 and seen[0].workdir == str(tmp_path / "bf16")
    assert commands == [f"phatgoose bench {config} --bf16 --workdir {tmp_path / 'bf16'}"]
    assert main(["bench", str(config)]) == 0  # without the flag, the config decides
    assert not (seen[1].expert.bf16 or seen[1].gate.bf16 or seen[1].eval.bf16)
    # unset: training in fp32, evaluation in bf16 where it is faster; a null bf16 where it is
    # faster too, made definite before any cache key
    config.write_text(yaml.safe_dump({"experts": ["a"], "workdir": str(tmp_path / "run"),
                                      "gate": {"steps": 3, "bf16": None}}))
    monkeypatch.setattr("phatgoose.models.base.bf16_is_faster", lambda device: True)
    assert main(["bench", str(config)]) == 0
    assert (seen[2].expert.bf16, seen[2].gate.bf16, seen[2].eval.bf16) == (False, True, True)
    assert main(["bench", str(config), "--no-bf16"]) == 0  # and the command line's over both
    assert not (seen[3].expert.bf16 or seen[3].gate.bf16 or seen[3].eval.bf16)
    assert commands[-1] == f"phatgoose bench {config} --no-bf16"


def test_bench_methods_replace_the_configs_methods_and_k_ablation(tmp_path, monkeypatch):
    from phatgoose import pipeline
    from phatgoose.eval import report

    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({"experts": ["a"], "methods": ["base", "phatgoose", "arrow"],
                                      "top_k_ablation": [1, 4]}))
    seen, commands = [], []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda c: seen.append(c) or {})
    monkeypatch.setattr(report, "write_report", lambda work, result, title, command:
                        commands.append(command) or config)
    assert main(["bench", str(config), "--methods", "base", "phatgoose"]) == 0
    assert seen[0].methods == ["base", "phatgoose"] and seen[0].top_k_ablation == []
    assert commands == [f"phatgoose bench {config} --methods base phatgoose"]
    assert main(["bench", str(config)]) == 0  # without the flag, the config decides
    assert seen[1].methods == ["base", "phatgoose", "arrow"] and seen[1].top_k_ablation == [1, 4]
