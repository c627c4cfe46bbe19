"""A Markdown report of a pipeline run: accuracy with 95% bootstrap intervals per method and
task, paired intervals for PHATGOOSE minus each other method, and stage timings; plus a CSV."""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from pathlib import Path

import torch

from phatgoose.eval.evaluate import predictions_path
from phatgoose.eval.stats import average_ci, bootstrap_ci, paired_bootstrap
from phatgoose.library.expert import write_text
from phatgoose.models import device_name


def _correct(work: Path, rows: dict, method: str, task: str) -> list[float]:
    if "expert" in rows[method]["tasks"][task]:  # oracle / own expert: that single expert's
        prefix = "expert:" if method.startswith("own expert") else "single:"
        method = prefix + rows[method]["tasks"][task]["expert"]
    path = predictions_path(work, method)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [float(p["correct"]) for p in lines if p["task"] == task]


def _cell(ci: tuple[float, float, float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(ci[0])} [{fmt.format(ci[1])}, {fmt.format(ci[2])}]"


def _suite_tables(work: Path, rows: dict, tasks: list[str], reference: str) -> list[str]:
    rows = {m: r for m, r in rows.items() if all(t in r["tasks"] for t in tasks)}
    correct = {(m, t): _correct(work, rows, m, t) for m in rows for t in tasks}
    lines = ["Accuracy (95% bootstrap interval over examples):", "",
             "| method | " + " | ".join(tasks) + " | average |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for m in rows:
        cells = [_cell(bootstrap_ci(correct[m, t])) for t in tasks]
        average = average_ci([correct[m, t] for t in tasks])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_cell(average)} |")
    if reference in rows and len(rows) > 1:
        lines += ["", f"{reference} minus each method (paired bootstrap, same examples):", "",
                  "| method | " + " | ".join(tasks) + " | average |",
                  "|---|" + "---:|" * (len(tasks) + 1)]
        for m in rows:
            if m == reference:
                continue
            diffs = [[a - b for a, b in zip(correct[reference, t], correct[m, t])]
                     for t in tasks]
            cells = [_cell(paired_bootstrap(correct[reference, t], correct[m, t]), True)
                     for t in tasks]
            lines.append(f"| {m} | " + " | ".join(cells)
                         + f" | {_cell(average_ci(diffs), True)} |")
    return lines


def _csv_rows(work: Path, rows: dict, suites: dict[str, list[str]]) -> list[list]:
    out = []
    for suite, tasks in suites.items():
        for m, r in rows.items():
            for t in tasks:
                if t in r["tasks"]:
                    c = _correct(work, rows, m, t)
                    out.append([suite, m, t, len(c), *[round(v, 4) for v in bootstrap_ci(c)]])
    return out


def write_report(work: Path | str, result: dict, title: str, command: str,
                 reference: str = "phatgoose") -> Path:
    """Write ``report.md`` and ``results.csv`` into the run folder; returns the report path.

    One section per evaluation suite (``result["suites"]``): accuracy with 95% bootstrap
    intervals, paired intervals for ``reference`` minus each method; for held-in tasks, whether
    each expert beats the base model on its own task; stage timings; routing plots if made."""
    work = Path(work)
    rows = result["summaries"]
    suites = result.get("suites") or {"evaluation": list(next(iter(rows.values()))["tasks"])}
    lines = [
        f"# {title}", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {device_name(torch.device('cpu'))}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}  ",
        f"Date: {time.strftime('%Y-%m-%d')}",
    ]
    for suite, tasks in suites.items():
        lines += ["", f"## {suite}", ""] + _suite_tables(work, rows, tasks, reference)
    own = next((m for m in rows if m.startswith("own expert")), None)
    if own and "base" in rows:
        lines += ["", "## Does each expert beat the base model on its own task?", "",
                  "| task | base | own expert | own expert - base (paired 95% interval) | "
                  "learned |", "|---|---:|---:|---:|---|"]
        for task in rows[own]["tasks"]:
            a, b = _correct(work, rows, own, task), _correct(work, rows, "base", task)
            diff = paired_bootstrap(a, b)
            lines.append(f"| {task} | {sum(b) / len(b):.3f} | {sum(a) / len(a):.3f} | "
                         f"{_cell(diff, True)} | {'yes' if diff[1] > 0 else 'no'} |")
    for png, caption in (("routing_heatmap.png", "PHATGOOSE routing share per task and expert"),
                         ("routing_layers.png", "PHATGOOSE routing share by layer")):
        if (work / png).exists():
            lines += ["", f"![{caption}]({png})"]
    compute = result.get("compute_s", {})
    by_device = result.get("compute_s_by_device", {})
    devices = sorted({d for per_device in by_device.values() for d in per_device})
    split = devices if len(devices) > 1 else []  # one device: the computed column says it all
    lines += ["", "## Stage timings (seconds)", "",
              "This run: wall time of each stage in this invocation (cached stages take ~0 s). "
              "Computed: the time each stage's cached results took to make, summed over the "
              "runs that made them (a run resumed across sessions shows its whole cost)."
              + (" Then split by the device that computed them." if split else "")
              + (f" All of it on {devices[0]}." if len(devices) == 1 else ""), "",
              "| stage | this run | computed |" + "".join(f" on {d} |" for d in split),
              "|---|---:|---:|" + "---:|" * len(split)]
    for stage in dict.fromkeys([*result["timings_s"], *compute]):
        lines.append(f"| {stage} | {result['timings_s'].get(stage, '')} | "
                     f"{compute.get(stage, '')} |"
                     + "".join(f" {by_device.get(stage, {}).get(d, '')} |" for d in split))
    if compute:
        lines.append(f"| total | {round(sum(result['timings_s'].values()), 1)} | "
                     f"{round(sum(compute.values()), 1)} |"
                     + "".join(f" {round(sum(s.get(d, 0.0) for s in by_device.values()), 1)} |"
                               for d in split))
    table = io.StringIO()
    out = csv.writer(table, lineterminator="\n")  # write_text writes the platform's newline
    out.writerow(["suite", "method", "task", "n", "accuracy", "low", "high"])
    out.writerows(_csv_rows(work, rows, suites))
    write_text(work / "results.csv", table.getvalue())
    path = work / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path
