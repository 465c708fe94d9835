"""Tests of cpift.grouping: τ graph, components, stage orders and the hierarchical view."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift.errors import MismatchError, ParameterError
from cpift.grouping import (
    STAGE_ORDERS,
    Grouping,
    dendrogram_data,
    group_tasks,
    groupings_by_tau,
    linkage_matrix,
    similarity_graph,
    stage_order,
)

TASKS = ["a", "b", "c", "d", "e"]
# Two clusters {a, b, c} and {d, e}, bridged weakly by d at 0.05.
FIVE = pd.DataFrame(
    [
        [1.0, 0.5, 0.1, 0.05, 0.0],
        [0.5, 1.0, 0.2, 0.0, 0.0],
        [0.1, 0.2, 1.0, 0.05, 0.0],
        [0.05, 0.0, 0.05, 1.0, 0.3],
        [0.0, 0.0, 0.0, 0.3, 1.0],
    ],
    index=TASKS,
    columns=TASKS,
)


def _matrix(values, tasks=None) -> pd.DataFrame:
    tasks = tasks or [f"t{i}" for i in range(len(values))]
    return pd.DataFrame(values, index=tasks, columns=tasks, dtype=float)


# --- group_tasks on known matrices -------------------------------------------------------------


@pytest.mark.parametrize(
    ("tau", "expected"),
    [
        (0.0, [["a", "b", "c", "d", "e"]]),
        (0.05, [["a", "b", "c", "d", "e"]]),
        (0.06, [["a", "b", "c"], ["d", "e"]]),
        (0.2, [["a", "b", "c"], ["d", "e"]]),
        (0.25, [["a", "b"], ["c"], ["d", "e"]]),
        (0.3, [["a", "b"], ["c"], ["d", "e"]]),
        (0.4, [["a", "b"], ["c"], ["d"], ["e"]]),
        (0.5, [["a", "b"], ["c"], ["d"], ["e"]]),
        (0.6, [["a"], ["b"], ["c"], ["d"], ["e"]]),
        (1.0, [["a"], ["b"], ["c"], ["d"], ["e"]]),
    ],
)
def test_group_tasks_known_matrix(tau, expected):
    assert group_tasks(FIVE, tau) == expected


def test_three_tasks_chain_links_transitively():
    # a–b and b–c are linked but a–c is not: connected components still join all three.
    sim = _matrix([[1, 0.4, 0.0], [0.4, 1, 0.4], [0.0, 0.4, 1]], ["a", "b", "c"])
    assert group_tasks(sim, 0.3) == [["a", "b", "c"]]
    assert group_tasks(sim, 0.5) == [["a"], ["b"], ["c"]]


def test_tau_zero_gives_one_group_even_with_zero_similarity():
    sim = _matrix(np.eye(4))
    assert group_tasks(sim, 0.0) == [["t0", "t1", "t2", "t3"]]


def test_tau_one_gives_singletons_when_off_diagonal_below_one():
    assert group_tasks(FIVE, 1.0) == [[t] for t in TASKS]


def test_tau_one_keeps_identical_cores_together():
    sim = _matrix([[1, 1, 0.2], [1, 1, 0.2], [0.2, 0.2, 1]])
    assert group_tasks(sim, 1.0) == [["t0", "t1"], ["t2"]]


def test_single_task():
    sim = _matrix([[1.0]], ["only"])
    assert group_tasks(sim, 0.5) == [["only"]]
    assert groupings_by_tau(sim) == [Grouping(0.0, 1.0, (("only",),))]


def test_order_follows_matrix_order():
    order = ["e", "c", "b", "a", "d"]
    permuted = FIVE.loc[order, order]
    assert group_tasks(permuted, 0.06) == [["e", "d"], ["c", "b", "a"]]
    assert group_tasks(permuted, 0.25) == [["e", "d"], ["c"], ["b", "a"]]
    # Same call, same answer.
    assert group_tasks(permuted, 0.25) == group_tasks(permuted, 0.25)


def test_tiny_asymmetry_is_tolerated():
    sim = FIVE.copy()
    sim.loc["a", "b"] = 0.5 + 1e-12
    assert group_tasks(sim, 0.25) == [["a", "b"], ["c"], ["d", "e"]]


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [-0.1, 1.1, math.nan, math.inf, "0.5", None, True])
def test_out_of_range_tau(tau):
    with pytest.raises(ParameterError, match=r"tau must be in \[0, 1\]"):
        group_tasks(FIVE, tau)
    with pytest.raises(ParameterError, match=r"tau must be in \[0, 1\]"):
        similarity_graph(FIVE, tau)


def _with(row, col, value, symmetric=True):
    sim = FIVE.astype(object) if isinstance(value, str) else FIVE.copy()
    sim.loc[row, col] = value
    if symmetric:
        sim.loc[col, row] = value
    return sim


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (pd.DataFrame(), "empty"),
        (FIVE.iloc[:, :4], "square"),
        (FIVE.rename(columns={"e": "z"}), "differ.*'e'.*'z'"),
        (FIVE[["b", "a", "c", "d", "e"]], "order.*'a'.*'b'"),
        (FIVE.rename(index={"b": "a"}, columns={"b": "a"}), "more than once.*'a'"),
        (_with("a", "c", 0.9, symmetric=False), "symmetric.*'a'.*'c'"),
        (_with("b", "d", math.nan), "NaN.*'b'.*'d'"),
        (_with("b", "d", 1.5), r"\[0, 1\].*'b'.*'d'"),
        (_with("c", "e", -0.2), r"\[0, 1\].*'c'.*'e'"),
        (_with("a", "b", "x"), "numbers"),
    ],
)
def test_malformed_matrix(bad, message):
    for call in (
        lambda: group_tasks(bad, 0.1),
        lambda: similarity_graph(bad, 0.1),
        lambda: groupings_by_tau(bad),
        lambda: linkage_matrix(bad),
        lambda: dendrogram_data(bad),
        lambda: stage_order([["a"]], "least_overlap_first", similarity=bad),
    ):
        with pytest.raises(ParameterError, match=message):
            call()


def test_not_a_dataframe():
    with pytest.raises(ParameterError, match="DataFrame"):
        group_tasks(FIVE.to_numpy(), 0.1)


# --- similarity_graph --------------------------------------------------------------------------


def test_similarity_graph_nodes_edges_weights():
    graph = similarity_graph(FIVE, 0.2)
    assert list(graph.nodes) == TASKS
    edges = {frozenset(edge): w for *edge, w in graph.edges(data="weight")}
    assert edges == {
        frozenset("ab"): 0.5,
        frozenset("bc"): 0.2,
        frozenset("de"): 0.3,
    }
    assert not any(u == v for u, v in graph.edges)  # no self-loops from the diagonal


# --- stage_order -------------------------------------------------------------------------------

GROUPS = [["a", "b"], ["c"], ["d", "e"], ["f"], ["g", "h"]]


def test_stage_order_given_is_a_copy():
    ordered = stage_order(GROUPS, "given")
    assert ordered == GROUPS
    ordered[0].append("x")
    assert GROUPS[0] == ["a", "b"]


def test_stage_order_random_reproducible_permutation():
    first = stage_order(GROUPS, "random", seed=7)
    assert first == stage_order(GROUPS, "random", seed=7)
    assert sorted(first) == sorted(GROUPS)
    expected = list(GROUPS)
    random.Random(7).shuffle(expected)
    assert first == expected
    # Different seeds give different orders for at least one of several seeds.
    assert any(stage_order(GROUPS, "random", seed=s) != first for s in range(8))
    assert GROUPS == [["a", "b"], ["c"], ["d", "e"], ["f"], ["g", "h"]]  # input untouched


def test_stage_order_default_is_random_seed_zero():
    assert stage_order(GROUPS) == stage_order(GROUPS, "random", seed=0)


def test_least_overlap_first_hand_case():
    # Mean cross-group similarity: {d,e} 0.1/6, {a,b} 0.35/6, {c} 0.35/4.
    groups = [["a", "b"], ["c"], ["d", "e"]]
    assert stage_order(groups, "least_overlap_first", similarity=FIVE) == [
        ["d", "e"],
        ["a", "b"],
        ["c"],
    ]


def test_least_overlap_first_ties_keep_original_order():
    sim = _matrix(np.full((3, 3), 0.2) + 0.8 * np.eye(3), ["x", "y", "z"])
    groups = [["z"], ["x"], ["y"]]
    assert stage_order(groups, "least_overlap_first", similarity=sim) == groups


def test_least_overlap_first_single_group():
    assert stage_order([["a", "b"]], "least_overlap_first", similarity=FIVE) == [["a", "b"]]


def test_stage_order_errors():
    with pytest.raises(ParameterError, match="given, random, least_overlap_first"):
        stage_order(GROUPS, "biggest_first")
    with pytest.raises(ParameterError, match="needs the similarity"):
        stage_order(GROUPS, "least_overlap_first")
    with pytest.raises(MismatchError, match="'f'"):
        stage_order([["a"], ["f"]], "least_overlap_first", similarity=FIVE)
    with pytest.raises(ParameterError, match="more than one"):
        stage_order([["a", "b"], ["b"]], "given")
    with pytest.raises(ParameterError, match="empty"):
        stage_order([["a"], []], "given")
    with pytest.raises(ParameterError, match="list of task names"):
        stage_order(["ab", "c"], "given")
    assert set(STAGE_ORDERS) == {"given", "random", "least_overlap_first"}


# --- groupings_by_tau --------------------------------------------------------------------------


def _owners(groupings: list[Grouping], tau: float) -> list[Grouping]:
    """The groupings whose interval holds tau: (tau_min, tau_max], and τ = 0 in the first."""
    if tau == 0.0:
        return groupings[:1]
    return [g for g in groupings if g.tau_min < tau <= g.tau_max]


def test_groupings_by_tau_known_matrix():
    assert groupings_by_tau(FIVE) == [
        Grouping(0.0, 0.05, (("a", "b", "c", "d", "e"),)),
        Grouping(0.05, 0.2, (("a", "b", "c"), ("d", "e"))),
        Grouping(0.2, 0.3, (("a", "b"), ("c",), ("d", "e"))),
        Grouping(0.3, 0.5, (("a", "b"), ("c",), ("d",), ("e",))),
        Grouping(0.5, 1.0, (("a",), ("b",), ("c",), ("d",), ("e",))),
    ]


def test_groupings_by_tau_ends_at_one_when_cores_identical():
    sim = _matrix([[1, 1, 0.2], [1, 1, 0.2], [0.2, 0.2, 1]])
    assert groupings_by_tau(sim) == [
        Grouping(0.0, 0.2, (("t0", "t1", "t2"),)),
        Grouping(0.2, 1.0, (("t0", "t1"), ("t2",))),
    ]


def test_groupings_by_tau_zero_similarity_gives_point_interval():
    sim = _matrix(np.eye(2), ["a", "b"])
    first, second = groupings_by_tau(sim)
    assert first == Grouping(0.0, 0.0, (("a", "b"),))
    assert second == Grouping(0.0, 1.0, (("a",), ("b",)))
    assert _owners([first, second], 0.0) == [first]
    assert _owners([first, second], 1e-12) == [second]


def test_single_linkage_heights_are_the_breakpoints():
    heights = np.sort(1.0 - linkage_matrix(FIVE, "single")[:, 2])
    breakpoints = [g.tau_max for g in groupings_by_tau(FIVE)[:-1]]
    np.testing.assert_allclose(heights, breakpoints)


# --- hierarchical view -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["single", "average", "complete"])
def test_linkage_matrix_shape(method):
    z = linkage_matrix(FIVE, method)
    assert z.shape == (4, 4)
    assert z[-1, 3] == 5  # the last merge holds every task
    assert np.all(np.diff(z[:, 2]) >= 0)


def test_linkage_errors():
    with pytest.raises(ParameterError, match="single, average, complete"):
        linkage_matrix(FIVE, "ward-ish")
    with pytest.raises(ParameterError, match="at least 2 tasks"):
        linkage_matrix(_matrix([[1.0]]))
    with pytest.raises(ParameterError, match="at least 2 tasks"):
        dendrogram_data(_matrix([[1.0]]))


def test_dendrogram_data():
    data = dendrogram_data(FIVE)
    assert set(data) == {"icoord", "dcoord", "scoord", "ivl"}
    assert sorted(data["ivl"]) == TASKS
    assert len(data["icoord"]) == len(data["dcoord"]) == len(data["scoord"]) == 4
    assert all(len(line) == 4 for line in data["icoord"] + data["dcoord"])
    for d_line, s_line in zip(data["dcoord"], data["scoord"]):
        np.testing.assert_allclose(s_line, [1.0 - d for d in d_line])
    # Single linkage: the top of the tree sits at the weakest bridge, similarity 0.05.
    top = max(max(line) for line in dendrogram_data(FIVE, "single")["dcoord"])
    assert top == pytest.approx(0.95)


# --- properties against a brute-force reference ------------------------------------------------


def _reference_groups(values: np.ndarray, tasks: list[str], tau: float) -> list[list[str]]:
    """Union-find over every pair with similarity >= tau, groups in matrix order."""
    parent = list(range(len(tasks)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            if values[i, j] >= tau:
                parent[find(i)] = find(j)
    groups: dict[int, list[str]] = {}
    for i, task in enumerate(tasks):
        groups.setdefault(find(i), []).append(task)
    return list(groups.values())  # dicts keep insertion order: first task's position


# Draw from a few round values as well as any float so that ties and exact hits on τ happen.
_values = st.one_of(
    st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
    st.floats(0.0, 1.0, allow_nan=False),
)


@st.composite
def _similarities(draw):
    n = draw(st.integers(1, 7))
    values = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            values[i, j] = values[j, i] = draw(_values)
    return values


_taus = st.one_of(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0))


@settings(max_examples=150, deadline=None)
@given(values=_similarities(), tau=_taus)
def test_group_tasks_matches_union_find(values, tau):
    tasks = [f"t{i}" for i in range(len(values))]
    assert group_tasks(_matrix(values, tasks), tau) == _reference_groups(values, tasks, tau)


@settings(max_examples=100, deadline=None)
@given(values=_similarities(), tau=_taus)
def test_groupings_by_tau_intervals_reproduce_group_tasks(values, tau):
    sim = _matrix(values)
    groupings = groupings_by_tau(sim)

    # The intervals tile [0, 1] in order, and neighbours differ.
    assert groupings[0].tau_min == 0.0 and groupings[-1].tau_max == 1.0
    for prev, nxt in zip(groupings, groupings[1:]):
        assert prev.tau_max == nxt.tau_min
        assert prev.groups != nxt.groups
    assert all(g.tau_min <= g.tau_max for g in groupings)

    # Each interval's ends and interior give its groups.
    for g in groupings:
        expected = [list(group) for group in g.groups]
        probes = {g.tau_max, (g.tau_min + g.tau_max) / 2}
        just_above = float(np.nextafter(g.tau_min, 2.0))
        if just_above <= g.tau_max:
            probes.add(just_above)
        if g is groupings[0]:
            probes.add(0.0)
        for t in probes:
            if _owners(groupings, t) == [g]:
                assert group_tasks(sim, t) == expected, (g, t)

    # Any τ falls in exactly one interval, and that interval's groups are the answer.
    owners = _owners(groupings, tau)
    assert len(owners) == 1
    assert group_tasks(sim, tau) == [list(group) for group in owners[0].groups]
