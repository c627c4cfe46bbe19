"""Rank classification on the embedded SmolLM2: one full forward per choice vs one prompt
forward whose KV cache serves all choices (EvalConfig.share_prompt). Same scores, fewer tokens.

    python benchmarks/rank_scoring.py [--examples 16] [--task color/hsl ...]
    python benchmarks/rank_scoring.py --library runs/bench-full/library --examples 8
    python benchmarks/rank_scoring.py --library runs/bench-full/library --examples 8 --no-bf16

With --library, the model is routed with PHATGOOSE over that library, and the "before" column
is also the dense reference path (every expert computed), as evaluations ran before issue 4;
the "after" column is the default path (sparse above 8 experts) with shared prompts.

Defaults: the full benchmark's 16 held-out tasks (siblings and BBH analogues) with its
evaluation settings (prompts up to 256 tokens, choices up to 32, 16 prompts per forward).
In bf16 (``--bf16``; by default where it is the faster mode, as ``phatgoose eval`` decides), both
columns run inside one ``inference_autocast`` region, as ``evaluate_task`` runs each task.
(fetch the tasks first: phatgoose data bigbench <task> ...)
"""

import argparse
import time

from phatgoose.data import load_task
from phatgoose.eval import EvalConfig, choice_nll
from phatgoose.experts.loop import inference_autocast
from phatgoose.library import ExpertLibrary
from phatgoose.models import load_base_model, resolve_bf16
from phatgoose.routing import RoutedLinear, route

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
    parser.add_argument("--library", help="route with PHATGOOSE over this library (top-2)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: where it is the faster mode)")
    args = parser.parse_args()
    base = load_base_model()
    device = next(base.model.parameters()).device
    bf16 = resolve_bf16(args.bf16, device)
    print(f"{'bf16 autocast' if bf16 else 'fp32'} on {device}")
    routed: list[RoutedLinear] = []
    if args.library:
        route(base.model, ExpertLibrary(args.library), method="phatgoose", top_k=2)
        routed = [m for m in base.model.modules() if isinstance(m, RoutedLinear)]
        default_path = routed[0].path
        print(f"routed over {args.library}: {routed[0].num_experts} experts, "
              f"{len(routed)} modules; before: dense path, after: {default_path} path")
    print("| task | choices/example | full forward (s) | shared prompt (s) | speed-up "
          "| max |diff| |")
    print("|---|---:|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    with inference_autocast(base.model, bf16, device):  # as evaluate_task runs a task
        for name in args.task:
            examples = load_task(name).split().test[: args.examples]
            timings, scores = {}, {}
            for shared in (False, True):
                for module in routed:  # before issue 4: every expert computed
                    module.path = default_path if shared else "dense"
                start = time.perf_counter()
                config = EvalConfig(share_prompt=shared, max_input_tokens=256, max_target_tokens=32,
                                    bf16=bf16)
                scores[shared] = choice_nll(base, examples, config)
                timings[shared] = time.perf_counter() - start
            diff = max(abs(a - b) for r, s in zip(scores[False], scores[True])
                       for a, b in zip(r, s))
            per = sum(len(e.choices) for e in examples) / len(examples)
            print(f"| {name} | {per:.1f} | {timings[False]:.1f} | {timings[True]:.1f} | "
                  f"{timings[False] / timings[True]:.1f}x | {diff:.1e} |", flush=True)
            totals = [totals[0] + timings[False], totals[1] + timings[True]]
    print(f"| all | | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.1f}x | |")


if __name__ == "__main__":
    main()
