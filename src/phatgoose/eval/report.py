"""A Markdown report of a pipeline run: accuracy with 95% bootstrap intervals per method and
task, paired intervals for PHATGOOSE minus each other method, and stage timings; plus a CSV."""

from __future__ import annotations

import csv
import json
import platform
import time
from pathlib import Path

import torch

from phatgoose.eval.evaluate import ORACLE
from phatgoose.eval.stats import average_ci, bootstrap_ci, paired_bootstrap


def _correct(work: Path, rows: dict, method: str, task: str) -> list[float]:
    if method == ORACLE:  # the oracle's examples are those of the best single expert
        method = "single:" + rows[ORACLE]["tasks"][task]["expert"]
    path = work / f"predictions-{method.replace(':', '_')}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [float(p["correct"]) for p in lines if p["task"] == task]


def _cell(ci: tuple[float, float, float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(ci[0])} [{fmt.format(ci[1])}, {fmt.format(ci[2])}]"


def write_report(work: Path | str, result: dict, title: str, command: str,
                 reference: str = "phatgoose") -> Path:
    """Write ``report.md`` and ``results.csv`` into the run folder; returns the report path."""
    work = Path(work)
    rows = result["summaries"]
    tasks = list(next(iter(rows.values()))["tasks"])
    correct = {(m, t): _correct(work, rows, m, t) for m in rows for t in tasks}
    lines = [
        f"# {title}", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d')}", "",
        "## Accuracy (95% bootstrap interval over examples)", "",
        "| method | " + " | ".join(tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
    ]
    with (work / "results.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["method", "task", "n", "accuracy", "low", "high"])
        for m in rows:
            cells = []
            for t in tasks:
                ci = bootstrap_ci(correct[m, t])
                out.writerow([m, t, len(correct[m, t]), *[round(v, 4) for v in ci]])
                cells.append(_cell(ci))
            average = average_ci([correct[m, t] for t in tasks])
            out.writerow([m, "average", "", *[round(v, 4) for v in average]])
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_cell(average)} |")
    if reference in rows and len(rows) > 1:
        lines += ["", f"## {reference} minus each method (paired bootstrap, same examples)", "",
                  "| method | " + " | ".join(tasks) + " | average |",
                  "|---|" + "---:|" * (len(tasks) + 1)]
        for m in rows:
            if m == reference:
                continue
            diffs = {t: [a - b for a, b in zip(correct[reference, t], correct[m, t])]
                     for t in tasks}
            cells = [_cell(paired_bootstrap(correct[reference, t], correct[m, t]), True)
                     for t in tasks]
            average = average_ci([diffs[t] for t in tasks])
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_cell(average, True)} |")
    lines += ["", "## Stage timings (seconds)", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in result["timings_s"].items()]
    path = work / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
