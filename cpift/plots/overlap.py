"""Figures of core overlap beside chance: the task × task heatmap, one group's, and groups × task pairs.

Every builder reads a table of :meth:`cpift.CoreRegions.overlap_significance` (whole model for
:func:`jaccard_heatmap`, ``by="layer"`` or ``"module"`` for the others) and shows either the
Jaccard or its lift over chance (observed / the expected Jaccard of random cores of the same
sizes). Hover gives, for every cell, the Jaccard, the chance level, the lift, the hypergeometric
p-value and the intersection and union counts.

Colour scales (``scale``): ``"data"`` fits the scale to the values shown, so that structure at a
Jaccard of 0.01 is visible; ``"fixed"`` keeps Jaccard on [0, 1] and lift on [0, 2], so that
colours compare across layers, runs and p. Lift is drawn on a diverging scale centred on 1
(chance): red above, blue below.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .style import UNIT_COLORSCALE

VALUES = ("jaccard", "lift")
"""What a heatmap shows: the Jaccard or the lift over chance."""
SCALES = ("data", "fixed")
"""Colour scales: fitted to the values shown, or fixed (Jaccard [0, 1], lift [0, 2])."""

_LIFT_COLORSCALE = "RdBu_r"
_HOVER = ("Jaccard %{customdata[0]:.4f} (chance %{customdata[1]:.4f})<br>lift %{customdata[2]:.2f}, "
          "p = %{customdata[3]:.2g}<br>∩ %{customdata[4]:,.0f} / ∪ %{customdata[5]:,.0f}")
_FIELDS = ("jaccard", "expected_jaccard", "lift", "p_value", "intersection", "union")


def _check(value: str, scale: str) -> None:
    if value not in VALUES or scale not in SCALES:
        raise ValueError(f"value must be one of {VALUES} and scale one of {SCALES}, got {value!r}, {scale!r}")


def _with_union(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(union=table["size_a"] + table["size_b"] - table["intersection"])


def _heatmap(z: np.ndarray, x: list[str], y: list[str], customdata: np.ndarray, value: str, scale: str,
             hover_head: str, text: np.ndarray | None = None) -> go.Heatmap:
    """A heatmap of ``z`` (Jaccard or lift) with the colour scale ``scale`` and the shared hover."""
    finite = z[np.isfinite(z)]
    top = float(finite.max()) if finite.size else 0.0
    if value == "jaccard":
        bounds = {"zmin": 0.0, "zmax": 1.0 if scale == "fixed" else max(top, 1e-6), "colorscale": UNIT_COLORSCALE}
    else:
        bounds = {"zmin": 0.0, "zmax": 2.0 if scale == "fixed" else max(top, 2.0), "zmid": 1.0,
                  "colorscale": _LIFT_COLORSCALE}
    return go.Heatmap(z=z, x=x, y=y, customdata=customdata, text=text,
                      texttemplate="%{text}" if text is not None else None,
                      hovertemplate=f"{hover_head}<br>{_HOVER}<extra></extra>",
                      colorbar={"title": "Jaccard" if value == "jaccard" else "lift over chance"}, **bounds)


def _tasks(table: pd.DataFrame) -> list[str]:
    """The tasks of a pairs table, in task order (pairs are listed with task_a before task_b)."""
    return list(dict.fromkeys([*table["task_a"], *table["task_b"]]))


def _square(rows: pd.DataFrame, tasks: list[str], value: str) -> tuple[np.ndarray, np.ndarray]:
    """The task × task matrix of ``value`` (diagonal NaN) and the hover fields per cell."""
    index = {t: i for i, t in enumerate(tasks)}
    z = np.full((len(tasks), len(tasks)), np.nan)
    fields = np.full((len(tasks), len(tasks), len(_FIELDS)), np.nan)
    a = rows["task_a"].map(index).to_numpy()
    b = rows["task_b"].map(index).to_numpy()
    for i, j in ((a, b), (b, a)):
        z[i, j] = rows[value].to_numpy(dtype=float)
        fields[i, j] = rows[list(_FIELDS)].to_numpy(dtype=float)
    return z, fields


def _cell_text(z: np.ndarray, value: str) -> np.ndarray:
    form = "{:.3f}" if value == "jaccard" else "{:.2f}×"
    return np.where(np.isnan(z), "", np.vectorize(lambda v: form.format(v))(np.nan_to_num(z)))


def jaccard_heatmap(significance: pd.DataFrame, value: str = "jaccard", scale: str = "data",
                    retest: pd.DataFrame | None = None, p: float | None = None) -> go.Figure:
    """The task × task overlap of the cores over the whole model, values written in the cells.

    Args:
        significance: :meth:`cpift.CoreRegions.overlap_significance` with ``by=None``.
        value: ``"jaccard"`` or ``"lift"`` (observed / chance).
        scale: ``"data"`` or ``"fixed"`` (module docstring).
        retest: the run's test–retest table (:func:`cpift.explore.run_reliability`: task, the
            repeat or seed, jaccard, expected, lift): the diagonal then shows each task's overlap
            with its own first retest, the ceiling a cross-task overlap can be read against.
            Without it the diagonal is blank (a task's overlap with itself is 1 by definition).
        p: the cores' size (percent of the parameters), for the title.
    """
    _check(value, scale)
    table = _with_union(significance)
    tasks = _tasks(table)
    z, fields = _square(table, tasks, value)
    if retest is not None and len(retest):
        first = retest.drop_duplicates("task").set_index("task")
        for i, task in enumerate(tasks):
            if task in first.index:
                row = first.loc[task]
                z[i, i] = float(row[value if value == "jaccard" else "lift"])
                fields[i, i, :3] = row["jaccard"], row["expected"], row["lift"]
    fig = go.Figure(_heatmap(z, tasks, tasks, fields, value, scale, "%{y} × %{x}", text=_cell_text(z, value)))
    what = "Jaccard overlap" if value == "jaccard" else "Lift of the overlap over chance"
    fig.update_layout(title=f"{what} of the cores" + (f" at p = {p:g} %" if p is not None else "")
                      + (" (diagonal: test–retest)" if retest is not None and len(retest) else ""))
    fig.update_yaxes(autorange="reversed")
    return fig


def group_jaccard_heatmap(significance: pd.DataFrame, group: str, by: str = "layer", value: str = "jaccard",
                          scale: str = "data") -> go.Figure:
    """The task × task overlap inside one group (a layer, a module or a tensor), beside the chance
    level of that group's core sizes.

    Args:
        significance: :meth:`cpift.CoreRegions.overlap_significance` with ``by``.
        group: the group to show (the diagonal is left blank).
        by: what the groups are, for the title.
        value, scale: as in :func:`jaccard_heatmap`.
    """
    _check(value, scale)
    table = _with_union(significance)
    tasks = _tasks(table)
    z, fields = _square(table[table["group"].astype(str) == str(group)], tasks, value)
    fig = go.Figure(_heatmap(z, tasks, tasks, fields, value, scale, "%{y} × %{x}", text=_cell_text(z, value)))
    fig.update_layout(title=f"{'Jaccard overlap' if value == 'jaccard' else 'Lift over chance'} in {by} {group}")
    fig.update_yaxes(autorange="reversed")
    return fig


def pairs_heatmap(significance: pd.DataFrame, by: str = "layer", value: str = "jaccard",
                  scale: str = "data") -> go.Figure:
    """Groups (x, in display order) × task pairs (y): every pair's overlap in every group.

    Args: as :func:`group_jaccard_heatmap`, without ``group``.
    """
    _check(value, scale)
    table = _with_union(significance).assign(
        pair=significance["task_a"].astype(str) + " × " + significance["task_b"].astype(str),
        group=significance["group"].astype(str))
    groups = list(dict.fromkeys(table["group"]))
    pairs = list(dict.fromkeys(table["pair"]))
    wide = table.pivot(index="pair", columns="group")
    z = wide[value].loc[pairs, groups].to_numpy(dtype=float)
    fields = np.stack([wide[f].loc[pairs, groups].to_numpy(dtype=float) for f in _FIELDS], axis=-1)
    fig = go.Figure(_heatmap(z, groups, pairs, fields, value, scale, f"%{{y}}<br>{by} %{{x}}"))
    what = "Jaccard overlap" if value == "jaccard" else "Lift of the overlap over chance"
    fig.update_layout(title=f"{what} per {by} and task pair", xaxis_title=by)
    fig.update_xaxes(type="category")
    fig.update_yaxes(autorange="reversed")
    return fig

