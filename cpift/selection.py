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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import sqrt

import numpy as np

from .errors import ParameterError
from .masks import WORD_BITS, Layout, from_positions, pack, positions

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


def _empty_mask(n: int, k: int) -> np.ndarray:
    """The empty packed mask of ``n`` scores, after checking that ``n`` is whole words and k ≤ n."""
    if n % WORD_BITS:
        raise ParameterError(f"the score vector's length must be a multiple of {WORD_BITS}, got {n}")
    if not 0 <= k <= n:
        raise ParameterError(f"k must be in [0, {n}], got {k}")
    return np.zeros(n // WORD_BITS, dtype=np.uint64)


def top_k(scores: np.ndarray, k: int) -> Selection:
    """Select exactly the ``k`` largest entries of a flat float array, as a packed mask.

    ``scores`` has a length that is a multiple of 64 (a :class:`~cpift.masks.Layout`'s flat
    space); entries that must never be chosen (padding) hold ``-inf``; the rest are finite. Ties at
    the threshold go to the lowest indices. ``scores`` is not modified.
    """
    n = scores.size
    words = _empty_mask(n, k)
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


_HALF = 1 << 16
CANDIDATE_LIMIT = 1 << 24
"""At most this many scores share the k-th largest one's histogram bin for :func:`top_k_streamed`
to finish in two passes (12 bytes each: 192 MiB); more take a third pass and no extra memory."""


def _bits(scores: np.ndarray) -> np.ndarray:
    """Non-negative float32 scores as uint32 bit patterns, which order as the values do."""
    return np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)


def top_k_streamed(chunks: Callable[[], Iterable[tuple[int, np.ndarray]]], n: int, k: int,
                   candidate_limit: int = CANDIDATE_LIMIT) -> Selection:
    """:func:`top_k` over a score vector that is never held whole: exactly the ``k`` largest of
    ``n`` scores, ties to the lowest flat index, in memory proportional to the packed mask.

    ``chunks()`` yields ``(start, scores)`` pieces of the flat vector in ascending order — each a
    float array starting at a multiple of 64 and as long as a multiple of 64, with every real
    score ≥ 0 (magnitudes) and padding ``-inf`` — and is called once per pass, so the scores are
    computed again each time (e.g. read from checkpoints tensor by tensor). Pass 1 counts the
    scores by the upper 16 bits of their float32 bit pattern (which orders non-negative floats) to
    find the bin B of the k-th largest. Pass 2
    sets every score above B and keeps the scores in B as candidates, among which the remaining
    ones are chosen exactly — or, when B holds more than ``candidate_limit`` scores (e.g. the k-th
    largest is one of very many exact zeros), counts B's scores by their lower 16 bits to find the
    k-th largest value t itself, and a third pass sets the scores in B above t and the first ties.
    """
    words = _empty_mask(n, k)
    if k == 0:
        return Selection(words, float("inf"), 0)
    high_counts = np.zeros(_HALF, dtype=np.int64)
    for _, scores in chunks():
        real = scores >= 0
        high_counts += np.bincount(_bits(scores[real]) >> 16, minlength=_HALF)
    above = np.cumsum(high_counts[::-1])[::-1] - high_counts  # scores in bins above each bin
    if above[0] + high_counts[0] < k:
        raise ParameterError(f"k = {k} is more than the {int(above[0] + high_counts[0])} real scores")
    top_bin = int(np.flatnonzero(above < k)[0])  # the k-th largest lies in this bin
    wanted = k - int(above[top_bin])
    keep_candidates = high_counts[top_bin] <= candidate_limit
    candidates: list[tuple[np.ndarray, np.ndarray]] = []
    low_counts = np.zeros(_HALF, dtype=np.int64)

    def set_bits(start: int, chosen: np.ndarray) -> None:
        part = slice(start // WORD_BITS, (start + chosen.size) // WORD_BITS)
        words[part] |= pack(chosen)

    def in_order() -> Iterable[tuple[int, np.ndarray]]:
        end = 0
        for start, scores in chunks():
            if start < end or start % WORD_BITS or scores.size % WORD_BITS:
                raise ParameterError(f"chunks must come in flat order, aligned to {WORD_BITS} elements; "
                                     f"got one of {scores.size} at {start} after {end}")
            end = start + scores.size
            yield start, scores

    for start, scores in in_order():
        bits = _bits(scores)
        real = scores >= 0
        high = bits >> 16
        set_bits(start, real & (high > top_bin))
        in_bin = np.flatnonzero(real & (high == top_bin))
        if keep_candidates:
            candidates.append((in_bin + start, scores[in_bin].astype(np.float32)))
        else:
            low_counts += np.bincount(bits[in_bin] & (_HALF - 1), minlength=_HALF)
    if keep_candidates:
        indices = np.concatenate([c[0] for c in candidates])  # ascending: top_k's ties go to the lowest index
        values = np.concatenate([c[1] for c in candidates])
        padded = np.full(-(-values.size // WORD_BITS) * WORD_BITS, -np.inf, dtype=np.float32)
        padded[: values.size] = values
        chosen = top_k(padded, wanted)
        words |= from_positions(indices[positions(chosen.words)], words.size)
        return Selection(words, chosen.threshold, k)
    low_above = np.cumsum(low_counts[::-1])[::-1] - low_counts
    low = int(np.flatnonzero(low_above < wanted)[0])
    threshold_bits = (top_bin << 16) | low
    ties_left = wanted - int(low_above[low])
    for start, scores in in_order():  # ties in flat order
        bits = _bits(scores)
        real = scores >= 0
        chosen = real & (bits >> 16 == top_bin) & (bits > threshold_bits)
        if ties_left:
            ties = np.flatnonzero(real & (bits == threshold_bits))[:ties_left]
            chosen[ties] = True
            ties_left -= ties.size
        set_bits(start, chosen)
    return Selection(words, float(np.array([threshold_bits], dtype=np.uint32).view(np.float32)[0]), k)


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
