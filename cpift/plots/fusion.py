"""Figures of the fusion: where the transplanted core elements come from, and base ↔ task angles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import NEUTRAL, colors


def _tasks(report: pd.DataFrame, prefix: str) -> list[str]:
    return [c.removeprefix(prefix) for c in report.columns if c.startswith(prefix)]


def transplant_shares_figure(table: pd.DataFrame, by: str = "layer") -> go.Figure:
    """Stacked bars: per group, the % of its elements transplanted from each task, and contested ones.

    Args:
        table: :func:`cpift.fusion.transplant_report` (``group, numel, contested, from:TASK…``), or a
            fusion report aggregated the same way.
        by: what the groups are, for the axis title.
    """
    tasks = _tasks(table, "from:")
    palette = colors(tasks)
    groups = table["group"].astype(str)
    numel = table["numel"].to_numpy(dtype=float)
    fig = go.Figure()
    for task in tasks:
        count = table[f"from:{task}"].to_numpy()
        fig.add_bar(x=groups, y=100 * count / numel, name=task, marker_color=palette[task], customdata=count,
                    hovertemplate=f"{by} %{{x}}<br>from {task}: %{{customdata:,}} elements (%{{y:.3g}} %)"
                                  "<extra></extra>")
    contested = table["contested"].to_numpy()
    fig.add_scatter(x=groups, y=100 * contested / numel, name="contested", mode="lines+markers",
                    line={"color": NEUTRAL, "dash": "dot"}, customdata=contested,
                    hovertemplate=f"{by} %{{x}}<br>contested: %{{customdata:,}} elements (%{{y:.3g}} %)"
                                  "<extra></extra>")
    total = int(contested.sum())
    fig.update_layout(barmode="stack", title=f"Transplanted core elements per {by} ({total:,} contested in all)",
                      xaxis_title=by, yaxis_title=f"% of the {by}'s elements", legend_title="source")
    fig.update_xaxes(type="category")
    return fig


def angle_distribution_figure(report: pd.DataFrame) -> go.Figure:
    """Per task, the distribution over tensors of the angle between the base and the task tensor.

    Args:
        report: a fusion report (``fuse(...).report`` or a run's ``fusion_report.csv``): one row per
            tensor with ``tensor`` and ``angle:TASK`` in degrees. The angles do not depend on ω.
    """
    tasks = _tasks(report, "angle:")
    palette = colors(tasks)
    fig = go.Figure()
    for task in tasks:
        angles = report[f"angle:{task}"].to_numpy(dtype=float)
        fig.add_box(y=angles, name=task, marker_color=palette[task], boxpoints="all", jitter=0.4, pointpos=0,
                    text=report["tensor"], hovertemplate="%{text}<br>%{y:.3f}°<extra>" + task + "</extra>")
    medians = {t: float(np.median(report[f"angle:{t}"])) for t in tasks}
    fig.update_layout(title="Angle between base and task tensors, per tensor (median "
                            + ", ".join(f"{t} {m:.2f}°" for t, m in medians.items()) + ")",
                      yaxis_title="angle (degrees)", showlegend=False)
    return fig
