"""Overlap between tasks' core regions: Jaccard over the whole model, per layer, per module.

All counts come from bit-packed masks (:mod:`cpift.masks`): an intersection is a word-wise AND
and a popcount, per-tensor counts one cumulative sum, and per-layer counts a ``bincount`` over the
tensors' group labels — no boolean tensors are materialised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import combinations

import numpy as np
import pandas as pd

from .errors import ParameterError
from .masks import Layout, popcount, tensor_counts

GROUP_BY = ("layer", "module", "tensor")


def expected_jaccard(k_a: int, k_b: int, d: int) -> float:
    """The expected Jaccard of two independent uniformly random subsets of sizes ``k_a`` and
    ``k_b`` of ``d`` elements: what two cores of those sizes would share by chance.

    The intersection X is hypergeometric (d, k_a, k_b) and J = X / (k_a + k_b − X); E[J] is summed
    over X's pmf within 12 standard deviations of its mean (all of the support when it is
    smaller), which is exact to floating-point precision (the mass left out is below 1e-30).
    Two empty sets give 0, as :func:`jaccard_matrix` does. For small cores it is close to
    k_a·k_b / (d·(k_a + k_b)) — at p = 1 % of any large model, p / (200 − p) ≈ 0.005.
    """
    k_a, k_b, d = int(k_a), int(k_b), int(d)
    if not (0 <= k_a <= d and 0 <= k_b <= d):
        raise ParameterError(f"the sets' sizes must be in [0, d = {d}], got {k_a} and {k_b}")
    if k_a + k_b == 0:
        return 0.0
    from scipy.stats import hypergeom

    mean = k_a * k_b / d
    variance = mean * (d - k_a) * (d - k_b) / (d * (d - 1)) if d > 1 else 0.0
    spread = 12 * variance**0.5 + 1
    lowest, highest = max(0, k_a + k_b - d), min(k_a, k_b)
    x = np.arange(max(lowest, int(mean - spread)), min(highest, int(mean + spread)) + 1)
    return float(np.sum(hypergeom.pmf(x, d, k_a, k_b) * x / (k_a + k_b - x)))
_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_SUFFIX = re.compile(r"\.(weight|bias)$")


def layer_of(name: str) -> str:
    """The transformer block index in a tensor name (``"12"``), else ``embed``, ``head`` or ``other``."""
    match = _BLOCK.search(name)
    if match:
        return match.group(1)
    if "embed_tokens" in name or ".wte." in name or ".wpe." in name or name.startswith(("wte.", "wpe.")):
        return "embed"
    if "lm_head" in name or "embed_out" in name:
        return "head"
    return "other"


def module_of(name: str) -> str:
    """The module type of a tensor name: ``self_attn.q_proj``, ``mlp.down_proj``, ``embed_tokens``, …"""
    match = _BLOCK.search(name)
    rest = name[match.end() :] if match else name.removeprefix("model.")
    return _SUFFIX.sub("", rest)


def group_labels(layout: Layout, by: str) -> list[str]:
    """Each tensor's group under ``by`` ("layer", "module" or "tensor"), in layout order."""
    if by == "layer":
        return [layer_of(n) for n in layout.names]
    if by == "module":
        return [module_of(n) for n in layout.names]
    if by == "tensor":
        return list(layout.names)
    raise ParameterError(f"by must be one of {', '.join(GROUP_BY)}; got {by!r}")


def _grouping(layout: Layout, by: str) -> tuple[list[str], np.ndarray]:
    """The groups in display order, and each tensor's group position.

    Display order for layers: embeddings, blocks by number, head, the rest; otherwise first seen.
    """
    labels = group_labels(layout, by)
    order = list(dict.fromkeys(labels))
    if by == "layer":
        rank = {"embed": -2, "head": 1 << 30, "other": (1 << 30) + 1}
        order.sort(key=lambda g: rank.get(g, int(g) if g.isdigit() else -1))
    position = {g: i for i, g in enumerate(order)}
    return order, np.array([position[g] for g in labels], dtype=np.int64)


def _per_group(values: np.ndarray, group_index: np.ndarray, n_groups: int) -> np.ndarray:
    """Sum per-tensor integer counts into per-group counts."""
    return np.bincount(group_index, weights=values, minlength=n_groups).astype(np.int64)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard index |A ∩ B| / |A ∪ B| of two packed masks; 0.0 when both are empty."""
    inter = popcount(a & b)
    union = popcount(a) + popcount(b) - inter
    return inter / union if union else 0.0


def jaccard_matrix(masks: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Task × task Jaccard of packed masks (diagonal 1), in the mapping's task order."""
    tasks = list(masks)
    matrix = np.eye(len(tasks))
    for (i, a), (j, b) in combinations(enumerate(tasks), 2):
        matrix[i, j] = matrix[j, i] = jaccard(masks[a], masks[b])
    return pd.DataFrame(matrix, index=pd.Index(tasks, name="task"), columns=pd.Index(tasks, name="task"))


