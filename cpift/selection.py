"""Exact top-k selection over a flat score vector.

Every isolation method ends in the same step: keep exactly the k elements with the largest score
(update magnitude for CPI-FT core regions; gradient-based scores for sparse fine-tuning). Ties at
the threshold go to the lowest flat indices, so the result is deterministic and has exactly k
elements.

The threshold is found without sorting or copying the whole vector: a strided sample gives a
lower bound L that the k-th largest value is very likely above; the elements ≥ L (about k of them)
are then partitioned exactly. When the sample misleads (the candidates are fewer than k) the code
falls back to a full ``np.partition`` — the answer is exact either way, only the time differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import sqrt

import numpy as np

from .errors import ParameterError
from .masks import WORD_BITS, Layout, pack

SCOPES = ("global", "tensor")
"""Where a top-p% is taken: over the whole model (``global``) or inside each tensor (``tensor``)."""

_SAMPLE_SIZE = 1 << 20
# Passes over the scores run chunk by chunk, so that temporaries stay small (16 MiB of floats)
# next to the score vector itself; a multiple of 64 so each chunk packs into whole words.
_CHUNK = 1 << 22


@dataclass(frozen=True)
class Selection:
    """The result of :func:`top_k`: the packed mask, the k-th largest score, and k."""

    words: np.ndarray
    threshold: float
    k: int


def k_for_percent(p: float, n: int, what: str = "p") -> int:
    """k = floor(p·n/100) for a percentage p in (0, 100]; raises :class:`ParameterError` otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 100:
        raise ParameterError(f"{what} must be a percentage in (0, 100], got {p!r}")
    # Integer arithmetic on p scaled to 1e-9 avoids floor(1.0 * 100 / 100) landing at 0.999….
    return int(n * round(float(p) * 1e9)) // (100 * 10**9)


def _chunks(n: int) -> list[slice]:
    return [slice(start, min(n, start + _CHUNK)) for start in range(0, n, _CHUNK)]


def _kth_largest(scores: np.ndarray, k: int) -> tuple[float, int, int]:
    """The k-th largest score t, the number of scores > t, and the number equal to t."""
    n = scores.size
    candidates = scores
    if n > 4 * _SAMPLE_SIZE and k < n // 4:
        sample = scores[:: n // _SAMPLE_SIZE]
        expected = k * sample.size / n
        rank = int(expected + 8 * sqrt(expected) + 16)  # a generous margin: L is below t w.h.p.
        if rank < sample.size:
            lower = np.partition(sample, sample.size - rank)[sample.size - rank]
            subset = np.concatenate([c[c >= lower] for c in (scores[s] for s in _chunks(n))])
            if subset.size >= k:
                candidates = subset
    pos = candidates.size - k
    part = np.partition(candidates, pos)
    t = part[pos]
    above = part[pos + 1 :]
    n_gt = int(np.count_nonzero(above > t))
    n_eq = 1 + int(np.count_nonzero(above == t)) + int(np.count_nonzero(part[:pos] == t))
    return float(t), n_gt, n_eq


def top_k(scores: np.ndarray, k: int) -> Selection:
    """Select exactly the ``k`` largest entries of a flat float array, as a packed mask.

    ``scores`` has a length that is a multiple of 64 (a :class:`~cpift.masks.Layout`'s flat
    space); entries that must never be chosen (padding) hold ``-inf``; the rest are finite. Ties at
    the threshold go to the lowest indices. ``scores`` is not modified.
    """
    n = scores.size
    if n % WORD_BITS:
        raise ParameterError(f"the score vector's length must be a multiple of {WORD_BITS}, got {n}")
    if not 0 <= k <= n:
        raise ParameterError(f"k must be in [0, {n}], got {k}")
    words = np.zeros(n // WORD_BITS, dtype=np.uint64)
    if k == 0:
        return Selection(words, float("inf"), 0)
    t, n_gt, n_eq = _kth_largest(scores, k)
    ties_left = k - n_gt
    every_tie = ties_left == n_eq
    for part in _chunks(n):
        chunk = scores[part]
        bits = chunk >= t if every_tie else chunk > t
        if not every_tie and ties_left:
            ties = np.flatnonzero(chunk == t)[:ties_left]
            bits[ties] = True
            ties_left -= ties.size
        words[part.start // WORD_BITS : part.stop // WORD_BITS] = pack(bits)
    return Selection(words, t, k)


def check_scope(scope: str) -> None:
    """Raise :class:`ParameterError` unless ``scope`` is one of :data:`SCOPES`."""
    if scope not in SCOPES:
        raise ParameterError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")


def top_percent(scores: np.ndarray, layout: Layout, p: float, scope: str = "global") -> tuple[np.ndarray, np.ndarray]:
    """The top p% of a flat score vector over ``layout``, as a packed mask, and the threshold(s).

    ``scope="global"``: exactly floor(p·D/100) elements of the whole vector (D = ``layout.numel``),
    one threshold. ``scope="tensor"``: floor(p·n/100) inside each tensor of n elements, one
    threshold per tensor (layout order). Padding must hold ``-inf``; ties go to the lowest flat index.
    """
    check_scope(scope)
    if scope == "global":
        selection = top_k(scores, k_for_percent(p, layout.numel))
        return selection.words, np.array([selection.threshold])
    k_for_percent(p, 1)  # validates p even for a layout without tensors
    words = np.empty(layout.n_words, dtype=np.uint64)
    thresholds = np.empty(len(layout.names))
    for i, name in enumerate(layout.names):
        span = layout.word_span(name)
        selection = top_k(scores[span.start * WORD_BITS : span.stop * WORD_BITS],
                          k_for_percent(p, int(layout.numels[i])))
        words[span] = selection.words
        thresholds[i] = selection.threshold
    return words, thresholds
