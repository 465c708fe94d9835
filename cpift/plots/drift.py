"""The importance-drift figure of EPI: how much the protected set changes from one refresh to the next.

The data is a run's ``methods/epi/drift.json`` as :mod:`cpift.methods.epi` writes it (``stages``
and one record per refresh with ``step``, ``jaccard_previous``, ``jaccard_first``, ``joined`` and
``released``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import NEUTRAL, PALETTE, colors


def drift_figure(drift: Mapping[str, Any], title: str = "Importance drift") -> go.Figure:
    """Jaccard of each protected set with the previous one and with the first (top), and the
    elements that joined and left at each refresh (bottom), against the run's optimizer step;
    the stages are shaded and named."""
    refreshes = list(drift.get("refreshes", []))
    steps = [r["step"] for r in refreshes]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.65, 0.35], vertical_spacing=0.08)
    for key, name, colour, dash in (("jaccard_previous", "with the previous set", PALETTE[0], "solid"),
                                    ("jaccard_first", "with the first set", NEUTRAL, "dot")):
        fig.add_scatter(x=steps, y=[r[key] for r in refreshes], mode="lines+markers", name=name,
                        line={"color": colour, "dash": dash}, connectgaps=False,
                        hovertemplate=f"step %{{x}}<br>Jaccard {name}: %{{y:.3f}}<extra></extra>", row=1, col=1)
    fig.add_bar(x=steps, y=[r["joined"] for r in refreshes], name="joined", marker_color=PALETTE[2],
                hovertemplate="step %{x}: %{y} joined<extra></extra>", row=2, col=1)
    fig.add_bar(x=steps, y=[-r["released"] for r in refreshes], name="released", marker_color=PALETTE[1],
                customdata=[r["released"] for r in refreshes],
                hovertemplate="step %{x}: %{customdata} released<extra></extra>", row=2, col=1)
    stages = list(drift.get("stages", []))
    shades = colors([s["name"] for s in stages])
    for stage in stages:
        fig.add_vrect(x0=stage["start"], x1=stage["start"] + stage["steps"], fillcolor=shades[stage["name"]],
                      opacity=0.08, line_width=0, annotation_text=f"{stage['name']}: {', '.join(stage['tasks'])}",
                      annotation_position="top left", row=1, col=1)
    subtitle = (f"top {drift['p']:g}% protected, re-selected every {drift['interval']} step(s), β = {drift['beta']:g}"
                if {"p", "interval", "beta"} <= set(drift) else "")
    fig.update_layout(title={"text": title, "subtitle": {"text": subtitle}}, barmode="relative",
                      legend_title="protected set")
    fig.update_yaxes(title_text="Jaccard", range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="elements", row=2, col=1)
    fig.update_xaxes(title_text="optimizer step in the run", row=2, col=1)
    return fig
