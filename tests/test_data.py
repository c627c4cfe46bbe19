"""Tasks: BIG-bench / JSONL / Hugging Face loading, splits, and BIG-bench fetching (no network)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from phatgoose.data import (
    PROMPT_SUFFIX,
    Example,
    Task,
    bigbench_task_path,
    default_cache_dir,
    fetch_bigbench,
    load_examples_jsonl,
    load_task,
    task_from_hf_dataset,
)
from phatgoose.errors import DataError


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


MC = {
    "name": "mc",
    "examples": [
        {"input": "2+2?", "target_scores": {"3": 0, "4": 1, "5": 0}},
        {"input": "Sky?", "target_scores": {"blue": 1, "azure": 1.0, "red": 0}},
        {"input": "", "target_scores": {"a": 1}},  # empty input: skipped
        {"input": "None?", "target_scores": {"a": 0, "b": 0}},  # no positive score: skipped
        {"input": "Fallback?", "target": "yes"},  # generation inside a MC task
    ],
}
GEN = {
    "name": "gen",
    "task_prefix": "Translate.",
    "examples": [
        {"input": "chat", "target": "cat"},
        {"input": "chien", "target": ["dog", "hound"]},
        {"input": "rien", "target": []},  # no targets: skipped
        {"input": "vide", "target": "  "},  # blank target: skipped
    ],
}


def gen_task(n: int, name: str = "t") -> Task:
    return Task(name, [Example(f"q{i}", (f"a{i}",)) for i in range(n)])


# Example and Task


def test_example_prompt_and_continuation():
    ex = Example("What is 2+2?", ["4", "four"], ["3", "4"])
    assert ex.prompt == "What is 2+2?" + PROMPT_SUFFIX == "What is 2+2?\nAnswer:"
    assert ex.continuation == " 4"
    assert ex.targets == ("4", "four") and ex.choices == ("3", "4")  # lists become tuples
    with pytest.raises(DataError, match="no target"):
        Example("x", ())


def test_kind():
    assert Task("a", [Example("x", ("y",), ("y", "z"))]).kind == "multiple_choice"
    assert Task("a", [Example("x", ("y",), ("y", "z")), Example("x", ("y",))]).kind == "generation"


def test_split_sizes_and_no_overlap():
    splits = gen_task(100).split(seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (70, 10, 20)
    inputs = [{e.input for e in s} for s in (splits.train, splits.validation, splits.test)]
    assert not (inputs[0] & inputs[1] or inputs[0] & inputs[2] or inputs[1] & inputs[2])
    assert set.union(*inputs) == {f"q{i}" for i in range(100)}


def test_split_caps_and_tiny_tasks():
    splits = gen_task(100).split(max_test=5, max_validation=3)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (92, 3, 5)
    tiny = gen_task(2).split()
    assert (len(tiny.train), len(tiny.validation), len(tiny.test)) == (2, 0, 0)
    with pytest.raises(DataError, match="too few"):
        gen_task(0).split()
    with pytest.raises(DataError, match="too few"):
        gen_task(10).split(validation_fraction=0.5, test_fraction=0.5 - 1e-9)


def test_split_is_deterministic_from_seed():
    task = gen_task(50)
    assert task.split(seed=1) == task.split(seed=1)
    assert gen_task(50).split(seed=1) == task.split(seed=1)  # a fresh object: same splits
    assert task.split(seed=1).test != task.split(seed=2).test


def test_split_removes_duplicates_first():
    examples = [Example(f"q{i % 10}", (f"a{i % 10}",)) for i in range(40)]
    examples.append(Example("q0", ("other",)))  # same input, other target: kept
    splits = Task("dups", examples).split(seed=3)
    everything = splits.train + splits.validation + splits.test
    assert len(everything) == 11 and len(set(everything)) == 11
    test_keys = {(e.input, e.targets) for e in splits.test}
    assert not test_keys & {(e.input, e.targets) for e in splits.train}


# BIG-bench task.json


def test_load_bigbench_multiple_choice(tmp_path):
    task = load_task(str(write_json(tmp_path / "mc" / "task.json", MC)))
    assert task.name == "mc"
    assert [e.input for e in task.examples] == ["2+2?", "Sky?", "Fallback?"]
    assert task.examples[0].choices == ("3", "4", "5") and task.examples[0].targets == ("4",)
    assert task.examples[1].targets == ("blue", "azure")  # ties at the top score
    assert task.examples[2].choices == () and task.examples[2].targets == ("yes",)
    assert task.kind == "generation"  # one example has no choices


def test_load_bigbench_generation_with_prefix(tmp_path):
    write_json(tmp_path / "gen" / "task.json", GEN)
    task = load_task(tmp_path / "gen")  # the folder works too
    assert task.kind == "generation"
    assert [(e.input, e.targets) for e in task.examples] == [
        ("Translate.\nchat", ("cat",)),
        ("Translate.\nchien", ("dog", "hound")),
    ]


def test_load_bigbench_subtasks_and_names(tmp_path):
    root = tmp_path / "benchmark_tasks" / "parent"
    write_json(root / "task.json", {"name": "parent", "description": "no examples"})
    write_json(root / "b" / "task.json", GEN)
    write_json(root / "a" / "task.json", MC)
    (root / "README.md").write_text("not a task")
    parent = load_task(str(root))
    assert parent.name == "parent"
    assert len(parent.examples) == 3 + 2  # union, subtasks in name order
    assert parent.examples[0].input == "2+2?"
    sub = load_task(str(root / "b"))
    assert sub.name == "parent/b" and len(sub.examples) == 2
    assert load_task(str(root / "b"), name="custom").name == "custom"


def test_bigbench_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_task(str(tmp_path / "nowhere"))
    bad = tmp_path / "bad" / "task.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad/task\.json is not valid JSON"):
        load_task(str(bad))
    empty = write_json(tmp_path / "empty" / "task.json", {"examples": [{"input": "x"}]})
    with pytest.raises(DataError, match=r"empty/task\.json has no usable examples"):
        load_task(str(empty))


# JSONL


def test_load_jsonl(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"input": "Capital of France?", "target": "Paris"},
            {"input": "Pick", "choices": ["x", "y", "z"], "target": ["y", "z"]},
            {"input": "", "target": "skipped"},
        ],
    )
    task = load_task(str(path))
    assert task.name == "mine" and len(task.examples) == 2
    assert task.examples[1].choices == ("x", "y", "z") and task.examples[1].targets == ("y", "z")
    assert load_examples_jsonl(path) == task.examples


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "line 2: .*fix or remove that line"),
        ('{"target": "a"}', "line 2: field 'input' must be a string"),
        ('{"input": "a"}', "line 2: field 'target' is missing"),
        ('{"input": "a", "choices": ["x"], "target": "y"}', "line 2: target 'y' is not one"),
        ('{"input": "a", "target": 3}', "line 2: target must be a string"),
    ],
)
def test_jsonl_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input": "ok", "target": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_task(str(path))


def test_jsonl_without_examples(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl has no usable examples"):
        load_task(str(path))


# Hugging Face datasets


def test_task_from_hf_dataset():
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict(
        {"q": ["a?", "b?", "c?"], "label": [1, 0, 1], "options": [["n", "y"]] * 3}
    )
    task = task_from_hf_dataset(
        dataset, "hf-task", input_column="q", target_column="label", choices_column="options"
    )
    assert task.kind == "multiple_choice"
    assert [e.targets for e in task.examples] == [("y",), ("n",), ("y",)]
    with pytest.raises(DataError, match="no column 'input'"):
        task_from_hf_dataset(dataset, "hf-task")


def test_hf_class_label_and_load_task(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"input": datasets.Value("string"), "target": datasets.ClassLabel(names=["neg", "pos"])}
    )
    dataset = datasets.Dataset.from_dict({"input": ["bad", "good"], "target": [0, 1]}, features)
    task = task_from_hf_dataset(dataset, "sent")
    assert [(e.targets, e.choices) for e in task.examples] == [
        (("neg",), ("neg", "pos")),
        (("pos",), ("neg", "pos")),
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hi", "answer": "hello"}])
    task = load_task(
        "hf:json",
        data_files=str(path),
        cache_dir=str(tmp_path / "hf"),
        input_column="text",
        target_column="answer",
    )
    assert task.name == "json" and task.examples == [Example("hi", ("hello",))]
    with pytest.raises(DataError, match="cannot load Hugging Face dataset"):
        load_task(f"hf:{tmp_path / 'missing-dataset'}")


# BIG-bench fetching


def make_sdist(path: Path, files: dict[str, object]) -> Path:
    """A tiny bigbench sdist with the real layout: bigbench-1.0.0/bigbench/benchmark_tasks/..."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else json.dumps(content).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("bigbench-1.0.0/README.md")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    return path