def group_jaccard(masks: Mapping[str, np.ndarray], layout: Layout, by: str = "layer") -> pd.DataFrame:
    """Jaccard of every task pair within each group of tensors.

    Returns a long table with columns ``group, task_a, task_b, jaccard, intersection, union``:
    one row per group and pair (``task_a`` before ``task_b`` in task order), groups in display
    order. A group where neither task has core elements has Jaccard 0.
    """
    tasks = list(masks)
    if len(tasks) < 2:
        raise ParameterError(f"overlap needs at least two tasks, got {len(tasks)}")
    order, group_index = _grouping(layout, by)
    sizes = {t: _per_group(tensor_counts(masks[t], layout), group_index, len(order)) for t in tasks}
    frames = []
    for a, b in combinations(tasks, 2):
        inter = _per_group(tensor_counts(masks[a] & masks[b], layout), group_index, len(order))
        union = sizes[a] + sizes[b] - inter
        score = np.divide(inter, union, out=np.zeros(len(order)), where=union > 0)
        frames.append(
            pd.DataFrame(
                {"group": order, "task_a": a, "task_b": b, "jaccard": score, "intersection": inter, "union": union}
            )
        )
    table = pd.concat(frames, ignore_index=True)
    # Group-major order (a stable sort keeps pairs in task order inside each group).
    rank = table["group"].map({g: i for i, g in enumerate(order)})
    return table.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)


def group_sizes(masks: Mapping[str, np.ndarray], layout: Layout, by: str = "layer") -> pd.DataFrame:
    """Core elements per group and task: columns ``group, task, size, numel, share``."""
    order, group_index = _grouping(layout, by)
    numel = _per_group(layout.numels, group_index, len(order))
    frames = []
    for task, words in masks.items():
        size = _per_group(tensor_counts(words, layout), group_index, len(order))
        share = np.divide(size, numel, out=np.zeros(len(order)), where=numel > 0)
        frames.append(pd.DataFrame({"group": order, "task": task, "size": size, "numel": numel, "share": share}))
    return pd.concat(frames, ignore_index=True)


def overlap_significance(masks: Mapping[str, np.ndarray], layout: Layout, by: str | None = None) -> pd.DataFrame:
    """Every task pair's overlap beside chance, over the whole model (``by=None``, group ``all``)
    or within each group of tensors (``"layer"``, ``"module"``, ``"tensor"``).

    Columns: ``group, task_a, task_b, size_a, size_b, elements`` (the group's parameters),
    ``intersection, jaccard``, ``expected_jaccard`` (two random sets of the cores' sizes in that
    group: :func:`expected_jaccard`), ``lift`` (observed / expected; NaN when expected is 0) and
    ``p_value``: the chance of an intersection at least this large if the two cores were
    independent random sets of their sizes (hypergeometric upper tail).
    """
    from scipy.stats import hypergeom

    tasks = list(masks)
    if len(tasks) < 2:
        raise ParameterError(f"overlap needs at least two tasks, got {len(tasks)}")
    if by is None:
        rows = [{"group": "all", "task_a": a, "task_b": b, "size_a": popcount(masks[a]), "size_b": popcount(masks[b]),
                 "elements": layout.numel, "intersection": popcount(masks[a] & masks[b])}
                for a, b in combinations(tasks, 2)]
        table = pd.DataFrame(rows)
    else:
        table = group_jaccard(masks, layout, by).drop(columns=["jaccard", "union"])
        sizes = group_sizes(masks, layout, by).set_index(["group", "task"])
        table["size_a"] = sizes["size"].reindex(list(zip(table.group, table.task_a))).to_numpy()
        table["size_b"] = sizes["size"].reindex(list(zip(table.group, table.task_b))).to_numpy()
        table["elements"] = sizes["numel"].reindex(list(zip(table.group, table.task_a))).to_numpy()
    union = table.size_a + table.size_b - table.intersection
    table["jaccard"] = np.divide(table.intersection, union, out=np.zeros(len(table)), where=union > 0)
    table["expected_jaccard"] = [expected_jaccard(a, b, d) for a, b, d in zip(table.size_a, table.size_b, table.elements)]
    table["lift"] = np.divide(table.jaccard, table.expected_jaccard, out=np.full(len(table), np.nan),
                              where=table.expected_jaccard > 0)
    table["p_value"] = hypergeom.sf(table.intersection - 1, table.elements, table.size_a, table.size_b)
    columns = ["group", "task_a", "task_b", "size_a", "size_b", "elements", "intersection", "jaccard",
               "expected_jaccard", "lift", "p_value"]
    return table[columns].reset_index(drop=True)


def significant_pairs(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """The pairs of :func:`overlap_significance` that overlap more than chance: lift above 1 and
    a p-value below ``alpha`` after Bonferroni's correction over the rows."""
    return table[(table.lift > 1) & (table.p_value < alpha / max(len(table), 1))]
