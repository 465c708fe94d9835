"""Figures of core overlap: the task × task Jaccard heatmap, one group's, and groups × task pairs.

Every heatmap is drawn on the fixed colour scale [0, 1] (:data:`~cpift.plots.style.UNIT_COLORSCALE`),
so colours compare across layers, runs and p; hover shows the intersection and union counts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import UNIT_COLORSCALE


def _unit_heatmap(z, x, y, customdata=None, hovertemplate=None, text=None) -> go.Heatmap:
    return go.Heatmap(z=z, x=x, y=y, zmin=0.0, zmax=1.0, colorscale=UNIT_COLORSCALE, customdata=customdata,
                      hovertemplate=hovertemplate, text=text, texttemplate="%{text}" if text is not None else None,
                      colorbar={"title": "Jaccard"})


def jaccard_heatmap(jaccard: pd.DataFrame, title: str = "Jaccard overlap of the cores") -> go.Figure:
    """The task × task Jaccard matrix (:meth:`cpift.CoreRegions.jaccard`), values written in the cells."""
    tasks = [str(t) for t in jaccard.index]
    values = jaccard.to_numpy(dtype=float)
    fig = go.Figure(_unit_heatmap(values, tasks, tasks, text=np.vectorize(lambda v: f"{v:.3f}")(values),
                                  hovertemplate="%{y} × %{x}<br>Jaccard %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title)
    fig.update_yaxes(autorange="reversed")
    return fig


def _tasks(table: pd.DataFrame) -> list[str]:
    """The tasks of a pairs table, in task order (pairs are listed with task_a before task_b)."""
    return list(dict.fromkeys([*table["task_a"], *table["task_b"]]))


def group_jaccard_heatmap(table: pd.DataFrame, group: str, by: str = "layer") -> go.Figure:
    """The task × task Jaccard inside one group (a layer, a module or a tensor).

    Args:
        table: :meth:`cpift.CoreRegions.layer_jaccard` (``group, task_a, task_b, jaccard,
            intersection, union``).
        group: the group to show (the diagonal is left blank).
        by: what the groups are, for the title.
    """
    tasks = _tasks(table)
    index = {t: i for i, t in enumerate(tasks)}
    z = np.full((len(tasks), len(tasks)), np.nan)
    counts = np.zeros((len(tasks), len(tasks), 2), dtype=np.int64)
    rows = table[table["group"].astype(str) == str(group)]
    a = rows["task_a"].map(index).to_numpy()
    b = rows["task_b"].map(index).to_numpy()
    for i, j in ((a, b), (b, a)):
        z[i, j] = rows["jaccard"].to_numpy()
        counts[i, j, 0] = rows["intersection"].to_numpy()
        counts[i, j, 1] = rows["union"].to_numpy()
    text = np.where(np.isnan(z), "", np.vectorize(lambda v: f"{v:.3f}")(np.nan_to_num(z)))
    fig = go.Figure(_unit_heatmap(
        z, tasks, tasks, customdata=counts, text=text,
        hovertemplate="%{y} × %{x}<br>Jaccard %{z:.4f}<br>∩ %{customdata[0]:,} / ∪ %{customdata[1]:,}<extra></extra>",
    ))
    fig.update_layout(title=f"Jaccard overlap in {by} {group}")
    fig.update_yaxes(autorange="reversed")
    return fig


def pairs_heatmap(table: pd.DataFrame, by: str = "layer") -> go.Figure:
    """Groups (x, in display order) × task pairs (y): every pair's Jaccard in every group."""
    table = table.assign(pair=table["task_a"].astype(str) + " × " + table["task_b"].astype(str),
                         group=table["group"].astype(str))
    groups = list(dict.fromkeys(table["group"]))
    pairs = list(dict.fromkeys(table["pair"]))
    wide = table.pivot(index="pair", columns="group")
    z = wide["jaccard"].loc[pairs, groups].to_numpy(dtype=float)
    counts = np.stack([wide["intersection"].loc[pairs, groups].to_numpy(),
                       wide["union"].loc[pairs, groups].to_numpy()], axis=-1).astype(np.int64)
    fig = go.Figure(_unit_heatmap(
        z, groups, pairs, customdata=counts,
        hovertemplate=f"%{{y}}<br>{by} %{{x}}<br>Jaccard %{{z:.4f}}"
                      "<br>∩ %{customdata[0]:,} / ∪ %{customdata[1]:,}<extra></extra>",
    ))
    fig.update_layout(title=f"Jaccard overlap per {by} and task pair", xaxis_title=by)
    fig.update_xaxes(type="category")
    fig.update_yaxes(autorange="reversed")
    return fig
