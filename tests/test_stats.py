"""Bootstrap intervals against closed-form expectations."""

import math

import pytest

from phatgoose.eval.stats import bootstrap_ci, paired_bootstrap


def test_degenerate_samples_have_zero_width():
    assert bootstrap_ci([True] * 10) == (1.0, 1.0, 1.0)
    assert paired_bootstrap([True] * 5, [False] * 5) == (1.0, 1.0, 1.0)
    assert paired_bootstrap([True, False] * 5, [True, False] * 5) == (0.0, 0.0, 0.0)


def test_interval_matches_the_normal_approximation():
    correct = [i % 10 < 3 for i in range(1000)]  # p = 0.3, n = 1000
    mean, low, high = bootstrap_ci(correct, samples=4000)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 1000)
    assert mean == pytest.approx(0.3)
    assert low == pytest.approx(0.3 - half, abs=0.006)
    assert high == pytest.approx(0.3 + half, abs=0.006)


def test_paired_interval_is_narrower_than_unpaired_for_correlated_methods():
    a = [i % 3 != 0 for i in range(300)]
    b = [x if i % 10 else not x for i, x in enumerate(a)]  # b agrees with a 90% of the time
    diff, low, high = paired_bootstrap(a, b)
    _, la, ha = bootstrap_ci(a)
    assert low <= diff <= high
    assert high - low < ha - la
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([True], [True, False])


def test_average_interval_over_tasks():
    from phatgoose.eval.stats import average_ci

    mean, low, high = average_ci([[1.0] * 10, [0.0, 1.0] * 10])
    assert mean == pytest.approx(0.75)
    assert low < 0.75 < high and low >= 0.5 and high <= 1.0
    assert average_ci([[1.0] * 4, [0.0] * 4]) == (0.5, 0.5, 0.5)
