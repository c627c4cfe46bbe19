"""The whole PHATGOOSE pipeline from one config: experts -> gates -> library -> evaluation.

Every stage caches its output on disk, keyed by the settings that produced it, so a rerun (or a
run resumed after a crash) skips what is already done."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors import safe_open

from phatgoose.data.bigbench import fetch_bigbench
from phatgoose.data.tasks import Example, Task, TaskSplits, load_task
from phatgoose.errors import PhatgooseError
from phatgoose.eval.analysis import plot_routing, routing_shares
from phatgoose.eval.evaluate import (
    ORACLE,
    EvalConfig,
    TaskResult,
    evaluate,
    evaluate_task,
    markdown_table,
    oracle_summary,
    predictions_path,
    summary,
    write_predictions,
)
from phatgoose.eval.stats import paired_bootstrap
from phatgoose.experts.train import ExpertConfig, GateConfig, train_expert, train_gate
from phatgoose.library.expert import EXPERT_META, GATES, read_json, write_json, write_text
from phatgoose.library.library import MANIFEST, ExpertLibrary, default_expert_name, expert_name
from phatgoose.models import EMBEDDED_MODEL, BaseModel, load_base_model, resolve_bf16
from phatgoose.models.base import resolve_device
from phatgoose.routing.attach import AVERAGE_ACTIVATION, route, unroute
from phatgoose.routing.retrieval import (
    RETRIEVAL_EMBEDDINGS,
    load_encoder,
    retrieve,
    store_retrieval_embeddings,
)
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

    def held_out(self, task: Task) -> list[Example]:
        """A task no expert trains on is evaluated on a seeded sample of all its (unique)
        examples, up to ``max_test``."""
        unique = list({(e.input, e.targets): e for e in reversed(task.examples)}.values())[::-1]
        random.Random(self.seed).shuffle(unique)
        return unique[: self.max_test] if self.max_test is not None else unique


def config_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PipelineConfig:
    """One run: train an expert and a gate per held-in task, build the library, evaluate."""

    model: str = EMBEDDED_MODEL
    device: str = "auto"  # where the base model runs: auto (the GPU if torch sees one), cpu, cuda
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
    routing_examples: int = 0  # examples per evaluated task for the routing-share plots (0: off)
    split: SplitConfig = field(default_factory=SplitConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    # per-task changes to the expert recipe, e.g. {metaphor_boolean: {lr: 3.0e-3, steps: 600}},
    # for experts that do not learn with the shared one (document why in the config)
    expert_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
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
        config = cls(**kwargs)
        bad_k = [k for k in [config.top_k, *config.top_k_ablation] if k < 1]
        if bad_k:
            raise PhatgooseError(f"top_k and top_k_ablation must be at least 1 (experts per "
                                 f"token), got {bad_k[0]}")
        device = resolve_device(config.device)  # a device this machine lacks fails here
        for section in (config.expert, config.gate, config.eval):
            # bf16 unset: the faster mode of this device, fixed before anything is cached
            section.bf16 = resolve_bf16(section.bf16, device)
        expert_keys = {f.name for f in fields(ExpertConfig)} - {"targets"}  # one module set
        for task, changes in config.expert_overrides.items():
            if task not in config.experts:
                raise PhatgooseError(f"expert_overrides names {task!r}, which is not one of "
                                     f"the experts {config.experts}")
            if not isinstance(changes, dict):
                raise PhatgooseError(f"expert_overrides[{task!r}] must map recipe keys to "
                                     f"values, e.g. {{steps: 600}}; got {changes!r}")
            bad = set(changes) - expert_keys
            if bad:
                raise PhatgooseError(f"unknown keys {sorted(bad)} in expert_overrides[{task!r}]; "
                                     f"known: {sorted(expert_keys)}")
            config.expert_config(task)  # invalid values fail now, before hours of training
        return config

    def expert_config(self, task: str) -> ExpertConfig:
        """The recipe of ``task``'s expert: ``expert`` with that task's overrides applied."""
        return replace(self.expert, **(self.expert_overrides.get(task) or {}))


def run_pipeline(config: PipelineConfig, log=print) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the evaluation summaries and stage timings."""
    if not config.experts:
        raise PhatgooseError("the config names no expert tasks (`experts: [...]`)")
    work = Path(config.workdir)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.time()
    suites = config.suites or {"evaluation": config.eval_tasks or config.experts}
    sources = list(dict.fromkeys(config.experts + [t for ts in suites.values() for t in ts]))
    bigbench = [s for s in sources if not s.startswith("hf:") and not Path(s).exists()]
    if bigbench:
        fetch_bigbench(bigbench)
    tasks = {s: load_task(s) for s in sources}
    splits = {s: config.split.apply(tasks[s]) for s in config.experts}
    # what the suites evaluate, by task name: an expert's own task (held-in) on its test split,
    # however a suite spells it; any other task (held-out) on a seeded sample
    own_splits = {tasks[s].name: splits[s] for s in config.experts}
    eval_sets: dict[str, list[Example]] = {}
    for s in sources:
        name = tasks[s].name
        if any(s in ts for ts in suites.values()) and name not in eval_sets:
            eval_sets[name] = (own_splits[name].test if name in own_splits
                               else config.split.held_out(tasks[s]))
    timings["data"] = time.time() - t

    t = time.time()
    base = load_base_model(config.model, device=config.device)
    timings["load model"] = time.time() - t
    log(f"base model {base.name} on {base.model.device} (fingerprint {base.fingerprint})")

    expert_dirs = []
    t = time.time()
    for source in config.experts:
        out = work / "experts" / expert_name(source)
        expert_dirs.append(out)
        recipe = config.expert_config(source)
        key = config_key(base.fingerprint, source, asdict(config.split), asdict(recipe))
        if _cached(out / EXPERT_META, "cache_key", key):
            log(f"expert {source}: cached in {out}")
            continue
        s = splits[source]
        train_expert(base, tasks[source].name, s.train, s.validation, out, recipe,
                     log_path=work / "logs" / f"expert-{out.name}.jsonl", source=source,
                     split=asdict(config.split))
        _stamp(out / EXPERT_META, cache_key=key)
    timings["train experts"] = time.time() - t

    # each (evaluated) expert against the base model on its own test split, before gates,
    # library and evaluations are built on it: an expert that learned nothing shows here
    cache = work / "eval"
    method_keys = {"base": config_key(base.fingerprint)}  # evaluations not routed by a library
    own_results: dict[str, TaskResult] = {}
    t = time.time()
    for source, out in zip(config.experts, expert_dirs):
        name, task = default_expert_name(out), tasks[source].name  # as the library names it
        method_keys[f"single:{name}"] = read_json(out / EXPERT_META)["cache_key"]
        if eval_sets.get(task):
            own_results[task] = check_expert(base, out, name, task, eval_sets[task],
                                             config.eval, cache, method_keys, work, log)
        elif task not in eval_sets:
            log(f"expert {name}: not checked against the base model (its task is in no "
                "evaluation suite)")
    if own_results:
        timings["eval own experts"] = time.time() - t

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
        combined = sum(config.expert_config(s).steps for s in config.experts)
        steps = max(1, round(config.multitask_compute * combined))
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

    # held-in tasks get the expert trained on them instead of the oracle
    own = {tasks[s].name: name for s, name in zip(config.experts, library.names)}
    held_in = {t: e for t, e in eval_sets.items() if t in own}
    held_out = {t: e for t, e in eval_sets.items() if t not in own}
    routed = [m for m in config.methods if m != "multitask"]
    routed += [f"phatgoose@k{k}" for k in config.top_k_ablation if k != config.top_k]
    route_key = config_key(lib_key, config.top_k, config.temperature, config.vector_examples)
    options = {"top_k": config.top_k, "temperature": config.temperature}
    rows: dict[str, dict] = {}
    if held_out:
        rows = evaluate_methods(base, library, held_out, routed, config.eval, work, timings,
                                cache=cache, cache_key=route_key, method_keys=method_keys,
                                **options)
    if held_in:
        in_rows = evaluate_methods(base, library, held_in, [m for m in routed if m != "oracle"],
                                   config.eval, work, timings, cache=cache, cache_key=route_key,
                                   method_keys=method_keys, **options)
        own_tasks = {t: {**summary({t: own_results[t]})["tasks"][t], "expert": own[t]}
                     for t in held_in if t in own_results}  # not with an empty test split
        rows = _merge_rows(rows, in_rows, {OWN_EXPERT: {"tasks": own_tasks}})
    if "multitask" in config.methods:
        t = time.time()
        results = _cached_evaluate(
            cache, config_key(read_json(multitask_dir / EXPERT_META)["cache_key"]), "multitask",
            eval_sets, config.eval, lambda sets: evaluate_adapter(base, multitask_dir, sets,
                                                                   config.eval),
            base.device_name)
        write_predictions(predictions_path(work, "multitask"), results)
        rows["multitask"] = summary(results)
        timings["eval multitask"] = time.time() - t
    order = [ORACLE if m == "oracle" else m for m in routed] + ["multitask", OWN_EXPERT]
    rows = {m: rows[m] for m in order if m in rows}
    if config.routing_examples:
        t = time.time()
        shares = routing_shares(base, library, eval_sets, config.top_k, config.routing_examples,
                                config.eval)
        write_json(work / "routing_shares.json", shares)
        plot_routing(shares, work, suites={k: [tasks[s].name for s in v]
                                           for k, v in suites.items()})
        timings["routing shares"] = time.time() - t
    table = markdown_table(rows)
    by_device = compute_seconds(work, expert_dirs, library, multitask_dir, cache, eval_sets)
    compute = {stage: round(sum(d.values()), 1) for stage, d in by_device.items()}
    per_stage: dict[str, float] = {}
    for stage, seconds in timings.items():
        stage = _eval_stage(stage.removeprefix("eval ")) if stage.startswith("eval ") else stage
        per_stage[stage] = per_stage.get(stage, 0.0) + seconds
    result = {"summaries": rows, "timings_s": {k: round(v, 1) for k, v in per_stage.items()},
              "compute_s": compute, "compute_s_by_device": by_device,
              "table": table, "suites": {k: [tasks[s].name for s in v] for k, v in suites.items()}}
    write_text(work / "results.json", json.dumps(result, indent=2) + "\n")
    write_text(work / "results.md", table + "\n")
    return result


