"""CPI-FT stage 2: group tasks whose core regions overlap, and order the groups into stages.

The input everywhere is a task × task similarity matrix (a :class:`pandas.DataFrame`, usually the
Jaccard overlap of core regions from :mod:`cpift.overlap`). Tasks whose similarity is at least τ
are linked; the groups are the connected components of that graph (arXiv 2508.21741, §2). τ = 0
links everything (one group, no staging); τ above every pairwise similarity leaves each task alone.

Besides the grouping at one τ, this module gives the hierarchical view behind it: connected
components of the threshold graph at τ are exactly the single-linkage clusters cut at distance
1 − τ, so :func:`groupings_by_tau` lists every grouping any τ can produce, and
:func:`linkage_matrix` / :func:`dendrogram_data` feed a dendrogram plot.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import networkx as nx
import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import dendrogram, linkage
from scipy.spatial.distance import squareform

from cpift.errors import MismatchError, ParameterError

__all__ = [
    "LINKAGE_METHODS",
    "STAGE_ORDERS",
    "Grouping",
    "dendrogram_data",
    "group_tasks",
    "groupings_by_tau",
    "linkage_matrix",
    "similarity_graph",
    "stage_order",
]

#: Names accepted by :func:`stage_order`.
STAGE_ORDERS: tuple[str, ...] = ("given", "random", "least_overlap_first")

#: Names accepted by :func:`linkage_matrix` and :func:`dendrogram_data`.
LINKAGE_METHODS: tuple[str, ...] = ("single", "average", "complete")

# Floating-point noise allowed between S[i, j] and S[j, i] (e.g. from separate computations).
_SYMMETRY_TOL = 1e-9


@dataclass(frozen=True)
class Grouping:
    """One grouping of the tasks and the τ interval that produces it.

    ``group_tasks(similarity, tau)`` returns ``groups`` for every τ with
    ``tau_min < tau <= tau_max``. τ = 0 links every pair, so it belongs to the first grouping
    of :func:`groupings_by_tau` (one group), which starts at 0.0; that interval is just the
    point [0, 0] when some tasks have similarity 0, and the next one then also starts at 0.0.
    """

    tau_min: float
    tau_max: float
    groups: tuple[tuple[str, ...], ...]


def _check_similarity(similarity: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """Validate a similarity matrix; return its tasks and its symmetrised values.

    The diagonal is not used (a task is always in its own group), so it need not be exactly 1.
    """
    if not isinstance(similarity, pd.DataFrame):
        raise ParameterError(
            f"similarity must be a pandas DataFrame, got {type(similarity).__name__}"
        )
    n_rows, n_cols = similarity.shape
    if n_rows == 0 or n_cols == 0:
        raise ParameterError("similarity is empty: at least one task is needed")
    if n_rows != n_cols:
        raise ParameterError(f"similarity must be square, got {n_rows} rows × {n_cols} columns")
    tasks = list(similarity.index)
    if similarity.index.has_duplicates:
        dups = sorted({str(t) for t in similarity.index[similarity.index.duplicated()]})
        raise ParameterError(f"similarity lists these tasks more than once: {dups}")
    columns = list(similarity.columns)
    if tasks != columns:
        missing = [t for t in tasks if t not in columns]
        extra = [c for c in columns if c not in tasks]
        if missing or extra:
            raise ParameterError(
                f"similarity index and columns differ: rows only {missing}, columns only {extra}"
            )
        pos = next(i for i, (t, c) in enumerate(zip(tasks, columns, strict=True)) if t != c)
        raise ParameterError(
            f"similarity index and columns are in a different order: "
            f"position {pos} is {tasks[pos]!r} in the index but {columns[pos]!r} in the columns"
        )
    try:
        values = similarity.to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"similarity must hold numbers: {exc}") from exc

    bad = np.argwhere(np.isnan(values))
    if bad.size:
        i, j = bad[0]
        raise ParameterError(f"similarity is NaN at ({tasks[i]!r}, {tasks[j]!r})")
    bad = np.argwhere((values < 0.0) | (values > 1.0))
    if bad.size:
        i, j = bad[0]
        raise ParameterError(
            f"similarity must be in [0, 1]: ({tasks[i]!r}, {tasks[j]!r}) = {values[i, j]!r}"
        )
    bad = np.argwhere(np.abs(values - values.T) > _SYMMETRY_TOL)
    if bad.size:
        i, j = bad[0]
        raise ParameterError(
            f"similarity is not symmetric: ({tasks[i]!r}, {tasks[j]!r}) = {values[i, j]!r} "
            f"but ({tasks[j]!r}, {tasks[i]!r}) = {values[j, i]!r}"
        )
    # Symmetrise so that every function sees exactly the same value for a pair, whichever way
    # round it is read: the τ breakpoints must match group_tasks bit for bit.
    return tasks, (values + values.T) / 2.0


def _check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, Real) or not 0.0 <= float(tau) <= 1.0:
        raise ParameterError(f"tau must be in [0, 1], got {tau!r}")
    return float(tau)


def _graph(tasks: list[str], values: np.ndarray, tau: float) -> nx.Graph:
    graph = nx.Graph()
    graph.add_nodes_from(tasks)
    rows, cols = np.triu_indices(len(tasks), k=1)
    for i, j in zip(rows, cols, strict=True):
        if values[i, j] >= tau:
            graph.add_edge(tasks[i], tasks[j], weight=float(values[i, j]))
    return graph


def _components(tasks: list[str], graph: nx.Graph) -> list[list[str]]:
    # networkx gives components as unordered sets; order them by matrix position so the result
    # does not depend on hashing or on how the graph was built.
    position = {task: k for k, task in enumerate(tasks)}
    groups = [sorted(comp, key=position.__getitem__) for comp in nx.connected_components(graph)]
    return sorted(groups, key=lambda group: position[group[0]])


def similarity_graph(similarity: pd.DataFrame, tau: float) -> nx.Graph:
    """The threshold graph of CPI-FT: tasks linked when their similarity is at least ``tau``.

    Args:
        similarity: square, symmetric task × task matrix with values in [0, 1].
        tau: link threshold in [0, 1].

    Returns:
        A graph whose nodes are the tasks in matrix order, with an edge between two different
        tasks when ``similarity >= tau``; each edge carries the similarity as ``weight``.

    Raises:
        ParameterError: on a malformed matrix or a τ outside [0, 1].
    """
    tasks, values = _check_similarity(similarity)
    return _graph(tasks, values, _check_tau(tau))


def group_tasks(similarity: pd.DataFrame, tau: float) -> list[list[str]]:
    """Group tasks into the connected components of the threshold graph at ``tau``.

    The result is deterministic: tasks inside a group follow the matrix order, and groups are
    ordered by the matrix position of their first task. τ = 0 gives a single group; a τ above
    every pairwise similarity gives one group per task.

    Raises:
        ParameterError: on a malformed matrix or a τ outside [0, 1].
    """
    tasks, values = _check_similarity(similarity)
    return _components(tasks, _graph(tasks, values, _check_tau(tau)))


def _check_groups(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ParameterError(f"groups must be a list of lists of task names, got {groups!r}")
    result = []
    seen: set[str] = set()
    for k, group in enumerate(groups):
        if isinstance(group, str) or not isinstance(group, Sequence):
            raise ParameterError(f"group {k} must be a list of task names, got {group!r}")
        if not group:
            raise ParameterError(f"group {k} is empty")
        for task in group:
            if task in seen:
                raise ParameterError(f"task {task!r} appears in more than one place in groups")
            seen.add(task)
        result.append(list(group))
    return result


def _mean_cross_similarity(
    groups: list[list[str]], tasks: list[str], values: np.ndarray
) -> list[float]:
    position = {task: k for k, task in enumerate(tasks)}
    missing = [task for group in groups for task in group if task not in position]
    if missing:
        raise MismatchError(f"tasks in groups but not in the similarity matrix: {missing}")
    indices = [[position[task] for task in group] for group in groups]
    scores = []
    for k, own in enumerate(indices):
        others = [i for m, group in enumerate(indices) if m != k for i in group]
        # A lone group overlaps with nothing; 0 keeps it first, which is harmless.
        scores.append(float(values[np.ix_(own, others)].mean()) if others else 0.0)
    return scores


def stage_order(
    groups: Sequence[Sequence[str]],
    strategy: str = "random",
    similarity: pd.DataFrame | None = None,
    seed: int = 0,
) -> list[list[str]]:
    """Arrange task groups into the sequence of CPI-FT training stages.

    Strategies (see :data:`STAGE_ORDERS`):

    - ``"given"``: keep the order of ``groups``.
    - ``"random"``: shuffle with ``random.Random(seed)``, the order the paper evaluates;
      the same seed always gives the same order.
    - ``"least_overlap_first"``: this project's heuristic (the paper does not specify one).
      Each group is scored by the mean similarity between its tasks and the tasks of all other
      groups; groups train in ascending score, ties kept in their original order. Why: in
      CPI-FT stage 4 the core parameters of every earlier group are frozen while later groups
      train, so an isolated group placed first freezes little that later groups need, whereas a
      group overlapping many others would lock parameters they share. Needs ``similarity``.

    Args:
        groups: the groups, e.g. from :func:`group_tasks`; each task at most once.
        strategy: one of :data:`STAGE_ORDERS`.
        similarity: task × task matrix covering every task in ``groups``; used (and checked)
            only by ``"least_overlap_first"``.
        seed: seed of the ``"random"`` shuffle; ignored by the other strategies.

    Returns:
        A new list of new group lists; ``groups`` is not modified.

    Raises:
        ParameterError: unknown strategy, malformed groups or matrix, or the heuristic
            without ``similarity``.
        MismatchError: a task in ``groups`` is missing from ``similarity``.
    """
    if strategy not in STAGE_ORDERS:
        raise ParameterError(
            f"unknown stage order {strategy!r}; valid names: {', '.join(STAGE_ORDERS)}"
        )
    ordered = _check_groups(groups)
    if strategy == "random":
        random.Random(seed).shuffle(ordered)
    elif strategy == "least_overlap_first":
        if similarity is None:
            raise ParameterError("stage order 'least_overlap_first' needs the similarity matrix")
        tasks, values = _check_similarity(similarity)
        scores = _mean_cross_similarity(ordered, tasks, values)
        # sorted() is stable, so ties keep the original order.
        ordered = [ordered[k] for k in sorted(range(len(ordered)), key=scores.__getitem__)]
    return ordered


def linkage_matrix(similarity: pd.DataFrame, method: str = "single") -> np.ndarray:
    """Hierarchical clustering of the tasks on the distance 1 − similarity.

    ``method="single"`` is the hierarchy behind :func:`group_tasks` (see
    :func:`groupings_by_tau`); ``"average"`` and ``"complete"`` are smoother views for plots.

    Returns:
        The ``(n − 1) × 4`` scipy linkage matrix (merged clusters, distance, size).

    Raises:
        ParameterError: malformed matrix, fewer than 2 tasks, or an unknown method.
    """
    _, values = _check_similarity(similarity)
    return _linkage(values, method)


def _linkage(values: np.ndarray, method: str) -> np.ndarray:
    if method not in LINKAGE_METHODS:
        raise ParameterError(
            f"unknown linkage method {method!r}; valid names: {', '.join(LINKAGE_METHODS)}"
        )
    if len(values) < 2:
        raise ParameterError(f"hierarchical clustering needs at least 2 tasks, got {len(values)}")
    distance = 1.0 - values
    # The diagonal need not be exactly 1 (only in [0, 1]), so set the self-distance here.
    np.fill_diagonal(distance, 0.0)
    # checks=False: the matrix is already symmetric by construction; squareform's own check
    # would also reject harmless float noise.
    return linkage(squareform(distance, checks=False), method=method)


def groupings_by_tau(similarity: pd.DataFrame) -> list[Grouping]:
    """Every distinct grouping :func:`group_tasks` can return, with the τ interval giving it.

    The connected components of the threshold graph at τ equal the single-linkage clusters cut
    at distance 1 − τ. So the grouping changes only at the single-linkage merge heights, which
    are the similarities on the edges of a maximum spanning tree of the complete similarity
    graph: removing a tree edge always splits a component, so each distinct tree weight is a
    true breakpoint. They are read off the tree in similarity units rather than from scipy's
    distances so that ``1 − (1 − s)`` rounding cannot move a breakpoint.

    Intervals: for consecutive breakpoints ``b_prev < b``, every τ in ``(b_prev, b]`` gives the
    grouping at ``b``; the first interval starts at 0.0 (τ = 0 included) and holds one group.
    If the largest pairwise similarity is below 1, a last interval up to τ = 1 has every task
    alone. A single task gives ``[Grouping(0.0, 1.0, ((task,),))]``.

    Returns:
        The groupings sorted by ``tau_min``; groups in the same order as :func:`group_tasks`.

    Raises:
        ParameterError: on a malformed matrix.
    """
    tasks, values = _check_similarity(similarity)
    tree = nx.maximum_spanning_tree(_graph(tasks, values, 0.0))
    breakpoints = sorted({weight for _, _, weight in tree.edges(data="weight")})

    result = []
    lower = 0.0
    for b in breakpoints:
        groups = _components(tasks, _graph(tasks, values, b))
        result.append(Grouping(lower, b, tuple(tuple(group) for group in groups)))
        lower = b
    if lower < 1.0:
        result.append(Grouping(lower, 1.0, tuple((task,) for task in tasks)))
    return result


def dendrogram_data(similarity: pd.DataFrame, method: str = "average") -> dict[str, list]:
    """What a dendrogram plot needs, from scipy's ``dendrogram(..., no_plot=True)``.

    Returns:
        A dict with ``icoord`` and ``dcoord`` (one 4-point line per merge, x positions and
        heights as distance 1 − similarity), ``scoord`` (the same heights as similarity) and
        ``ivl`` (the leaf labels, left to right). Plain lists, ready for JSON.

    Raises:
        ParameterError: as :func:`linkage_matrix`.
    """
    tasks, values = _check_similarity(similarity)
    tree = dendrogram(_linkage(values, method), labels=tasks, no_plot=True)
    dcoord = [[float(d) for d in line] for line in tree["dcoord"]]
    return {
        "icoord": [[float(x) for x in line] for line in tree["icoord"]],
        "dcoord": dcoord,
        "scoord": [[1.0 - d for d in line] for line in dcoord],
        "ivl": list(tree["ivl"]),
    }
