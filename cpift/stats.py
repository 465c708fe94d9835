"""Intervals and paired tests for per-item scores in [0, 1].

A model's score on a task is the mean of its per-item scores; with several seeds (training runs),
the mean over seeds of the per-seed means, every seed scored on the same items. The choices:

- One seed, binary scores (accuracy, exact match): the Wilson score interval
  (:func:`proportion_ci`), which keeps its coverage at small n and near 0 or 1.
- Otherwise a percentile bootstrap, hierarchical with several seeds: resample the seeds, then the
  items within each drawn seed (:func:`bootstrap_means`). Seeds are training runs and items are
  questions; both vary, and the interval reflects both. One seed draw is shared by every task of
  a model, so statistics across tasks (a normalised average) keep their seed-level correlation.
- Two models on the same items (:func:`paired_difference`): the interval of the mean difference
  by the same bootstrap of the per-item differences; the p-value by exact McNemar (a two-sided
  binomial test on the discordant pairs) for one seed of binary scores each, else a paired
  sign-flip permutation test on the per-item differences averaged over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as _sps

from .errors import ParameterError

DEFAULT_RESAMPLES = 2000
"""Bootstrap resamples and permutations (at least 2,000)."""


def _check(level: float, resamples: int = DEFAULT_RESAMPLES) -> None:
    if not 0 < level < 1:
        raise ParameterError(f"level must be in (0, 1), got {level!r}")
    if resamples < 1:
        raise ParameterError(f"resamples must be at least 1, got {resamples!r}")


def _matrix(values: ArrayLike, what: str) -> np.ndarray:
    """``values`` as a (seeds, items) float array (a 1-D array is one seed)."""
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ParameterError(f"{what} must be 1-D (items) or 2-D (seeds × items), got shape {array.shape}")
    return array


def _binary(array: np.ndarray) -> bool:
    return bool(np.isin(array, (0.0, 1.0)).all())


def proportion_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (``(nan, nan)`` for n = 0)."""
    _check(level)
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ParameterError(f"successes must be in [0, n = {n}], got {successes}")
    interval = _sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(interval.low), float(interval.high)