OWN_EXPERT = "own expert (held-in: the expert trained on the task)"


def compute_seconds(
    work: Path, expert_dirs: list[Path], library: ExpertLibrary, multitask_dir: Path,
    cache: Path, eval_sets: dict[str, list[Example]],
) -> dict[str, dict[str, float]]:
    """Seconds each stage computed for, per device (``device_name``, e.g. "cpu (AMD EPYC
    7B13)"; "unrecorded" for items made before devices were recorded), summed over the runs
    that did the work: read from what each cached item recorded when it was made (experts,
    gates, vectors, each method x task evaluation), so a benchmark resumed across sessions and
    machines reports its whole cost, and where it was paid."""
    out: dict[str, dict[str, float]] = {}

    def add(stage: str, seconds: float, device: str | None) -> None:
        per_device = out.setdefault(stage, {})
        device = device or "unrecorded"
        per_device[device] = per_device.get(device, 0.0) + float(seconds)

    metas = [read_json(d / EXPERT_META) for d in expert_dirs if (d / EXPERT_META).exists()]
    for m in metas:
        add("train experts", m["metrics"].get("train_seconds", 0.0), m["metrics"].get("device"))
        if "gate" in m:
            add("train gates", m["gate"].get("train_seconds", 0.0), m["gate"].get("device"))
    if (multitask_dir / EXPERT_META).exists():
        metrics = read_json(multitask_dir / EXPERT_META)["metrics"]
        add("train multitask", metrics.get("train_seconds", 0.0), metrics.get("device"))
    for stage, file in (("average activations", AVERAGE_ACTIVATION),
                        ("retrieval index", RETRIEVAL_EMBEDDINGS)):
        for path in (library.expert_dir(n) / file for n in library.names):
            if path.exists():
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
                add(stage, meta.get("seconds", 0.0), meta.get("device"))
    files = {_task_file(task) for task in eval_sets}
    for path in sorted(cache.glob("*/*.json")) if cache.exists() else []:
        if path.name in files:
            data = read_json(path)
            add(_eval_stage(data.get("method", path.parent.name)), data.get("seconds", 0.0),
                data.get("device"))
    return {stage: {d: round(s, 1) for d, s in per_device.items()}
            for stage, per_device in out.items()}


