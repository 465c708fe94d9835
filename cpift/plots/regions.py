"""Figures of core regions: each task's core size per layer, and the |Δθ| distribution with its threshold."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import colors


def core_sizes_figure(sizes: pd.DataFrame, by: str = "layer") -> go.Figure:
    """Grouped bars: each task's core elements per group, as a share of the group's elements.

    Args:
        sizes: :meth:`cpift.CoreRegions.sizes` (columns ``group, task, size, numel, share``).
        by: what the groups are (``"layer"``, ``"module"`` or ``"tensor"``), for the axis title.
    """
    palette = colors(list(dict.fromkeys(sizes["task"])))
    fig = go.Figure()
    for task, rows in sizes.groupby("task", sort=False):
        fig.add_bar(
            x=rows["group"].astype(str), y=100 * rows["share"], name=str(task), marker_color=palette[task],
            customdata=np.stack([rows["size"], rows["numel"]], axis=1),
            hovertemplate=f"{task}<br>{by} %{{x}}<br>%{{customdata[0]:,}} of %{{customdata[1]:,}} elements"
                          "<br>%{y:.3g} %<extra></extra>",
        )
    fig.update_layout(barmode="group", title=f"Core size per {by}", xaxis_title=by,
                      yaxis_title=f"core elements, % of the {by}", legend_title="task")
    fig.update_xaxes(type="category")
    return fig


def magnitude_histogram_figure(
    histograms: Mapping[str, tuple[np.ndarray, np.ndarray]], thresholds: Mapping[str, float], p: float | None = None
) -> go.Figure:
    """The distribution of |Δθ| per task on a log x axis, each task's core threshold marked.

    Args:
        histograms: task → ``(edges, counts)`` from :meth:`cpift.CoreRegions.histogram`: ``counts[0]``
            counts the elements below ``edges[1]`` (unchanged ones, |Δ| = 0, which a log axis cannot
            show: they are given in the legend), bin ``i ≥ 1`` spans ``[edges[i], edges[i+1])``.
        thresholds: task → the core's threshold (its smallest |Δ|), drawn as a dashed line.
        p: the core size the thresholds belong to, for the title.
    """
    palette = colors(list(histograms))
    fig = go.Figure()
    for task, (edges, counts) in histograms.items():
        edges, counts = np.asarray(edges, dtype=float), np.asarray(counts)
        # A step line through the bins: each bin's count held from its lower edge to its upper one.
        x = np.repeat(edges[1:], 2)[1:-1]
        y = np.repeat(counts[1:], 2)
        fig.add_scatter(x=x, y=y, mode="lines", name=f"{task} ({int(counts[0]):,} below {edges[1]:.2g})",
                        line={"color": palette[task], "width": 1.5}, legendgroup=task,
                        hovertemplate=f"{task}<br>|Δ| %{{x:.3g}}<br>%{{y:,}} elements<extra></extra>")
        if task in thresholds:
            threshold = float(thresholds[task])
            fig.add_scatter(x=[threshold, threshold], y=[0, int(counts[1:].max(initial=0))], mode="lines",
                            name=f"{task} threshold {threshold:.3g}", legendgroup=task, showlegend=False,
                            line={"color": palette[task], "dash": "dash", "width": 2},
                            hovertemplate=f"{task} core threshold<br>|Δ| ≥ {threshold:.4g}<extra></extra>")
    title = "Distribution of |Δθ| (dashed: core threshold" + (f" at p = {p:g} %)" if p is not None else ")")
    fig.update_layout(title=title, xaxis_title="|θ_task − θ_base|", yaxis_title="elements per bin",
                      legend_title="task (unchanged elements)")
    fig.update_xaxes(type="log")
    return fig


def stability_figure(curves: Mapping[str, Mapping[str, list]], chance: float | None = None) -> go.Figure:
    """Per task, the Jaccard of the probe's core at each snapshot step with its final core (a run's
    ``stability.json``, :func:`cpift.probes.stability`): a curve still rising at the end means a
    longer probe would have given another core. ``chance``: the Jaccard of random cores, dashed."""
    palette = colors(list(curves))
    fig = go.Figure()
    for task, curve in curves.items():
        fig.add_scatter(x=curve["step"], y=curve["jaccard_to_final"], mode="lines+markers", name=task,
                        line={"color": palette[task]},
                        hovertemplate=f"{task}<br>step %{{x}}: Jaccard with the final core %{{y:.3f}}<extra></extra>")
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dash", line_color="grey", annotation_text="chance")
    fig.update_layout(title="Core stability over the probe", xaxis_title="probe step",
                      yaxis_title="Jaccard with the final core", yaxis_range=[0, 1.02], legend_title="task")
    return fig
