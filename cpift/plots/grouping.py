"""Figures of the τ grouping: the similarity graph, the stage plan and the dendrogram.

The graph's node positions come from :func:`node_positions`, computed once from the full
similarity, so that nodes stay put while τ moves and only edges and colours change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..grouping import Grouping, group_tasks, similarity_graph
from .style import NEUTRAL, colors

#: Edge widths in pixels: the weakest drawn pair gets the minimum, the most similar pair the maximum.
EDGE_WIDTH = (1.0, 10.0)


def node_positions(similarity: pd.DataFrame, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Fixed 2-D positions of the tasks: a seeded spring layout of the complete similarity graph.

    Springs pull similar tasks together (weight = similarity), so the picture already hints at the
    groups; the seed makes the layout the same on every call.
    """
    graph = similarity_graph(similarity, 0.0)
    positions = nx.spring_layout(graph, weight="weight", seed=seed)
    return {str(task): (float(x), float(y)) for task, (x, y) in positions.items()}


def group_colors(groups: Sequence[Sequence[str]]) -> dict[str, str]:
    """Each task's colour: the colour of its group, groups coloured in order."""
    palette = colors([str(i) for i in range(len(groups))])
    return {task: palette[str(i)] for i, group in enumerate(groups) for task in group}


def similarity_graph_figure(
    similarity: pd.DataFrame,
    tau: float,
    positions: Mapping[str, tuple[float, float]],
    groups: Sequence[Sequence[str]] | None = None,
) -> go.Figure:
    """The threshold graph at τ: edges join pairs with similarity ≥ τ, nodes coloured by group.

    Edge width grows linearly with the pair's similarity (rounded to whole pixels), from
    :data:`EDGE_WIDTH`'s minimum at the weakest pair to its maximum at the strongest (of all
    off-diagonal pairs, so widths do not change with τ). Hovering an edge's midpoint shows its
    similarity.

    Args:
        similarity: task × task matrix (e.g. :meth:`cpift.CoreRegions.jaccard`).
        tau: the link threshold in [0, 1].
        positions: task → (x, y), from :func:`node_positions`.
        groups: the grouping at τ (default: :func:`cpift.group_tasks` of ``similarity`` at τ).
    """
    graph = similarity_graph(similarity, tau)
    groups = group_tasks(similarity, tau) if groups is None else groups
    values = similarity.to_numpy(dtype=float)
    off = values[~np.eye(len(values), dtype=bool)]
    low, high = (float(off.min()), float(off.max())) if off.size else (0.0, 1.0)
    span = high - low or 1.0
    # One trace per pixel width (≤ 10 traces whatever the number of edges): plotly validates every
    # trace, so a trace per edge would cost far more than drawing them.
    lines: dict[int, tuple[list, list]] = {}
    mid_x, mid_y, mid_text = [], [], []
    for a, b, weight in graph.edges(data="weight"):
        (xa, ya), (xb, yb) = positions[str(a)], positions[str(b)]
        width = round(EDGE_WIDTH[0] + (EDGE_WIDTH[1] - EDGE_WIDTH[0]) * (weight - low) / span)
        xs, ys = lines.setdefault(width, ([], []))
        xs += [xa, xb, None]
        ys += [ya, yb, None]
        mid_x.append((xa + xb) / 2)
        mid_y.append((ya + yb) / 2)
        mid_text.append(f"{a} – {b}: {weight:.4f}")
    traces = [go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False, opacity=0.6,
                         line={"width": width, "color": NEUTRAL}, name=f"edges {width}px")
              for width, (xs, ys) in sorted(lines.items())]
    traces.append(go.Scatter(x=mid_x, y=mid_y, mode="markers", marker={"size": 8, "opacity": 0},
                             text=mid_text, hovertemplate="%{text}<extra></extra>", showlegend=False,
                             name="edges"))
    palette = group_colors(groups)
    for i, group in enumerate(groups):
        xy = np.array([positions[str(t)] for t in group])
        traces.append(go.Scatter(
            x=xy[:, 0], y=xy[:, 1], mode="markers+text", text=[str(t) for t in group], textposition="top center",
            marker={"size": 22, "color": palette[group[0]], "line": {"width": 1, "color": "white"}},
            name=f"group {i + 1}: {', '.join(map(str, group))}", hovertemplate="%{text}<extra></extra>",
        ))
    fig = go.Figure(traces)
    fig.update_layout(title=f"Tasks linked at τ = {tau:.3f}: {len(groups)} group{'s' if len(groups) != 1 else ''}, "
                            f"{graph.number_of_edges()} edge{'s' if graph.number_of_edges() != 1 else ''}",
                      legend_title="group", hovermode="closest")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    return fig


def stage_plan_figure(stages: Sequence[Sequence[str]], groups: Sequence[Sequence[str]] | None = None) -> go.Figure:
    """The training stages in order as a table: the tasks of each stage and the cores frozen in it.

    During stage k every core of the tasks trained in stages 1 … k−1 is frozen (CPI-FT stage 4).
    Cells are coloured like the groups of :func:`similarity_graph_figure` (``groups`` in their
    :func:`cpift.group_tasks` order; default: the stages themselves).
    """
    palette = group_colors(groups if groups is not None else stages)
    frozen, done = [], []
    for stage in stages:
        frozen.append(", ".join(done) or "—")
        done.extend(map(str, stage))
    fill = [palette.get(stage[0], NEUTRAL) for stage in stages]
    fig = go.Figure(go.Table(
        columnwidth=[1, 4, 4],
        header={"values": ["stage", "trains", "cores frozen"], "align": "left"},
        cells={"values": [[str(i + 1) for i in range(len(stages))], [", ".join(map(str, s)) for s in stages], frozen],
               "align": "left", "fill_color": [fill, fill, ["white"] * len(stages)],
               "font": {"color": ["white", "white", "black"]}},
    ))
    fig.update_layout(title=f"Stage plan: {len(stages)} stage{'s' if len(stages) != 1 else ''}",
                      height=80 + 30 * (len(stages) + 1), margin={"t": 40, "b": 10, "l": 10, "r": 10})
    return fig


