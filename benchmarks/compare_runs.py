"""Two runs of one benchmark config, example by example: e.g. fp32 against bf16 autocast.

    python benchmarks/compare_runs.py configs/bench-full.yaml runs/bench-full \
        runs/bench-full-bf16 --methods base phatgoose

For every method both workdirs evaluated (their predictions-<method>.jsonl) and each suite of
the config: the mean accuracy over the suite's tasks in each run, the paired difference (second
minus first; 95% bootstrap interval resampling the same examples within each task), and how
often the two runs predicted the same answer. "own experts" pairs each held-in task with its own
expert's predictions (predictions-expert_<task>.jsonl). With --steps, also the median seconds
per training step of each expert both runs trained (from the time stamps of logs/expert-*.jsonl).
Those time whatever else the machine ran meanwhile: for a speed comparison, prefer
expert_step_times.py, which times both modes side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from phatgoose.eval import predictions_path
from phatgoose.eval.stats import average_ci
from phatgoose.library import expert_name


def predictions(work: Path, method: str) -> dict[str, list[dict]]:
    """task -> the run's per-example predictions for ``method`` (empty if it has none), from
    the file the pipeline writes for it."""
    path = predictions_path(work, method)
    if not path.exists():
        return {}
    by_task: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        p = json.loads(line)
        by_task.setdefault(p["task"], []).append(p)
    return by_task


def own_experts(work: Path, tasks: list[str]) -> dict[str, list[dict]]:
    return {t: predictions(work, f"expert:{expert_name(t)}").get(t, []) for t in tasks}


def compare(first: dict[str, list[dict]], second: dict[str, list[dict]],
            tasks: list[str]) -> dict | None:
    tasks = [t for t in tasks if first.get(t) and second.get(t)]
    if not tasks:
        return None
    a, b = [], []
    same = total = 0
    for t in tasks:
        if [p["index"] for p in first[t]] != [p["index"] for p in second[t]]:
            raise SystemExit(f"{t}: the two runs evaluated different examples")
        a.append([float(p["correct"]) for p in first[t]])
        b.append([float(p["correct"]) for p in second[t]])
        same += sum(p["prediction"] == q["prediction"] for p, q in zip(first[t], second[t]))
        total += len(first[t])
    diff = average_ci([[y - x for x, y in zip(u, v)] for u, v in zip(a, b)])
    return {"tasks": len(tasks), "first": float(np.mean([np.mean(v) for v in a])),
            "second": float(np.mean([np.mean(v) for v in b])),
            "diff": diff, "same_prediction": same / total}


def step_gaps(log: Path) -> list[float]:
    """Wall seconds between consecutive logged steps of a training log (JSONL)."""
    times = [json.loads(line)["time"] for line in log.read_text().splitlines()]
    return [b - a for a, b in zip(times, times[1:]) if b > a]  # a resumed run logs steps again


def step_seconds(work: Path, name: str) -> float | None:
    """Median wall seconds between consecutive logged training steps of expert ``name``."""
    path = work / "logs" / f"expert-{name}.jsonl"
    gaps = step_gaps(path) if path.exists() else []
    return float(np.median(gaps)) if gaps else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the benchmark config both runs used (for its suites)")
    parser.add_argument("first", type=Path, help="workdir of the first run (e.g. fp32)")
    parser.add_argument("second", type=Path, help="workdir of the second run (e.g. bf16)")
    parser.add_argument("--methods", nargs="+", default=["base", "phatgoose"])
    parser.add_argument("--steps", action="store_true",
                        help="also compare the experts' median seconds per training step")
    args = parser.parse_args()
    suites = yaml.safe_load(Path(args.config).read_text())["suites"]
    print(f"| method | suite | tasks | {args.first.name} | {args.second.name} | "
          "difference [95% interval] | same prediction |")
    print("|---|---|---:|---:|---:|---:|---:|")
    rows = [(m, suite, predictions(args.first, m), predictions(args.second, m), tasks)
            for m in args.methods for suite, tasks in suites.items()]
    held_in = suites.get("held-in", [])
    rows.append(("own experts", "held-in", own_experts(args.first, held_in),
                 own_experts(args.second, held_in), held_in))
    for method, suite, first, second, tasks in rows:
        r = compare(first, second, tasks)
        if r is None:
            continue
        d = r["diff"]
        print(f"| {method} | {suite} | {r['tasks']} | {r['first']:.3f} | {r['second']:.3f} | "
              f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | {r['same_prediction']:.0%} |")
    if args.steps:
        print(f"\n| expert | {args.first.name} (s/step) | {args.second.name} | ratio |")
        print("|---|---:|---:|---:|")
        for task in yaml.safe_load(Path(args.config).read_text())["experts"]:
            a, b = (step_seconds(w, expert_name(task)) for w in (args.first, args.second))
            if a and b:
                print(f"| {task} | {a:.2f} | {b:.2f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