def _task_file(task: str) -> str:
    """A task's file name in the evaluation cache (``cache/<method>/<task file>``)."""
    return task.replace("/", ".") + ".json"


def _eval_stage(method: str) -> str:
    """The stage a method's evaluation is timed under: single experts (the oracle's) as one
    stage, held-in tasks' own experts as another."""
    if method.startswith("expert:"):
        return "eval own experts"
    return "eval single experts" if method.startswith("single") else f"eval {method}"


def check_expert(
    base: BaseModel, expert_dir: Path, name: str, task: str, test: list[Example],
    config: EvalConfig, cache: Path, method_keys: dict[str, str], out: Path,
    log: Callable[[str], Any],
) -> TaskResult:
    """Evaluate the base model and the expert (its PEFT adapter on the base model) on the
    expert's own test split, each cached under the keys of ``base`` and ``single:<name>`` in
    ``method_keys``; log both accuracies and the paired bootstrap interval of expert minus
    base, with a warning when it does not lie above 0. Returns the expert's."""
    sets = {task: test}
    base_result = _cached_evaluate(
        cache, method_keys["base"], "base", sets, config,
        lambda s: evaluate(base, s, config, desc="eval base"), base.device_name)[task]
    result = _cached_evaluate(
        cache, method_keys[f"single:{name}"], f"expert:{name}", sets, config,
        lambda s: evaluate_adapter(base, expert_dir, s, config), base.device_name)[task]
    write_predictions(predictions_path(out, f"expert:{name}"), {task: result})
    diff, low, high = paired_bootstrap([p["correct"] for p in result.predictions],
                                       [p["correct"] for p in base_result.predictions])
    verdict = "beats the base model" if low > 0 else "does NOT beat the base model: tune it"
    log(f"expert {name}: {result.accuracy:.3f} on its test split against "
        f"{base_result.accuracy:.3f} for the base model; expert - base {diff:+.3f} "
        f"[{low:+.3f}, {high:+.3f}] (paired 95%): {verdict}")
    return result


