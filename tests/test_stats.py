"""cpift.stats against scipy on fixed inputs, and its intervals' properties with hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from cpift.errors import ParameterError
from cpift.stats import bootstrap_means, mean_ci, paired_difference, proportion_ci, score_interval


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (57, 200)])
def test_wilson_equals_scipy(k: int, n: int) -> None:
    expected = sps.binomtest(k, n).proportion_ci(method="wilson")
    assert proportion_ci(k, n) == pytest.approx((expected.low, expected.high))


def test_empty_and_bad_arguments() -> None:
    assert np.isnan(proportion_ci(0, 0)).all()
    assert np.isnan(mean_ci([])).all()
    with pytest.raises(ParameterError, match="level must be in"):
        proportion_ci(1, 2, level=1.5)
    with pytest.raises(ParameterError, match="same items: 3 vs 2"):
        paired_difference([1, 0, 1], [1, 0])


def test_mean_ci_is_seeded_and_weights_of_one_change_nothing() -> None:
    values = np.random.default_rng(1).random(50)
    assert mean_ci(values, seed=3) == mean_ci(values, seed=3)
    assert mean_ci(values, weights=np.ones(50)) == pytest.approx(mean_ci(values))
    low, high = mean_ci(values)
    assert low <= values.mean() <= high


def test_seeds_are_drawn_once_for_every_task() -> None:
    # Two tasks whose seeds agree: seed 0 scores 0 on both, seed 1 scores 1 on both.
    scores = np.array([[0.0] * 20, [1.0] * 20])
    replicates = bootstrap_means({"a": scores, "b": scores}, resamples=500)
    assert np.array_equal(replicates["a"], replicates["b"])
    assert np.corrcoef(replicates["a"], replicates["b"])[0, 1] == pytest.approx(1.0)
    one = bootstrap_means({"x": scores[1]}, resamples=50)["x"]
    assert np.array_equal(one, bootstrap_means({"x": scores[1:]}, resamples=50)["x"])


def test_seeds_that_disagree_widen_the_interval() -> None:
    rng = np.random.default_rng(0)
    agree = np.tile(rng.random(100) < 0.5, (3, 1)).astype(float)
    disagree = agree.copy()
    disagree[0] = rng.random(100) < 0.1
    disagree[2] = rng.random(100) < 0.9
    _, low_a, high_a = score_interval(agree)
    mean, low_d, high_d = score_interval(disagree)
    assert low_d <= mean <= high_d and high_d - low_d > high_a - low_a


def test_mcnemar_and_the_permutation_test() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random(80) < 0.7, rng.random(80) < 0.4
    d = paired_difference(a, b)
    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    assert d.test == "mcnemar-exact" and d.p_value == pytest.approx(sps.binomtest(wins, wins + losses).pvalue)
    same = paired_difference(a, a)
    assert same.p_value == 1.0 and (same.low, same.high) == (0.0, 0.0) and not same.excludes_zero
    x = rng.random((2, 60))
    assert paired_difference(x + 0.2, x).p_value < 0.01
    assert paired_difference(x, x[::-1]).p_value > 0.01
    base = rng.random(60) < 0.5
    assert paired_difference(x > 0.5, base).n_seeds == 2  # one seed of the base broadcasts


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 200), st.data())
def test_wilson_contains_the_estimate_and_narrows(n: int, data) -> None:
    k = data.draw(st.integers(0, n))
    low, high = proportion_ci(k, n)
    assert low <= k / n <= high
    low4, high4 = proportion_ci(4 * k, 4 * n)
    assert high4 - low4 < high - low


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_mcnemar_is_the_binomial_test_on_discordant_pairs(pairs) -> None:
    a, b = np.array(pairs, dtype=float).T
    wins, losses = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    expected = sps.binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    d = paired_difference(a, b, resamples=200)
    assert d.p_value == pytest.approx(expected)
    assert d.low <= d.mean <= d.high
