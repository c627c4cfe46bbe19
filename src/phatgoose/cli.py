"""The ``phatgoose`` command line. Every option can also come from a YAML file (``--config``);
options given on the command line win. Errors print one line (tracebacks with ``--debug``)."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import yaml

from phatgoose.errors import PhatgooseError

EMBEDDED = "embedded:smollm2-135m-instruct"


# -- options from dataclasses -------------------------------------------------------------
def _field_type(tp: Any) -> Any:
    """The scalar type argparse should parse for a (possibly Optional) field annotation."""
    if isinstance(tp, str):
        tp = eval(tp, {"float": float, "int": int, "str": str, "bool": bool, "list": list})
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _field_type(args[0]) if len(args) == 1 else str
    return tp


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, title: str, prefix: str = ""
) -> None:
    """One option per dataclass field (``prefix`` avoids clashes, e.g. --split-seed)."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore
        dest = prefix + f.name
        flag = "--" + dest.replace("_", "-")
        kind = _field_type(f.type)
        if kind is bool:
            shown = "where it is faster" if f.name == "bf16" and default is None else default
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=default, help=f"(default: {shown})")
        elif f.name == "targets":
            group.add_argument(flag, dest=dest, nargs="+", default=default,
                               help="'all-linear' or module-name suffixes (default: all-linear)")
        else:
            group.add_argument(flag, dest=dest, type=kind, default=default,
                               help=f"(default: {default})")


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "") -> Any:
    values = {f.name: getattr(args, prefix + f.name) for f in fields(cls)}
    if "targets" in values and values["targets"] in (["all-linear"], ("all-linear",)):
        values["targets"] = "all-linear"
    return cls(**values)


# -- subcommands ----------------------------------------------------------------------------
def _load_base(args):
    from phatgoose.models import load_base_model

    # `library verify --model` has no --device: it only compares weights, on the CPU
    return load_base_model(args.model, device=getattr(args, "device", "cpu"))


def _splits(args, source: str):
    """The task named by ``source`` and its splits."""
    from phatgoose.data import load_task
    from phatgoose.pipeline import SplitConfig

    task = load_task(source)
    return task, dataclass_from_args(SplitConfig, args, "split_").apply(task)


def cmd_data_bigbench(args) -> None:
    from phatgoose.data.bigbench import fetch_bigbench

    paths = fetch_bigbench(args.tasks, Path(args.cache_dir) if args.cache_dir else None)
    for name, path in paths.items():
        print(f"{name}\t{path}")


def cmd_train_expert(args) -> None:
    from phatgoose.experts import ExpertConfig, train_expert
    from phatgoose.pipeline import SplitConfig

    task, splits = _splits(args, args.task)  # bad data fails before the model loads
    base = _load_base(args)
    out = train_expert(base, task.name, splits.train, splits.validation, args.out,
                       dataclass_from_args(ExpertConfig, args), log_path=args.log,
                       source=args.task, tensorboard_dir=args.tensorboard,
                       split=asdict(dataclass_from_args(SplitConfig, args, "split_")))
    print(f"expert saved to {out}")


def cmd_train_gate(args) -> None:
    from phatgoose.experts import GateConfig, train_gate
    from phatgoose.library import load_metadata

    meta = load_metadata(Path(args.expert))
    _, splits = _splits(args, args.task or meta.get("task_source") or meta["task"])
    base = _load_base(args)
    path = train_gate(base, args.expert, splits.train, splits.validation,
                      dataclass_from_args(GateConfig, args), log_path=args.log,
                      tensorboard_dir=args.tensorboard)
    print(f"gate saved to {path}")


