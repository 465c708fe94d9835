"""Figures of training progress: the loss curve of every stage and the learning rate.

The data is a run's optimizer steps as :func:`cpift.explore.run_progress` gives them
(``Progress.losses``: one row per step with ``stage``, ``step``, ``loss``, ``lr`` and ``n``, the
step's position in the whole run), so the same figure serves a run in progress and a finished one.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import colors


def loss_figure(losses: pd.DataFrame, title: str = "Training loss") -> go.Figure:
    """Loss (top) and learning rate (bottom) against the run's optimizer step, one colour per stage
    (a probe, a method, one stage of a method); hover names the stage and its own step."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06)
    stages = list(dict.fromkeys(losses["stage"]))
    palette = colors(stages)
    for stage, rows in losses.groupby("stage", sort=False):
        custom = rows[["step", "steps"]].to_numpy()
        for row, column, label in ((1, "loss", "loss %{y:.4f}"), (2, "lr", "lr %{y:.3g}")):
            fig.add_scatter(x=rows["n"], y=rows[column], mode="lines+markers", name=str(stage), legendgroup=str(stage),
                            showlegend=row == 1, line={"color": palette[stage]}, customdata=custom,
                            hovertemplate=f"{stage}, step %{{customdata[0]}} of %{{customdata[1]}}<br>{label}"
                                          "<extra></extra>", row=row, col=1)
    fig.update_layout(title=title, legend_title="stage")
    fig.update_yaxes(title_text="loss", row=1, col=1)
    fig.update_yaxes(title_text="learning rate", row=2, col=1)
    fig.update_xaxes(title_text="optimizer step in the run", row=2, col=1)
    return fig
