"""Rank classification on the embedded SmolLM2: one full forward per choice vs one prompt
forward whose KV cache serves all choices (EvalConfig.share_prompt). Same scores, fewer tokens.

    python benchmarks/rank_scoring.py [--examples 16] [--task color/hsl ...]

Defaults: the full benchmark's 16 held-out tasks (siblings and BBH analogues) with its
evaluation settings (prompts up to 256 tokens, choices up to 32, 16 prompts per forward).
(fetch the tasks first: phatgoose data bigbench <task> ...)
"""

import argparse
import time

from phatgoose.data import load_task
from phatgoose.eval import EvalConfig, choice_nll
from phatgoose.models import load_base_model

HELD_OUT = [  # configs/bench-full.yaml's siblings and BBH analogues
    "goal_step_wikihow/step_inference", "unit_conversion/different_systems", "color/hsl",
    "fact_checker/politifact", "causal_judgment", "date_understanding", "disambiguation_qa",
    "formal_fallacies_syllogisms_negation", "hyperbaton", "logical_deduction/three_objects",
    "movie_recommendation", "navigate", "snarks", "sports_understanding", "temporal_sequences",
    "tracking_shuffled_objects/three_objects",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", nargs="+", default=HELD_OUT)
    parser.add_argument("--examples", type=int, default=16)
    args = parser.parse_args()
    base = load_base_model()
    print("| task | choices/example | full forward (s) | shared prompt (s) | speed-up "
          "| max |diff| |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    for name in args.task:
        examples = load_task(name).split().test[: args.examples]
        timings, scores = {}, {}
        for shared in (False, True):
            start = time.perf_counter()
            config = EvalConfig(share_prompt=shared, max_input_tokens=256, max_target_tokens=32)
            scores[shared] = choice_nll(base, examples, config)
            timings[shared] = time.perf_counter() - start
        diff = max(abs(a - b) for r, s in zip(scores[False], scores[True]) for a, b in zip(r, s))
        per = sum(len(e.choices) for e in examples) / len(examples)
        print(f"| {name} | {per:.1f} | {timings[False]:.1f} | {timings[True]:.1f} | "
              f"{timings[False] / timings[True]:.1f}x | {diff:.1e} |", flush=True)
        totals = [totals[0] + timings[False], totals[1] + timings[True]]
    print(f"| all | | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.1f}x | |")


if __name__ == "__main__":
    main()
