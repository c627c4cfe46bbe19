"""The whole PHATGOOSE pipeline from one config: experts -> gates -> library -> evaluation.

Every stage caches its output on disk, keyed by the settings that produced it, so a rerun (or a
run resumed after a crash) skips what is already done."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from peft import PeftModel

from phatgoose.data.bigbench import fetch_bigbench
from phatgoose.data.tasks import Example, Task, TaskSplits, load_task
from phatgoose.errors import PhatgooseError
from phatgoose.eval.evaluate import (
    ORACLE,
    EvalConfig,
    TaskResult,
    evaluate,
    evaluate_task,
    markdown_table,
    oracle_summary,
    summary,
    write_predictions,
)
from phatgoose.experts.train import ExpertConfig, GateConfig, train_expert, train_gate
from phatgoose.library.expert import EXPERT_META, GATES, read_json, write_json
from phatgoose.library.library import MANIFEST, ExpertLibrary, expert_name
from phatgoose.models import EMBEDDED_MODEL, BaseModel, load_base_model
from phatgoose.routing.attach import route, unroute
from phatgoose.routing.retrieval import load_encoder, retrieve, store_retrieval_embeddings
from phatgoose.routing.vectors import store_average_activations


@dataclass
class SplitConfig:
    """Deterministic train / validation / test splits of every task."""

    seed: int = 42
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    max_train: int | None = None  # cap on training examples
    max_validation: int | None = None
    max_test: int | None = None  # cap on evaluated examples

    def apply(self, task: Task) -> TaskSplits:
        splits = task.split(self.seed, self.validation_fraction, self.test_fraction,
                            max_test=self.max_test, max_validation=self.max_validation)
        if self.max_train is not None:
            splits.train = splits.train[: self.max_train]
        return splits


def config_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PipelineConfig:
    """One run: train an expert and a gate per held-in task, build the library, evaluate."""

    model: str = EMBEDDED_MODEL
    workdir: str = "runs/demo"
    experts: list[str] = field(default_factory=list)  # held-in tasks, one expert each
    eval_tasks: list[str] = field(default_factory=list)  # held-out tasks
    # named evaluation suites (e.g. held-in, siblings, ...): tasks evaluated and reported per
    # suite; an expert's own task is evaluated on its test split, any other on a seeded sample
    suites: dict[str, list[str]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: ["base", "phatgoose"])
    top_k: int = 2  # experts per token (phatgoose, arrow)
    top_k_ablation: list[int] = field(default_factory=list)  # extra PHATGOOSE rows at these k
    temperature: float = 1.0  # Arrow's softmax temperature
    multitask_compute: float = 1.0  # multitask steps = this x (experts x expert steps)
    vector_examples: int = 1000  # training examples per expert for average-activation/retrieval
    split: SplitConfig = field(default_factory=SplitConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        nested = {"split": SplitConfig, "expert": ExpertConfig, "gate": GateConfig,
                  "eval": EvalConfig}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PhatgooseError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs = dict(data)
        for key, kind in nested.items():
            if key in kwargs:
                sub_known = {f.name for f in fields(kind)}
                bad = set(kwargs[key] or {}) - sub_known
                if bad:
                    raise PhatgooseError(f"unknown keys {sorted(bad)} in {key!r}; "
                                         f"known: {sorted(sub_known)}")
                kwargs[key] = kind(**(kwargs[key] or {}))
        return cls(**kwargs)


def run_pipeline(config: PipelineConfig, log=print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the evaluation summaries and stage timings."""
    if not config.experts:
        raise PhatgooseError("the config names no expert tasks (`experts: [...]`)")
    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.time()
    bigbench = [s for s in config.experts + config.eval_tasks
                if not s.startswith("hf:") and not Path(s).exists()]
    if bigbench:
        fetch_bigbench(bigbench)
    tasks = {s: load_task(s) for s in config.experts + config.eval_tasks}
    splits = {s: config.split.apply(task) for s, task in tasks.items()}
    timings["data"] = time.time() - t

    t = time.time()
    base = load_base_model(config.model)
    timings["load model"] = time.time() - t
    log(f"base model {base.name} (fingerprint {base.fingerprint})")

    expert_dirs = []
    t = time.time()
    for source in config.experts:
        out = work / "experts" / expert_name(source)
        expert_dirs.append(out)
        key = config_key(base.fingerprint, source, asdict(config.split), asdict(config.expert))
        if _cached(out / EXPERT_META, "cache_key", key):
            log(f"expert {source}: cached in {out}")
            continue
        s = splits[source]
        train_expert(base, tasks[source].name, s.train, s.validation, out, config.expert,
                     log_path=work / "logs" / f"expert-{out.name}.jsonl", source=source,
                     split=asdict(config.split))
        _stamp(out / EXPERT_META, cache_key=key)
    timings["train experts"] = time.time() - t

    t = time.time()
    for source, out in zip(config.experts, expert_dirs):
        key = config_key(read_json(out / EXPERT_META)["cache_key"], asdict(config.gate))
        if (out / GATES).exists() and _cached(out / EXPERT_META, "gate_cache_key", key):
            log(f"gate {source}: cached")
            continue
        s = splits[source]
        train_gate(base, out, s.train, s.validation, config.gate,
                   log_path=work / "logs" / f"gate-{out.name}.jsonl")
        _stamp(out / EXPERT_META, gate_cache_key=key)
    timings["train gates"] = time.time() - t

    library_dir = work / "library"
    lib_key = config_key([read_json(d / EXPERT_META).get("gate_cache_key") for d in expert_dirs])
    if not _cached(library_dir / MANIFEST, "cache_key", lib_key):
        shutil.rmtree(library_dir, ignore_errors=True)
        ExpertLibrary.build(library_dir, expert_dirs)
        _stamp(library_dir / MANIFEST, cache_key=lib_key)
    library = ExpertLibrary(library_dir)
    if "average-activation" in config.methods:
        t = time.time()
        store_average_activations(
            base, library, {n: splits[s].train for n, s in zip(library.names, config.experts)},
            max_examples=config.vector_examples, batch_size=config.eval.batch_size,
            max_input_tokens=config.eval.max_input_tokens,
            max_target_tokens=config.eval.max_target_tokens)
        timings["average activations"] = time.time() - t
    if "retrieval" in config.methods:
        t = time.time()
        store_retrieval_embeddings(
            library, {n: splits[s].train for n, s in zip(library.names, config.experts)},
            max_examples=config.vector_examples)
        timings["retrieval index"] = time.time() - t

    multitask_dir = work / "multitask"
    if "multitask" in config.methods:
        t = time.time()
        steps = max(1, round(config.multitask_compute * len(config.experts) * config.expert.steps))
        mt_config = replace(config.expert, steps=steps)
        key = config_key(base.fingerprint, config.experts, asdict(config.split), asdict(mt_config))
        if _cached(multitask_dir / EXPERT_META, "cache_key", key):
            log(f"multitask: cached in {multitask_dir}")
        else:
            train = [e for s in config.experts for e in splits[s].train]
            val = [e for s in config.experts for e in splits[s].validation]
            train_expert(base, "multitask", train, val, multitask_dir, mt_config,
                         log_path=work / "logs" / "multitask.jsonl")
            _stamp(multitask_dir / EXPERT_META, cache_key=key)
        timings["train multitask"] = time.time() - t

    eval_sets = {tasks[s].name: splits[s].test for s in (config.eval_tasks or config.experts)}
    routed = [m for m in config.methods if m != "multitask"]
    rows = evaluate_methods(base, library, eval_sets, routed, config.eval, work, timings,
                            top_k=config.top_k, temperature=config.temperature)
    if "multitask" in config.methods:
        t = time.time()
        results = evaluate_adapter(base, multitask_dir, eval_sets, config.eval)
        write_predictions(work / "predictions-multitask.jsonl", results)
        rows["multitask"] = summary(results)
        timings["eval multitask"] = time.time() - t
        order = [ORACLE if m == "oracle" else m for m in config.methods]
        rows = {m: rows[m] for m in order}
    table = markdown_table(rows)
    result = {"summaries": rows, "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "table": table}
    (work / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (work / "results.md").write_text(table + "\n")
    return result


def evaluate_methods(
    base: BaseModel, library: ExpertLibrary | None, eval_sets: dict[str, list[Example]],
    methods: list[str], config: EvalConfig, out: Path | None,
    timings: dict[str, float] | None = None, **route_options: Any,
) -> dict[str, dict]:
    """Evaluate each method ("base", or a routing method over the library, routed with
    ``route_options`` such as top_k) on the same sets.

    "oracle" evaluates every single expert and keeps, per task, the best one: an upper bound
    for choosing one expert per task, which peeks at the test labels (its row says so)."""
    if library is None and any(m != "base" for m in methods):
        raise PhatgooseError("routing methods need a library (--library); only 'base' runs "
                             "without")
    if "oracle" in methods:
        singles = [f"single:{n}" for n in library.names if f"single:{n}" not in methods]
        rows = evaluate_methods(base, library, eval_sets,
                                [m for m in methods if m != "oracle"] + singles, config, out,
                                timings, **route_options)
        rows[ORACLE] = oracle_summary({m: rows[m] for m in rows if m.startswith("single:")})
        for m in singles:  # computed for the oracle, not asked for
            rows.pop(m)
        return {m: rows[m] for m in (ORACLE if m == "oracle" else m for m in methods)}
    rows = {}
    for method in methods:
        t = time.time()
        if method == "retrieval":
            results = evaluate_retrieval(base, library, eval_sets, config)
        else:
            if method != "base":
                route(base.model, library, method=method, **route_options)
            try:
                results = evaluate(base, eval_sets, config, desc=f"eval {method}")
            finally:
                unroute(base.model)
        rows[method] = summary(results)
        if out is not None:
            write_predictions(out / f"predictions-{method.replace(':', '_')}.jsonl", results)
        if timings is not None:
            timings[f"eval {method}"] = time.time() - t
    return rows


def evaluate_adapter(
    base: BaseModel, adapter_dir: Path, eval_sets: dict[str, list[Example]],
    config: EvalConfig,
) -> dict[str, TaskResult]:
    """Evaluate one PEFT adapter (e.g. the multitask LoRA) loaded with PEFT itself."""
    model = PeftModel.from_pretrained(base.model, str(adapter_dir))
    try:
        return evaluate(base, eval_sets, config, desc=f"eval {adapter_dir.name}")
    finally:
        model.unload()


def evaluate_retrieval(
    base: BaseModel, library: ExpertLibrary, eval_sets: dict[str, list[Example]],
    config: EvalConfig,
) -> dict[str, TaskResult]:
    """Each example with the single expert that owns its nearest training example."""
    encoder = load_encoder()
    results = {}
    for task, examples in eval_sets.items():
        owners = retrieve(library, examples, encoder=encoder)
        predictions: list[dict] = [{}] * len(examples)
        for name in dict.fromkeys(owners):
            picked = [i for i, owner in enumerate(owners) if owner == name]
            route(base.model, library, method=f"single:{name}")
            try:
                part = evaluate_task(base, task, [examples[i] for i in picked], config)
            finally:
                unroute(base.model)
            for i, p in zip(picked, part.predictions):
                predictions[i] = {**p, "expert": name}
        accuracy = sum(p["correct"] for p in predictions) / max(len(predictions), 1)
        kind = "multiple_choice" if all(e.choices for e in examples) else "generation"
        results[task] = TaskResult(task, kind, accuracy, predictions)
    return results


def _cached(path: Path, field_name: str, key: str) -> bool:
    try:
        return read_json(path).get(field_name) == key
    except PhatgooseError:
        return False


def _stamp(path: Path, **values: str) -> None:
    data = read_json(path)
    data.update(values)
    write_json(path, data)