@pytest.fixture
def sdist(tmp_path) -> Path:
    return make_sdist(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {
            "logical_fallacy_detection/task.json": MC,
            "logical_fallacy_detection/README.md": "# readme",
            "color/task.json": {"name": "color"},
            "color/rgb/task.json": GEN,
            "color/hex/task.json": MC,
            "color/README.md": "# readme",
            "programmatic/task.py": "print()",
        },
    )


def test_fetch_bigbench_extracts_only_task_json(tmp_path, sdist):
    cache = tmp_path / "cache"
    paths = fetch_bigbench(["logical_fallacy_detection", "color/rgb"], cache, sdist=sdist)
    tasks = cache / "bigbench" / "tasks"
    assert paths == {
        "logical_fallacy_detection": tasks / "logical_fallacy_detection",
        "color/rgb": tasks / "color" / "rgb",
    }
    files = sorted(str(p.relative_to(tasks)) for p in tasks.rglob("*") if p.is_file())
    assert files == ["color/rgb/task.json", "logical_fallacy_detection/task.json"]
    assert load_task(str(paths["color/rgb"])).name == "color/rgb"
    assert bigbench_task_path("color/rgb", cache) == paths["color/rgb"]
    assert (
        load_task(str(paths["logical_fallacy_detection"])).examples
        == load_task(str(write_json(tmp_path / "ref" / "task.json", MC))).examples
    )


