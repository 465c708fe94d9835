"""Tests of cpift.plots: every figure shows the library's numbers, on the tiny model's regions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cpift.fusion import fuse, transplant_report
from cpift.grouping import dendrogram_data, group_tasks, groupings_by_tau
from cpift.overlap import jaccard_matrix
from cpift.plots import (
    angle_distribution_figure,
    core_sizes_figure,
    dendrogram_figure,
    group_jaccard_heatmap,
    jaccard_heatmap,
    magnitude_histogram_figure,
    node_positions,
    pairs_heatmap,
    similarity_graph_figure,
    stage_plan_figure,
    transplant_shares_figure,
)
from cpift.plots.grouping import EDGE_WIDTH
from cpift.regions import core_regions


@pytest.fixture(scope="module")
def regions(tiny_base, tiny_tasks):
    return core_regions(tiny_base, tiny_tasks, p=5)


def _similarity(n: int = 6, seed: int = 0) -> pd.DataFrame:
    """The Jaccard matrix of random packed masks (density 1/4, so every pair overlaps a little)."""
    rng = np.random.default_rng(seed)
    masks = {f"t{i}": rng.integers(0, 2**63, 64, dtype=np.uint64) & rng.integers(0, 2**63, 64, dtype=np.uint64)
             for i in range(n)}
    return jaccard_matrix(masks)


def test_core_sizes_figure_shows_each_tasks_share(regions):
    sizes = regions.sizes("layer")
    fig = core_sizes_figure(sizes)
    assert [bar.name for bar in fig.data] == regions.tasks
    for bar in fig.data:
        rows = sizes[sizes.task == bar.name]
        assert list(bar.x) == rows["group"].astype(str).tolist()
        assert np.allclose(bar.y, 100 * rows["share"])
        assert [int(c[0]) for c in bar.customdata] == rows["size"].tolist()


def test_magnitude_histogram_marks_thresholds_on_a_log_axis(regions):
    histograms = {t: regions.histogram(t) for t in regions.tasks}
    thresholds = {t: regions.threshold(t) for t in regions.tasks}
    fig = magnitude_histogram_figure(histograms, thresholds, p=5)
    assert fig.layout.xaxis.type == "log"
    lines = [t for t in fig.data if "threshold" not in t.name]
    marks = [t for t in fig.data if "threshold" in t.name]
    assert len(lines) == len(marks) == len(regions.tasks)
    for task, line, mark in zip(regions.tasks, lines, marks):
        edges, counts = histograms[task]
        assert sum(line.y) == 2 * counts[1:].sum()  # each bin drawn as one step (two points)
        assert min(line.x) == edges[1] and max(line.x) == edges[-1]
        assert list(mark.x) == [thresholds[task]] * 2
        assert f"{int(counts[0]):,}" in line.name  # the zero bin, which a log axis cannot draw


def test_jaccard_heatmap_shows_jaccard_or_lift_beside_chance(regions):
    significance = regions.overlap_significance()
    jaccard = regions.jaccard()
    heat = jaccard_heatmap(significance).data[0]
    z = np.array(heat.z, dtype=float)
    assert list(heat.x) == regions.tasks
    assert np.isnan(np.diag(z)).all()  # no retest: a task against itself is not shown as 1
    off = ~np.eye(len(z), dtype=bool)
    assert np.allclose(z[off], jaccard.to_numpy()[off])
    assert heat.zmin == 0.0 and heat.zmax == pytest.approx(z[off].max())  # fitted to the data
    assert jaccard_heatmap(significance, scale="fixed").data[0].zmax == 1.0
    assert "chance" in heat.hovertemplate and "p = " in heat.hovertemplate
    fields = np.array(heat.customdata, dtype=float)
    first = significance.iloc[0]
    i, j = regions.tasks.index(first.task_a), regions.tasks.index(first.task_b)
    assert list(fields[j, i, :4]) == pytest.approx([first.jaccard, first.expected_jaccard, first.lift, first.p_value])
    lift = jaccard_heatmap(significance, "lift").data[0]
    assert lift.zmid == 1.0 and np.allclose(np.array(lift.z, dtype=float)[off][0], significance.lift.iloc[0])


def test_jaccard_heatmap_diagonal_is_the_retest_overlap(regions):
    retest = pd.DataFrame({"task": regions.tasks, "repeat": 2, "jaccard": [0.3, 0.2, 0.1],
                           "expected": 0.005, "lift": [60.0, 40.0, 20.0]})
    fig = jaccard_heatmap(regions.overlap_significance(), retest=retest)
    assert list(np.diag(np.array(fig.data[0].z, dtype=float))) == [0.3, 0.2, 0.1]
    assert "test–retest" in fig.layout.title.text
    lift = jaccard_heatmap(regions.overlap_significance(), "lift", retest=retest)
    assert list(np.diag(np.array(lift.data[0].z, dtype=float))) == [60.0, 40.0, 20.0]


def test_group_heatmap_shows_one_layer_with_counts_and_chance(regions):
    table = regions.overlap_significance("layer")
    fig = group_jaccard_heatmap(table, "1")
    heat = fig.data[0]
    z = np.array(heat.z, dtype=float)
    assert np.isnan(np.diag(z)).all() and np.allclose(z, z.T, equal_nan=True)
    fields = np.array(heat.customdata, dtype=float)
    index = {t: i for i, t in enumerate(regions.tasks)}
    for row in table[table.group == "1"].itertuples():
        i, j = index[row.task_a], index[row.task_b]
        assert z[i, j] == pytest.approx(row.jaccard)
        assert list(fields[j, i, 1:]) == pytest.approx(
            [row.expected_jaccard, row.lift, row.p_value, row.intersection, row.size_a + row.size_b - row.intersection],
            nan_ok=True)
    other = np.array(group_jaccard_heatmap(table, "0").data[0].z, dtype=float)
    assert not np.allclose(other, z, equal_nan=True)  # another layer, other numbers


def test_pairs_heatmap_is_groups_by_pairs(regions):
    table = regions.overlap_significance("module")
    heat = pairs_heatmap(table, "module").data[0]
    groups = list(dict.fromkeys(table.group))
    assert list(heat.x) == groups and len(heat.y) == 3  # three task pairs
    z = np.array(heat.z, dtype=float)
    first = table[(table.task_a == "math") & (table.task_b == "code")]
    assert np.allclose(z[list(heat.y).index("math × code")], first.set_index("group").loc[groups, "jaccard"])
    assert (heat.zmin, heat.zmax) == (0.0, pytest.approx(np.nanmax(z)))
    assert pairs_heatmap(table, "module", scale="fixed").data[0].zmax == 1.0
    lift = pairs_heatmap(table, "module", "lift", "fixed").data[0]
    assert (lift.zmin, lift.zmid, lift.zmax) == (0.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="value must be one of"):
        pairs_heatmap(table, "module", "overlap")


def _nodes(fig) -> dict[str, tuple[float, float, str]]:
    out = {}
    for trace in fig.data:
        if trace.mode == "markers+text":
            for x, y, name in zip(trace.x, trace.y, trace.text):
                out[name] = (x, y, trace.marker.color)
    return out


def test_graph_edges_follow_tau_and_nodes_stay_put():
    similarity = _similarity()
    positions = node_positions(similarity)
    assert positions == node_positions(similarity)  # seeded: the same layout every time
    values = similarity.to_numpy()
    off = values[np.triu_indices(len(values), 1)]
    previous = None
    for tau in (0.0, float(np.median(off)), float(off.max()) + 0.01):
        fig = similarity_graph_figure(similarity, tau, positions)
        edge_hover = next(t for t in fig.data if t.name == "edges")
        assert len(edge_hover.x) == int((off >= tau).sum())
        nodes = _nodes(fig)
        assert {k: v[:2] for k, v in nodes.items()} == positions  # nodes do not move with τ
        groups = group_tasks(similarity, tau)
        for group in groups:  # one colour per group, different groups different colours
            assert len({nodes[t][2] for t in group}) == 1
        assert len({nodes[g[0]][2] for g in groups}) == len(groups)
        if previous is not None:
            assert len(edge_hover.x) < previous
        previous = len(edge_hover.x)


def test_graph_edge_width_grows_with_similarity():
    similarity = _similarity()
    fig = similarity_graph_figure(similarity, 0.0, node_positions(similarity))
    widths = {}
    for trace in fig.data:
        if trace.mode == "lines":
            for x in trace.x[::3]:
                widths.setdefault(trace.line.width, []).append(x)
    assert min(widths) == EDGE_WIDTH[0] and max(widths) == EDGE_WIDTH[1]
    assert sum(len(v) for v in widths.values()) == 15  # every pair of 6 tasks at τ = 0


def test_stage_plan_lists_stages_and_frozen_cores():
    fig = stage_plan_figure([["b", "c"], ["a"], ["d"]], groups=[["a"], ["b", "c"], ["d"]])
    stage, trains, frozen = fig.data[0].cells.values
    assert list(stage) == ["1", "2", "3"]
    assert list(trains) == ["b, c", "a", "d"]
    assert list(frozen) == ["—", "b, c", "b, c, a"]


def test_dendrogram_marks_every_breakpoint_and_tau():
    similarity = _similarity()
    groupings = groupings_by_tau(similarity)
    fig = dendrogram_figure(dendrogram_data(similarity, "single"), groupings, tau=0.2)
    lines = [s.y0 for s in fig.layout.shapes]
    breakpoints = [g.tau_max for g in groupings if 0 < g.tau_max < 1]
    assert lines == [*breakpoints, 0.2]
    merges = [y for y in fig.data[0].y if y is not None]
    assert set(np.round(breakpoints, 12)) <= set(np.round(merges, 12))  # single linkage merges at the breakpoints
    assert list(fig.layout.xaxis.ticktext) == dendrogram_data(similarity, "single")["ivl"]
    with_chance = dendrogram_figure(dendrogram_data(similarity, "single"), groupings, tau=0.2, chance=0.005)
    assert [s.y0 for s in with_chance.layout.shapes][-1] == 0.005
    assert any("chance ≈ 0.0050" in a.text for a in with_chance.layout.annotations)


def test_transplant_shares_figure_stacks_the_report(regions):
    table = transplant_report(regions, "last", by="layer")
    fig = transplant_shares_figure(table)
    assert fig.layout.barmode == "stack"
    for task in regions.tasks:
        bar = next(t for t in fig.data if t.name == task)
        assert np.allclose(bar.y, 100 * table[f"from:{task}"] / table["numel"])
    contested = next(t for t in fig.data if t.name == "contested")
    assert list(contested.customdata) == table["contested"].tolist()


def test_angle_distribution_per_task(tiny_base, tiny_tasks, regions):
    report = fuse(tiny_base, tiny_tasks, regions, keep_tensors=False).report
    fig = angle_distribution_figure(report)
    assert [b.name for b in fig.data] == regions.tasks
    for box in fig.data:
        assert np.allclose(box.y, report[f"angle:{box.name}"])
        assert list(box.text) == report["tensor"].tolist()
