"""Bootstrap confidence intervals for accuracies, and paired intervals for differences."""

from __future__ import annotations

import numpy as np


def bootstrap_means(values: list[float], samples: int = 2000, seed: int = 0) -> np.ndarray:
    """The means of ``samples`` resamples (with replacement) of ``values``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no examples")
    rng = np.random.default_rng(seed)
    return x[rng.integers(0, x.size, (samples, x.size))].mean(1)


def interval(mean: float, means: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    tail = (1 - level) / 2 * 100
    return mean, float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def bootstrap_ci(correct: list[bool], samples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, low, high): percentile bootstrap over examples."""
    return interval(float(np.mean(correct)), bootstrap_means(correct, samples, seed), level)


def paired_bootstrap(a: list[bool], b: list[bool], samples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """(mean of a - b, low, high) resampling the same examples for both methods."""
    if len(a) != len(b):
        raise ValueError(f"paired results need the same examples ({len(a)} vs {len(b)})")
    return bootstrap_ci(list(np.asarray(a, float) - np.asarray(b, float)), samples, seed, level)


def average_ci(per_task: list[list[float]], samples: int = 2000, seed: int = 0,
               level: float = 0.95) -> tuple[float, float, float]:
    """Interval of the unweighted mean over tasks, resampling examples within each task."""
    means = np.mean([bootstrap_means(v, samples, seed + i) for i, v in enumerate(per_task)], 0)
    return interval(float(np.mean([np.mean(v) for v in per_task])), means, level)