def test_fetch_bigbench_parent_task(tmp_path, sdist):
    cache = tmp_path / "cache"
    fetch_bigbench(["color/rgb"], cache, sdist=sdist)  # a subtask first, then its parent
    path = fetch_bigbench(["color"], cache, sdist=sdist)["color"]
    assert sorted(p.name for p in path.iterdir()) == ["hex", "rgb", "task.json"]
    task = load_task(str(path))
    assert task.name == "color" and len(task.examples) == 3 + 2


def test_fetch_bigbench_uses_cache(tmp_path, sdist):
    cache = tmp_path / "cache"
    path = fetch_bigbench(["color"], cache, sdist=sdist)["color"] / "rgb" / "task.json"
    mtime = path.stat().st_mtime_ns
    sdist.unlink()  # a cached task needs neither the sdist nor pip
    again = fetch_bigbench(["color/rgb", "color"], cache, sdist=sdist)
    assert again["color/rgb"] / "task.json" == path and path.stat().st_mtime_ns == mtime
    assert not list((cache / "bigbench" / "tasks").glob(".extract-*"))


def test_fetch_bigbench_errors(tmp_path, sdist):
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="no BIG-bench task 'logical_falacy'.*logical_fallacy_det"):
        fetch_bigbench(["logical_falacy"], cache, sdist=sdist)
    with pytest.raises(DataError, match="'programmatic' is programmatic"):
        fetch_bigbench(["programmatic"], cache, sdist=sdist)
    with pytest.raises(DataError, match="not a BIG-bench task name"):
        fetch_bigbench(["../etc"], cache, sdist=sdist)
    with pytest.raises(DataError, match="missing.tar.gz does not exist"):
        fetch_bigbench(["color"], cache, sdist=tmp_path / "missing.tar.gz")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(sdist.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot read .*broken.tar.gz"):
        fetch_bigbench(["color"], cache, sdist=broken)
    # a failed fetch leaves nothing behind, not even the valid task of the same call
    with pytest.raises(DataError):
        fetch_bigbench(["color", "nope"], cache, sdist=sdist)
    assert not list((cache / "bigbench" / "tasks").iterdir())
    with pytest.raises(DataError, match="run `phatgoose data bigbench color`"):
        bigbench_task_path("color", cache)


def test_fetch_bigbench_download_failure(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(DataError, match="pip download --no-deps bigbench==1.0.0 -d .*by hand"):
        fetch_bigbench(["color"], tmp_path)
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PHATGOOSE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("PHATGOOSE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "phatgoose"
