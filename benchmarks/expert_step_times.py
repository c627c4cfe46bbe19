"""Seconds per training step of one pipeline expert, in fp32 and in bf16 autocast, measured
side by side in one process: the config's recipe for that task, its real length-grouped
batches, the real training loop (``train_expert``), without validation.

    python benchmarks/expert_step_times.py configs/bench-full.yaml timedial [--steps 30]
        [--modes fp32 bf16 bf16-attention]

bf16-attention: bf16 autocast with attention in bf16 as well (the loop runs it in fp32, see
``experts.loop.sdpa_fp32_backward``). Prints the median and 10th percentile of the gaps
between logged steps. Run it on a quiet machine: a second process on the same cores (even at
low priority) slows torch's threads down several times.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
from pathlib import Path

import yaml
from compare_runs import step_gaps

import phatgoose.experts.loop as loop
from phatgoose.data.tasks import load_task
from phatgoose.experts import train_expert
from phatgoose.models import load_base_model
from phatgoose.pipeline import PipelineConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_file")
    parser.add_argument("task", help="one of the config's experts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16-attention"],
                        choices=["fp32", "bf16", "bf16-attention"])
    args = parser.parse_args()
    config = PipelineConfig.from_dict(yaml.safe_load(Path(args.config_file).read_text()))
    splits = config.split.apply(load_task(args.task))
    base = load_base_model(config.model, device=config.device)
    fp32_attention = loop.training_attention
    rows = []
    for mode in args.modes:
        recipe = dataclasses.replace(config.expert_config(args.task), steps=args.steps,
                                     bf16=mode != "fp32")
        loop.training_attention = (fp32_attention if mode != "bf16-attention"
                                   else lambda *_: contextlib.nullcontext())
        with tempfile.TemporaryDirectory() as tmp:
            train_expert(base, args.task, splits.train, [], Path(tmp) / "expert", recipe,
                         log_path=Path(tmp) / "log.jsonl")
            gaps = sorted(step_gaps(Path(tmp) / "log.jsonl"))
        rows.append((mode, statistics.median(gaps), gaps[len(gaps) // 10]))
    loop.training_attention = fp32_attention
    print(f"{args.task}, {args.steps} steps of {args.config_file}'s recipe")
    print("| mode | median s/step | 10th percentile |")
    print("|---|---:|---:|")
    for mode, median, low in rows:
        print(f"| {mode} | {median:.2f} | {low:.2f} |")


if __name__ == "__main__":
    main()