def _merge_rows(*parts: dict[str, dict]) -> dict[str, dict]:
    """Merge per-method summaries computed on disjoint task sets."""
    merged: dict[str, dict] = {}
    for part in parts:
        for method, s in part.items():
            merged.setdefault(method, {"tasks": {}})["tasks"].update(s["tasks"])
    for s in merged.values():
        s["average"] = sum(t["accuracy"] for t in s["tasks"].values()) / len(s["tasks"])
    return merged


def _cached_evaluate(
    cache: Path | None, key: str, method: str, eval_sets: dict[str, list[Example]],
    config: EvalConfig, run: Callable[[dict[str, list[Example]]], dict[str, TaskResult]],
    device: str,
) -> dict[str, TaskResult]:
    """``run`` (on ``device``) task by task, each result cached in ``cache/<method>/<task>.json``
    under a key of (``key``, method, eval settings, the examples): an interrupted evaluation
    resumes. The device is recorded beside the seconds, not keyed: results do not depend on
    it beyond floating-point rounding."""
    results = {}
    for task, examples in eval_sets.items():
        task_key = config_key(key, method, asdict(config),
                              [(e.input, e.targets, e.choices) for e in examples])
        path = None
        if cache is not None:
            path = cache / method.replace(":", "_").replace("/", ".") / _task_file(task)
            if _cached(path, "key", task_key):
                results[task] = TaskResult(**read_json(path)["result"])
                continue
        started = time.time()
        results[task] = run({task: examples})[task]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"key": task_key, "method": method, "result": asdict(results[task]),
                              "seconds": round(time.time() - started, 1), "device": device})
    return results


def evaluate_methods(
    base: BaseModel, library: ExpertLibrary | None, eval_sets: dict[str, list[Example]],
    methods: list[str], config: EvalConfig, out: Path | None,
    timings: dict[str, float] | None = None, cache: Path | None = None, cache_key: str = "",
    method_keys: dict[str, str] | None = None, **route_options: Any,
) -> dict[str, dict]:
    """Evaluate each method ("base", or a routing method over the library, routed with
    ``route_options`` such as top_k; "phatgoose@k<K>" overrides top_k) on the same sets.
    With ``cache``, each (method, task) result is cached (see ``_cached_evaluate``) under
    ``method_keys[method]`` if given (what that method depends on), else ``cache_key``.

    "oracle" evaluates every single expert and keeps, per task, the best one: an upper bound
    for choosing one expert per task, which peeks at the test labels (its row says so)."""
    if library is None and any(m != "base" for m in methods):
        raise PhatgooseError("routing methods need a library (--library); only 'base' runs "
                             "without")
    if "oracle" in methods:
        singles = [f"single:{n}" for n in library.names if f"single:{n}" not in methods]
        rows = evaluate_methods(base, library, eval_sets,
                                [m for m in methods if m != "oracle"] + singles, config, out,
                                timings, cache, cache_key, method_keys, **route_options)
        rows[ORACLE] = oracle_summary({m: rows[m] for m in rows if m.startswith("single:")})
        for m in singles:  # computed for the oracle, not asked for
            rows.pop(m)
        return {m: rows[m] for m in (ORACLE if m == "oracle" else m for m in methods)}
    rows = {}
    for method in methods:
        t = time.time()
        if method == "retrieval":
            def run(sets):
                return evaluate_retrieval(base, library, sets, config)
        else:
            def run(sets, method=method):
                if method == "base":
                    return evaluate(base, sets, config, desc="eval base")
                name, _, k = method.partition("@k")
                if k and not k.isdigit():
                    raise PhatgooseError(f"bad method {method!r}: write phatgoose@k<number>, "
                                         "e.g. phatgoose@k1")
                options = {**route_options, **({"top_k": int(k)} if k else {})}
                route(base.model, library, method=name, **options)
                try:
                    return evaluate(base, sets, config, desc=f"eval {method}")
                finally:
                    unroute(base.model)
        key = (method_keys or {}).get(method, cache_key)
        results = _cached_evaluate(cache, key, method, eval_sets, config, run,
                                   base.device_name)
        rows[method] = summary(results)
        if out is not None:
            write_predictions(predictions_path(out, method), results)
        if timings is not None:  # held-out and held-in sets are separate calls: add up
            timings[f"eval {method}"] = timings.get(f"eval {method}", 0.0) + time.time() - t
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