def cmd_library(args) -> None:
    from phatgoose.library import ExpertLibrary

    if args.action == "build":
        lib = ExpertLibrary.build(args.library, [Path(p) for p in args.experts])
        print(f"library {lib.root}: {len(lib.names)} experts")
        return
    lib = ExpertLibrary(args.library)
    if args.action == "add":
        print(f"added {lib.add(args.expert, name=args.name)} to {lib.root}")
    elif args.action == "list":
        print(f"base model: {lib.base_model} (fingerprint {lib.base_fingerprint})")
        print("| expert | task | modules | rank | best val loss |\n|---|---|---:|---:|---:|")
        for e in lib.manifest["experts"]:
            loss = e.get("metrics", {}).get("best_val_loss")
            loss = f"{loss:.4f}" if isinstance(loss, float) else "-"
            print(f"| {e['name']} | {e['task']} | {e['modules']} | {e['rank']} | {loss} |")
    elif args.action == "show":
        print(json.dumps({**lib.entry(args.name), "metadata": lib.metadata(args.name)}, indent=2))
    elif args.action == "vectors":
        from phatgoose.data import load_task
        from phatgoose.pipeline import SplitConfig
        from phatgoose.routing.vectors import store_average_activations

        examples = {}
        for name in lib.names:
            meta = lib.metadata(name)
            task = load_task(meta.get("task_source") or meta["task"])
            examples[name] = SplitConfig(**(meta.get("split") or {})).apply(task).train
        if "average-activation" in args.kind:
            computed = store_average_activations(_load_base(args), lib, examples,
                                                 args.max_examples, args.batch_size)
            print(f"average activations computed for {len(computed)} expert(s), "
                  f"{len(lib.names) - len(computed)} reused")
        if "retrieval" in args.kind:
            from phatgoose.routing.retrieval import store_retrieval_embeddings

            computed = store_retrieval_embeddings(lib, examples, args.max_examples)
            print(f"retrieval embeddings computed for {len(computed)} expert(s), "
                  f"{len(lib.names) - len(computed)} reused")
    elif args.action == "verify":
        problems = lib.verify()
        if args.model:
            from phatgoose.routing import route

            base = _load_base(args)
            try:
                route(base.model, lib)
            except PhatgooseError as err:
                problems.append(str(err))
        if problems:
            raise PhatgooseError(f"{len(problems)} problem(s): " + " | ".join(problems))
        print(f"library {lib.root} is sound: {len(lib.names)} experts")


def cmd_eval(args) -> None:
    from phatgoose.eval import EvalConfig
    from phatgoose.library import ExpertLibrary
    from phatgoose.pipeline import evaluate_methods

    if any(m != "base" for m in args.method) and not args.library:
        raise PhatgooseError("routing methods need --library DIR (only 'base' runs without)")
    library = ExpertLibrary(args.library) if args.library else None
    sets = {}
    for source in args.task:
        task, splits = _splits(args, source)
        sets[task.name] = getattr(splits, args.split)
    base = _load_base(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = evaluate_methods(base, library, sets, args.method,
                            dataclass_from_args(EvalConfig, args),
                            out if args.predictions else None,
                            top_k=args.top_k, temperature=args.temperature)
    from phatgoose.eval import markdown_table
    from phatgoose.library.expert import write_text

    table = markdown_table(rows)
    write_text(out / "results.json", json.dumps(rows, indent=2) + "\n")
    write_text(out / "results.md", table + "\n")
    print(table)


def _pipeline_config(args):
    """The config file's pipeline, with the command line's overrides (--workdir, --bf16,
    --methods)."""
    from phatgoose.pipeline import PipelineConfig

    data = _read_yaml(args.config_file)
    if args.workdir:
        data["workdir"] = args.workdir
    if args.methods:  # only these methods: the config's k ablation rows go too
        data["methods"], data["top_k_ablation"] = args.methods, []
    if args.bf16 is not None:  # every stage that runs the model: experts, gates, multitask,
        for section in ("expert", "gate", "eval"):  # evaluation
            data[section] = {**(data.get(section) or {}), "bf16": args.bf16}
    return PipelineConfig.from_dict(data)


def cmd_pipeline(args) -> None:
    from phatgoose.pipeline import run_pipeline

    result = run_pipeline(_pipeline_config(args))
    print(result["table"])
    print("\nstage timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings_s"].items()))


def cmd_bench(args) -> None:
    from phatgoose.eval.report import write_report
    from phatgoose.pipeline import run_pipeline

    config = _pipeline_config(args)
    result = run_pipeline(config)
    bf16 = {None: "", True: " --bf16", False: " --no-bf16"}[args.bf16]
    command = (f"phatgoose bench {args.config_file}{bf16}"
               + (f" --workdir {args.workdir}" if args.workdir else "")
               + (f" --methods {' '.join(args.methods)}" if args.methods else ""))
    path = write_report(config.workdir, result, f"Results of {args.config_file}", command)
    print(path.read_text())
    print(f"report: {path}")


