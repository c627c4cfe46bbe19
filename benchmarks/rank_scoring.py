"""Rank classification on the embedded SmolLM2: one full forward per choice vs one prompt
forward whose KV cache serves all choices (EvalConfig.share_prompt). Same scores, fewer tokens.

    python benchmarks/rank_scoring.py [--examples 20] [--task color/hsl ...]
(fetch the tasks first: phatgoose data bigbench color/hsl goal_step_wikihow/step_inference)
"""

import argparse
import time

from phatgoose.data import load_task
from phatgoose.eval import EvalConfig, choice_nll
from phatgoose.models import load_base_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", nargs="+",
                        default=["color/hsl", "goal_step_wikihow/step_inference"])
    parser.add_argument("--examples", type=int, default=20)
    args = parser.parse_args()
    base = load_base_model()
    print("| task | choices/example | full forward (s) | shared prompt (s) | speed-up "
          "| max |diff| |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.task:
        examples = load_task(name).split().test[: args.examples]
        timings, scores = {}, {}
        for shared in (False, True):
            start = time.perf_counter()
            scores[shared] = choice_nll(base, examples, EvalConfig(share_prompt=shared))
            timings[shared] = time.perf_counter() - start
        diff = max(abs(a - b) for r, s in zip(scores[False], scores[True]) for a, b in zip(r, s))
        per = sum(len(e.choices) for e in examples) / len(examples)
        print(f"| {name} | {per:.1f} | {timings[False]:.1f} | {timings[True]:.1f} | "
              f"{timings[False] / timings[True]:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