def dendrogram_figure(dendrogram: Mapping[str, list], groupings: Sequence[Grouping], tau: float | None = None,
                      chance: float | None = None) -> go.Figure:
    """The single-linkage dendrogram in similarity units, with the τ values where the grouping changes.

    Cutting it at height τ gives :func:`cpift.group_tasks`'s groups. Merges are drawn at their
    similarity; leaves sit a little above the highest merge (not at similarity 1) so that small
    similarities stay readable. Dotted lines mark every breakpoint of :func:`cpift.groupings_by_tau`
    and a solid line the current τ; a dashed line the chance level, below which a merge is what
    random cores of the same sizes would give.

    Args:
        dendrogram: :func:`cpift.dendrogram_data` of the similarity, ``method="single"``.
        groupings: :func:`cpift.groupings_by_tau` of the same similarity.
        tau: the current τ, if any.
        chance: the expected Jaccard of random cores of the cores' sizes
            (:func:`cpift.overlap.expected_jaccard`), if known.
    """
    merges = [s for line in dendrogram["scoord"] for s in line[1:3]]
    top = min(1.0, 1.25 * max(merges, default=1.0))
    xs, ys, merge_text = [], [], []
    for line_x, line_s in zip(dendrogram["icoord"], dendrogram["scoord"]):
        xs += [*line_x, None]
        ys += [*(top if s >= 1.0 else s for s in line_s), None]  # leaf ends (distance 0) drawn at the top
        merge_text += [f"merge at similarity {line_s[1]:.4f}"] * 4 + [None]
    shapes, notes = [], []
    for grouping in groupings:  # each grouping holds for tau_min < τ ≤ tau_max
        if 0.0 < grouping.tau_max < 1.0:
            n = len(grouping.groups)
            shapes.append(_hline(grouping.tau_max, {"dash": "dot", "color": NEUTRAL, "width": 1}))
            notes.append({"x": 1.0, "xref": "paper", "xanchor": "right", "yanchor": "bottom", "y": grouping.tau_max,
                          "showarrow": False,
                          "font": {"size": 10}, "text": f"{n} group{'s' if n != 1 else ''} for τ in "
                                                        f"({grouping.tau_min:.3f}, {grouping.tau_max:.3f}]"})
    if tau is not None:
        shapes.append(_hline(tau, {"color": "crimson", "width": 2}))
        notes.append({"x": 0.0, "xref": "paper", "xanchor": "left", "yanchor": "bottom", "y": tau, "showarrow": False,
                      "font": {"color": "crimson"}, "text": f"τ = {tau:.3f}"})
    if chance is not None:
        shapes.append(_hline(chance, {"dash": "dash", "color": "grey", "width": 2}))
        notes.append({"x": 0.5, "xref": "paper", "xanchor": "center", "yanchor": "top", "y": chance, "showarrow": False,
                      "font": {"color": "grey"}, "text": f"chance ≈ {chance:.4f}"})
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="lines", line={"color": "#444", "width": 2}, text=merge_text,
                               hovertemplate="%{text}<extra></extra>"), layout={"shapes": shapes, "annotations": notes})
    leaves = [5.0 + 10.0 * i for i in range(len(dendrogram["ivl"]))]
    fig.update_layout(title="Single-linkage dendrogram (cut at τ gives the groups)",
                      yaxis_title="Jaccard similarity (τ)", showlegend=False)
    fig.update_xaxes(tickvals=leaves, ticktext=dendrogram["ivl"], range=[0, 10.0 * len(leaves)])
    fig.update_yaxes(range=[0, max(top, tau or 0.0, chance or 0.0) * 1.05])
    return fig


def _hline(y: float, line: dict) -> dict:
    """A horizontal line across the plot at height ``y`` (a layout shape: cheaper than ``add_hline``)."""
    return {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y, "line": line}


def tau_sweep_figure(sweep: pd.DataFrame) -> go.Figure:
    """Each τ's CPI-FT against τ = 0's (one group): the paired difference in normalised average
    (0–10) with its 95 % interval, from :func:`cpift.findings.tau_sweep`. Points above the dashed
    zero line are groupings that beat training every task in one stage."""
    groups = ["/".join(map(str, sorted(set(g)))) for g in sweep["groups"]]
    fig = go.Figure(go.Scatter(
        x=sweep["tau"], y=sweep["difference"], mode="markers+lines", text=groups,
        error_y={"type": "data", "symmetric": False, "array": list(sweep["high"] - sweep["difference"]),
                 "arrayminus": list(sweep["difference"] - sweep["low"])},
        hovertemplate="τ = %{x:g} (%{text} groups)<br>difference %{y:+.3f}<extra></extra>"))
    fig.add_hline(y=0, line_dash="dash", line_color=NEUTRAL)
    fig.update_layout(title="τ sweep: normalised average − τ = 0's (one group), 95 % paired interval",
                      xaxis_title="τ", yaxis_title="difference (0–10)", showlegend=False)
    return fig
