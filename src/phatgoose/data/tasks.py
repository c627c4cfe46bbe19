"""Tasks as lists of examples, loaded from BIG-bench ``task.json``, JSONL or Hugging Face datasets.

Every example is shown to the model in one documented format: ``input + "\\nAnswer:"`` is the
prompt and ``" " + targets[0]`` the continuation it is trained to produce.

Rule for all sources: an unusable example (empty input, or no non-empty target) is skipped; a
malformed one in a JSONL file or dataset (wrong types, a target that is not one of the choices)
is an error naming the line or row.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phatgoose.errors import DataError

PROMPT_SUFFIX = "\nAnswer:"
MULTIPLE_CHOICE = "multiple_choice"
GENERATION = "generation"

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One input with its correct answers (``targets[0]`` is the training target)."""

    input: str
    targets: tuple[str, ...]
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "choices", tuple(self.choices))
        if not self.targets:
            raise DataError(f"example {self.input[:40]!r} has no target; give at least one")

    @property
    def prompt(self) -> str:
        """The text the model reads."""
        return self.input + PROMPT_SUFFIX

    @property
    def continuation(self) -> str:
        """The text the model is trained to produce after the prompt."""
        return " " + self.targets[0]


@dataclass
class TaskSplits:
    """Disjoint train / validation / test examples of one task."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]


@dataclass
class Task:
    """A named list of examples."""

    name: str
    examples: list[Example]

    @property
    def kind(self) -> str:
        """``"multiple_choice"`` if every example has choices, else ``"generation"``."""
        mc = bool(self.examples) and all(ex.choices for ex in self.examples)
        return MULTIPLE_CHOICE if mc else GENERATION

    def split(
        self,
        seed: int = 42,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.2,
        max_test: int | None = None,
        max_validation: int | None = None,
    ) -> TaskSplits:
        """Deduplicate, shuffle with ``seed`` and cut into test, validation and train (the rest)."""
        if not (0 <= validation_fraction < 1 and 0 <= test_fraction < 1):
            raise DataError(
                f"split fractions must lie in [0, 1) (got validation={validation_fraction}, "
                f"test={test_fraction}); pass smaller fractions"
            )
        seen: set[tuple[str, tuple[str, ...]]] = set()
        unique = []
        for ex in self.examples:  # drop repeats of (input, targets), keeping the first
            if (ex.input, ex.targets) not in seen:
                seen.add((ex.input, ex.targets))
                unique.append(ex)
        order = list(range(len(unique)))
        random.Random(seed).shuffle(order)
        n_test = _capped(round(test_fraction * len(order)), max_test)
        n_val = _capped(round(validation_fraction * len(order)), max_validation)
        if n_test + n_val >= len(order):
            raise DataError(
                f"task {self.name!r} has {len(unique)} unique examples, too few to keep any for "
                f"training after {n_test} test and {n_val} validation; add examples or lower "
                "the fractions"
            )
        picked = [unique[i] for i in order]
        return TaskSplits(
            train=picked[n_test + n_val :],
            validation=picked[n_test : n_test + n_val],
            test=picked[:n_test],
        )


def _capped(n: int, cap: int | None) -> int:
    return n if cap is None else max(0, min(n, cap))


def load_task(source: str | Path, name: str | None = None, **hf_kwargs: Any) -> Task:
    """Load a task from a BIG-bench ``task.json`` (file or folder), a ``.jsonl`` file,
    ``hf:<path>[:<config>]``, or the name of a fetched BIG-bench task such as ``"color/rgb"``."""
    text = str(source)
    if text.startswith("hf:"):
        return _load_hf(text[3:], name, **hf_kwargs)
    path = Path(text).expanduser()
    if not path.exists():
        path = _cached_bigbench(text) or path
    if path.suffix == ".jsonl":
        return Task(name or path.stem, load_examples_jsonl(path))
    if path.is_dir():
        path = path / "task.json"
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; give a BIG-bench task.json or folder, a .jsonl file, "
            "hf:<dataset>, or fetch the task with `phatgoose data bigbench NAME`"
        )
    task_name = name or _bigbench_name(path)
    examples = _load_bigbench(path)
    if not examples:
        raise DataError(f"{path} has no usable examples (each needs an input and a target)")
    return Task(task_name, examples)


def _cached_bigbench(name: str) -> Path | None:
    """The folder of an already fetched BIG-bench task called ``name``, if any."""
    from phatgoose.data.bigbench import bigbench_task_path

    try:
        return bigbench_task_path(name)
    except DataError:
        return None


def _bigbench_name(task_json: Path) -> str:
    """``color/rgb`` for .../benchmark_tasks/color/rgb/task.json or .../bigbench/tasks/color/rgb."""
    folder = task_json.parent if task_json.name == "task.json" else task_json.with_suffix("")
    parts = folder.resolve().parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == "benchmark_tasks" or (parts[i] == "tasks" and parts[i - 1] == "bigbench"):
            if i + 1 < len(parts):
                return "/".join(parts[i + 1 :])
    return folder.name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DataError(f"{path} does not exist; check the path") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-download or fix it") from err


def _load_bigbench(path: Path) -> list[Example]:
    """Examples of one BIG-bench task file; a file without examples is the union of its subtasks."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a BIG-bench task (top level must be an object); fix it")
    if "examples" not in data:
        if path.name != "task.json":
            return []
        subtasks = sorted(d for d in path.parent.iterdir() if (d / "task.json").is_file())
        return [ex for sub in subtasks for ex in _load_bigbench(sub / "task.json")]
    prefix = str(data.get("task_prefix") or "")
    if prefix and not prefix[-1].isspace():
        prefix += "\n"
    raw = data["examples"] if isinstance(data["examples"], list) else []
    examples = [ex for ex in (_bigbench_example(r, prefix) for r in raw) if ex is not None]
    if len(examples) < len(raw):
        _log.warning("%s: skipped %d unusable examples", path, len(raw) - len(examples))
    return examples