def percentile_interval(replicates: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """The (1 − level)/2 and (1 + level)/2 quantiles of bootstrap ``replicates`` (NaN ignored)."""
    _check(level)
    values = np.asarray(replicates, dtype=float)
    if not np.isfinite(values).any():
        return float("nan"), float("nan")
    low, high = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_means(samples: Mapping[str, ArrayLike], *, weights: Mapping[str, ArrayLike] | None = None,
                    resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Hierarchical bootstrap replicates of each key's mean score (e.g. each task of one model).

    Each value is (seeds, items) or 1-D (one seed); every key has the same number of seeds. One
    replicate draws the seeds with replacement — one draw shared by all keys — then, for every
    drawn seed and key, that key's items with replacement; its mean is the mean over the drawn
    seeds of the (weighted) mean over the drawn items. Returns key → ``resamples`` replicates.
    """
    _check(0.5, resamples)
    arrays = {key: _matrix(value, f"samples[{key!r}]") for key, value in samples.items()}
    if not arrays:
        return {}
    seeds = {a.shape[0] for a in arrays.values()}
    if len(seeds) > 1:
        raise ParameterError(f"every key needs the same number of seeds, got {sorted(seeds)}")
    n_seeds = seeds.pop()
    rng = np.random.default_rng(seed)
    seed_draw = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    out = {}
    for key, scores in arrays.items():
        w = np.ones_like(scores) if weights is None or key not in weights else _matrix(weights[key], "weights")
        if w.shape != scores.shape:
            raise ParameterError(f"weights[{key!r}] has shape {w.shape}, its scores {scores.shape}")
        n_items = scores.shape[1]
        if n_items == 0:
            out[key] = np.full(resamples, np.nan)
            continue
        items = rng.integers(0, n_items, size=(resamples, n_seeds, n_items))
        rows = seed_draw[:, :, None]
        drawn_w = w[rows, items]
        with np.errstate(invalid="ignore", divide="ignore"):
            per_seed = (scores[rows, items] * drawn_w).sum(axis=2) / drawn_w.sum(axis=2)
        out[key] = per_seed.mean(axis=1)
    return out


def mean_ci(values: ArrayLike, level: float = 0.95, seed: int = 0, resamples: int = DEFAULT_RESAMPLES,
            weights: ArrayLike | None = None) -> tuple[float, float]:
    """Bootstrap percentile interval of the (weighted) mean of ``values`` (``(nan, nan)`` if empty)."""
    _check(level, resamples)
    array = np.asarray(values, dtype=float).reshape(-1)
    if array.size == 0:
        return float("nan"), float("nan")
    w = None if weights is None else {"x": np.asarray(weights, dtype=float).reshape(-1)}
    return percentile_interval(bootstrap_means({"x": array}, weights=w, resamples=resamples, seed=seed)["x"], level)


def score_interval(scores: ArrayLike, level: float = 0.95, seed: int = 0,
                   resamples: int = DEFAULT_RESAMPLES) -> tuple[float, float, float]:
    """``(mean, low, high)`` of a model's score on one task: Wilson for one seed of binary
    scores, the hierarchical bootstrap otherwise. ``scores``: (seeds, items) or 1-D."""
    _check(level, resamples)
    array = _matrix(scores, "scores")
    if array.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(array.mean(axis=1).mean())
    if array.shape[0] == 1 and _binary(array):
        return (mean, *proportion_ci(int(array.sum()), array.shape[1], level))
    replicates = bootstrap_means({"x": array}, resamples=resamples, seed=seed)["x"]
    return (mean, *percentile_interval(replicates, level))


@dataclass(frozen=True)
class PairedDifference:
    """Model a − model b on the same items: the mean difference, its interval, a p-value and the
    test that gave it (``"mcnemar-exact"`` or ``"permutation"``)."""

    mean: float
    low: float
    high: float
    p_value: float
    test: str
    n_items: int
    n_seeds: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or below 0."""
        return self.low > 0 or self.high < 0


def paired_difference(a: ArrayLike, b: ArrayLike, level: float = 0.95, seed: int = 0,
                      resamples: int = DEFAULT_RESAMPLES) -> PairedDifference:
    """a − b for two models scored on the same items (see the module docstring).

    ``a``, ``b``: (seeds, items) or 1-D with the same items; a side with one seed (an untrained
    base model) is paired with every seed of the other, else both have the same seeds.
    """
    _check(level, resamples)
    x, y = _matrix(a, "a"), _matrix(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ParameterError(f"a and b must score the same items: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] != y.shape[0] and 1 not in (x.shape[0], y.shape[0]):
        raise ParameterError(f"a and b have {x.shape[0]} and {y.shape[0]} seeds; pair equal seeds, or one with one")
    diff = x - y  # a single seed broadcasts over the other's
    n_seeds, n_items = diff.shape
    if n_items == 0:
        return PairedDifference(float("nan"), float("nan"), float("nan"), float("nan"), "none", 0, n_seeds)
    mean = float(diff.mean())
    low, high = percentile_interval(bootstrap_means({"d": diff}, resamples=resamples, seed=seed)["d"], level)
    if x.shape[0] == 1 and y.shape[0] == 1 and _binary(x) and _binary(y):
        wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        p_value = _sps.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
        return PairedDifference(mean, low, high, float(p_value), "mcnemar-exact", n_items, n_seeds)
    per_item = diff.mean(axis=0)
    if not per_item.any():
        return PairedDifference(mean, low, high, 1.0, "permutation", n_items, n_seeds)
    result = _sps.permutation_test((per_item,), np.mean, permutation_type="samples", n_resamples=resamples,
                                   alternative="two-sided", random_state=seed)
    return PairedDifference(mean, low, high, float(result.pvalue), "permutation", n_items, n_seeds)