BF16_HELP = ("bf16 autocast (--bf16) or fp32 (--no-bf16) in every stage (experts, gates, "
             "multitask, evaluation), whatever the config says. Unset, the config decides; "
             "where it says nothing, training runs fp32 and evaluation bf16 where that is faster "
             "(GPUs, CPUs with AMX or AVX512-BF16; other CPUs emulate bf16 several times slower). "
             "Cached items are keyed by it: use another --workdir to keep both runs")
METHODS_HELP = ("run only these methods (e.g. base phatgoose), instead of the config's list and "
                "its top_k_ablation rows; the cached stages they need are shared")


# -- parser ------------------------------------------------------------------------------------
def _read_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PhatgooseError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise PhatgooseError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PhatgooseError(f"config file {path} must hold a mapping of option: value")
    return data


def build_parser() -> argparse.ArgumentParser:
    from phatgoose.eval import EvalConfig
    from phatgoose.experts import ExpertConfig, GateConfig
    from phatgoose.pipeline import SplitConfig

    parser = argparse.ArgumentParser(
        prog="phatgoose",
        description="Route every token among LoRA experts by their learned gates (PHATGOOSE).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", help="YAML file of option: value (command line wins)")
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        p.set_defaults(func=func)
        return p

    def model_arg(p):
        p.add_argument("--model", default=EMBEDDED,
                       help=f"base model: local path, cached hub id, or {EMBEDDED} (default)")
        p.add_argument("--device", default="auto",
                       help="where the base model runs: auto (the GPU if torch sees one; "
                       "default), cpu, cuda or cuda:N")

    data = command("data", "fetch data sets into the local cache", None)
    data_sub = data.add_subparsers(dest="source", required=True, metavar="SOURCE")
    bb = data_sub.add_parser("bigbench", help="extract BIG-bench tasks from the bigbench sdist",
                             description="Download the bigbench==1.0.0 sdist once (pip) and "
                             "extract the named tasks' task.json files into the cache.")
    bb.add_argument("tasks", nargs="+", help="task names, e.g. color/rgb navigate")
    bb.add_argument("--cache-dir", help="default: $PHATGOOSE_CACHE or ~/.cache/phatgoose")
    bb.add_argument("--config", help="YAML file of option: value")
    bb.add_argument("--debug", action="store_true")
    bb.set_defaults(func=cmd_data_bigbench)

    p = command("train-expert", "train one LoRA expert on a task (PEFT adapter + expert.json); "
                "checkpoints every 25 steps and resumes when rerun after an interruption",
                cmd_train_expert)
    model_arg(p)
    p.add_argument("--task", required=True,
                   help="BIG-bench name, task.json/.jsonl path, or hf:NAME")
    p.add_argument("--out", required=True, help="expert directory to write")
    p.add_argument("--log", help="JSONL file for this training's loss and validation metrics "
                   "(appended to; a resumed training rewrites the steps after its checkpoint)")
    p.add_argument("--tensorboard", help="TensorBoard log folder (when tensorboard is installed)")
    add_dataclass_args(p, SplitConfig, "data splits", prefix="split_")
    add_dataclass_args(p, ExpertConfig, "expert training")

    p = command("train-gate", "train the PHATGOOSE gate of a trained expert (post hoc); "
                "checkpoints and resumes like train-expert",
                cmd_train_gate)
    model_arg(p)
    p.add_argument("expert", help="expert directory (from train-expert)")
    p.add_argument("--task", help="training task (default: the expert's own task)")
    p.add_argument("--log", help="JSONL file for this training's loss and validation metrics "
                   "(appended to; a resumed training rewrites the steps after its checkpoint)")
    p.add_argument("--tensorboard", help="TensorBoard log folder (when tensorboard is installed)")
    add_dataclass_args(p, SplitConfig, "data splits", prefix="split_")
    add_dataclass_args(p, GateConfig, "gate training")

    lib = command("library", "build, extend, list, show and verify expert libraries", None)
    lib_sub = lib.add_subparsers(dest="action", required=True, metavar="ACTION")
    specs = {
        "build": "create a library from trained expert directories",
        "add": "add one trained expert to a library (no other expert changes)",
        "list": "list a library's experts",
        "show": "show one expert's manifest entry and metadata",
        "verify": "check files, shapes, gates and fingerprints (and fit to --model)",
        "vectors": "compute and store the average-activation vectors and the retrieval index "
                   "(from each expert's own training split, recorded at training time)",
    }
    for action, help in specs.items():
        p = lib_sub.add_parser(action, help=help, description=help)
        p.add_argument("library", help="library directory")
        p.add_argument("--config", help="YAML file of option: value")
        p.add_argument("--debug", action="store_true")
        p.set_defaults(func=cmd_library)
        if action == "build":
            p.add_argument("experts", nargs="+", help="expert directories")
        if action == "add":
            p.add_argument("expert", help="expert directory")
            p.add_argument("--name", help="name in the library (default: from the task)")
        if action == "show":
            p.add_argument("name", help="expert name")
        if action == "verify":
            p.add_argument("--model", help="also check that the experts fit this base model")
        if action == "vectors":
            model_arg(p)
            p.add_argument("--max-examples", type=int, default=1000,
                           help="training examples per expert (default: 1000)")
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--kind", nargs="+", choices=["average-activation", "retrieval"],
                           default=["average-activation", "retrieval"],
                           help="what to compute (default: both)")

    p = command("eval", "evaluate methods on tasks: rank classification / exact match", cmd_eval)
    model_arg(p)
    p.add_argument("--library", help="expert library directory (for routing methods)")
    p.add_argument("--task", nargs="+", required=True, help="tasks to evaluate")
    p.add_argument("--method", nargs="+", default=["base", "phatgoose"],
                   help="base, phatgoose, average-activation, retrieval, arrow, uniform, "
                   "merged-delta, merged-factors, single:<expert>, oracle, phatgoose@k<K> "
                   "(default: base phatgoose)")
    p.add_argument("--top-k", type=_at_least_one, default=2,
                   help="experts per token (default: 2)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="Arrow's softmax temperature (default: 1.0)")
    p.add_argument("--split", choices=["train", "validation", "test"], default="test")
    p.add_argument("--out", default="runs/eval", help="folder for results.json / results.md")
    p.add_argument("--predictions", action="store_true",
                   help="also write per-example predictions-<method>.jsonl")
    add_dataclass_args(p, SplitConfig, "data splits", prefix="split_")
    add_dataclass_args(p, EvalConfig, "evaluation")

    p = command("pipeline", "run the whole pipeline from a YAML config (cached, resumable)",
                cmd_pipeline)
    p.add_argument("config_file", help="pipeline YAML, e.g. configs/demo.yaml")
    p.add_argument("--workdir", help="override the config's workdir")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help=BF16_HELP)
    p.add_argument("--methods", nargs="+", metavar="METHOD", help=METHODS_HELP)

    p = command("bench", "run a pipeline config and write report.md (bootstrap intervals, "
                "paired differences, timings) and results.csv into its workdir", cmd_bench)
    p.add_argument("config_file", help="pipeline YAML")
    p.add_argument("--workdir", help="override the config's workdir")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help=BF16_HELP)
    p.add_argument("--methods", nargs="+", metavar="METHOD", help=METHODS_HELP)
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with the values of its ``--config`` YAML file as defaults."""
    config = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    config = config or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config:
        target = parser  # the (sub)parser of the command being run
        for token in argv:
            subs = [a for a in target._actions if isinstance(a, argparse._SubParsersAction)]
            if subs and token in subs[0].choices:
                target = subs[0].choices[token]
        values = {k.replace("-", "_"): v for k, v in _read_yaml(config).items()}
        dests = {a.dest for a in target._actions} - {"help", "config", "debug"}
        unknown = sorted(set(values) - dests)
        if unknown:
            raise PhatgooseError(f"config file {config}: unknown options {unknown}")
        for action in target._actions:
            if action.dest in values:
                action.required = False
        target.set_defaults(**values)
    return parser.parse_args(argv)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    debug = "--debug" in argv
    try:
        args = _apply_config(parser, argv)
        args.func(args)
    except PhatgooseError as err:
        if debug:
            raise
        print(f"phatgoose: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phatgoose: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