def _bigbench_example(raw: Any, prefix: str) -> Example | None:
    """One BIG-bench example, or None if it is unusable."""
    if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
        return None
    text = prefix + raw["input"]
    if not text.strip():
        return None
    scores = raw.get("target_scores")
    if isinstance(scores, dict) and scores:
        try:
            best = max(float(v) for v in scores.values())
        except (TypeError, ValueError):
            best = 0.0
        if best > 0:
            targets = tuple(str(c) for c, v in scores.items() if float(v) == best)
            return Example(text, targets, tuple(str(c) for c in scores))
    try:
        targets = _targets(raw.get("target"), ())
    except ValueError:
        return None
    return Example(text, targets) if targets else None


def _targets(target: Any, choices: tuple[str, ...]) -> tuple[str, ...]:
    """Normalise a target (str, list of str, or int index into choices) to non-empty strings."""
    if isinstance(target, int) and not isinstance(target, bool) and choices:
        if not 0 <= target < len(choices):
            raise ValueError(f"target index {target} is outside the {len(choices)} choices")
        return (choices[target],)
    if isinstance(target, str):
        target = [target]
    if not isinstance(target, list | tuple) or not all(isinstance(t, str) for t in target):
        raise ValueError(f"target must be a string or a list of strings, not {target!r:.60}")
    targets = tuple(t for t in target if t.strip())
    missing = [t for t in targets if choices and t not in choices]
    if missing:
        raise ValueError(f"target {missing[0]!r:.60} is not one of the choices")
    return targets


def _record_example(
    record: Any, input_key: str, target_key: str, choices_key: str
) -> Example | None:
    """An example from one JSONL line or dataset row; raises ValueError if it is malformed."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if not isinstance(record.get(input_key), str):
        raise ValueError(f"field {input_key!r} must be a string")
    if target_key not in record:
        raise ValueError(f"field {target_key!r} is missing")
    choices = record.get(choices_key) or ()
    if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"field {choices_key!r} must be a list of strings")
    targets = _targets(record[target_key], tuple(choices))
    if not record[input_key].strip() or not targets:
        return None
    return Example(record[input_key], targets, tuple(choices))


def load_examples_jsonl(path: str | Path) -> list[Example]:
    """Read ``{"input", "target", optional "choices"}`` objects, one per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise DataError(f"{path} does not exist; check the path") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); re-save it as UTF-8") from err
    examples = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            example = _record_example(json.loads(line), "input", "target", "choices")
        except (json.JSONDecodeError, ValueError) as err:
            raise DataError(f"{path} line {lineno}: {err}; fix or remove that line") from err
        if example is not None:
            examples.append(example)
    if not examples:
        raise DataError(f"{path} has no usable examples (each needs an input and a target)")
    return examples


def task_from_hf_dataset(
    dataset: Any,
    name: str,
    input_column: str = "input",
    target_column: str = "target",
    choices_column: str = "choices",
) -> Task:
    """A task from a loaded ``datasets.Dataset``; an int target indexes the choices (or the
    names of a ``ClassLabel`` target column when there is no choices column)."""
    columns = set(dataset.column_names)
    for column in (input_column, target_column):
        if column not in columns:
            raise DataError(
                f"dataset {name!r} has no column {column!r} (columns: {sorted(columns)}); "
                "pass input_column= / target_column="
            )
    label_names = getattr(dataset.features[target_column], "names", None)
    examples = []
    for i, row in enumerate(dataset):
        if choices_column not in columns and label_names:
            row = {**row, choices_column: list(label_names)}
        try:
            example = _record_example(row, input_column, target_column, choices_column)
        except ValueError as err:
            raise DataError(f"dataset {name!r} row {i}: {err}; fix the data or columns") from err
        if example is not None:
            examples.append(example)
    if not examples:
        raise DataError(f"dataset {name!r} has no usable examples (each needs input and target)")
    return Task(name, examples)


def _load_hf(spec: str, name: str | None, **hf_kwargs: Any) -> Task:
    """``load_dataset(path, config, split=...)``; other keyword arguments go to load_dataset."""
    try:
        import datasets
    except ImportError as err:
        raise DataError("hf: tasks need the datasets library; run `pip install datasets`") from err
    path, _, config = spec.partition(":")
    columns = {
        key: hf_kwargs.pop(key)
        for key in ("input_column", "target_column", "choices_column")
        if key in hf_kwargs
    }
    split = hf_kwargs.pop("split", "train")
    try:
        dataset = datasets.load_dataset(path, config or None, split=split, **hf_kwargs)
    except Exception as err:  # load_dataset raises many unrelated types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"cannot load Hugging Face dataset {spec!r} split {split!r}: {first_line}"
        ) from err
    return task_from_hf_dataset(dataset, name or spec, **columns)
