"""Exact top-k selection: exactly k elements, ties to the lowest indices, on every code path."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift.errors import ParameterError
from cpift.masks import pack
from cpift.selection import k_for_percent, top_k


def reference(scores: np.ndarray, k: int) -> np.ndarray:
    """The k largest by (value descending, index ascending): a stable sort, the obvious way."""
    order = np.lexsort((np.arange(scores.size), -scores))
    mask = np.zeros(scores.size, dtype=bool)
    mask[order[:k]] = True
    return pack(mask)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]) | st.floats(0, 10, width=32), min_size=1, max_size=300),
    data=st.data(),
)
def test_top_k_matches_reference_with_ties(values: list[float], data: st.DataObject) -> None:
    n = -(-len(values) // 64) * 64
    scores = np.full(n, -np.inf, dtype=np.float32)
    scores[: len(values)] = values
    k = data.draw(st.integers(0, len(values)))
    selection = top_k(scores, k)
    assert np.array_equal(selection.words, reference(scores, k))
    assert int(np.bitwise_count(selection.words).sum()) == k
    if k:
        chosen = np.unpackbits(selection.words.view(np.uint8), bitorder="little").astype(bool)
        assert scores[chosen].min() == selection.threshold
        assert (scores[~chosen] <= selection.threshold).all()


def test_sampled_path_is_exact() -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(5 << 20).astype(np.float32) ** 2
    k = 52_429
    assert np.array_equal(top_k(scores, k).words, reference(scores, k))


def test_misleading_sample_falls_back_to_exact() -> None:
    # The strided sample sees only zeros, so its lower bound admits too few candidates.
    n = 5 << 20
    scores = np.zeros(n, dtype=np.float32)
    stride = n // (1 << 20)
    scores[np.arange(n) % stride != 0] = 1.0
    scores[1] = 3.0
    k = n // 2
    selection = top_k(scores, k)
    assert np.array_equal(selection.words, reference(scores, k))


def test_all_equal_scores_take_lowest_indices() -> None:
    scores = np.ones(6 << 20, dtype=np.float32)
    selection = top_k(scores, 1000)
    bits = np.unpackbits(selection.words[:20].view(np.uint8), bitorder="little")
    assert bits[:1000].all() and not bits[1000:].any()
    assert int(np.bitwise_count(selection.words).sum()) == 1000


@pytest.mark.parametrize("p", [0, -1, 100.5, float("nan"), "1", True, None])
def test_percent_out_of_range(p: object) -> None:
    with pytest.raises(ParameterError, match="p must be a percentage"):
        k_for_percent(p, 100)  # type: ignore[arg-type]


def test_k_for_percent_is_floor() -> None:
    assert k_for_percent(1, 134_515_008) == 1_345_150
    assert k_for_percent(100, 77) == 77
    assert k_for_percent(0.3, 1000) == 3  # 0.3·1000/100 must not round down to 2
    assert k_for_percent(1.0, 99) == 0


def test_bad_lengths_and_k() -> None:
    with pytest.raises(ParameterError, match="multiple of 64"):
        top_k(np.zeros(10, dtype=np.float32), 1)
    with pytest.raises(ParameterError, match="k must be in"):
        top_k(np.zeros(64, dtype=np.float32), 65)
