"""Figures comparing methods: per-task scores, the seesaw, retention, forgetting, the A→B study.

Every builder takes a run's ``metrics.json`` (:func:`cpift.scores.summarize`: ``scores``,
``normalised_average``, ``seesaw``, ``retention`` and, when present, ``forgetting``), or several
runs merged by :func:`merge_metrics` (models then read ``run/model``). The models drawn are
whatever the metrics hold — every method a run trained, in the run's order — never a fixed list.

- :func:`scores_figure`: models × tasks scores as grouped bars (one colour per model).
- :func:`seesaw_figure`: each model's change per task against the base, a diverging heatmap.
- :func:`retention_figure`: retention accuracies per model (perplexity is not an accuracy and is
  left out), the mean forget ratio beside them when the metrics have it.
- :func:`pareto_figure`: in-distribution score against out-of-distribution retention, one point
  per model, the Pareto front joined (the GaLLoP paper's trade-off view).
- :func:`sequential_table` / :func:`sequential_figure`: the forgetting study (task A, then B):
  ΔA (score on A after B − after A, forgetting) and ΔB (score on B − the base's, learning).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..errors import FormatError, ParameterError
from ..scores import AFTER_A, RETENTION_LOSSES, SEQUENTIAL_PREFIX, WIDE_INTERVAL
from .style import colors

BASE = "base"


def merge_metrics(runs: Mapping[str, Mapping]) -> dict:
    """Several runs' metrics as one: with more than one run, every model becomes ``run/model``
    (as :func:`cpift.scores.compare` names its rows) and the seesaw stays against each run's own
    base. One run's metrics come back unchanged.

    Raises:
        FormatError: a run's metrics lack the ``scores`` table.
    """
    for name, metrics in runs.items():
        if not isinstance(metrics, Mapping) or not isinstance(metrics.get("scores"), Mapping):
            raise FormatError(f"run {name!r}: its metrics hold no 'scores' table")
    if len(runs) == 1:
        return dict(next(iter(runs.values())))
    merged: dict = {}
    for name, metrics in runs.items():
        for view, table in metrics.items():
            if view in _NESTED:  # views of views: model keys one level down
                for sub, inner in table.items():
                    if isinstance(inner, Mapping) and sub != "items":
                        merged.setdefault(view, {}).setdefault(sub, {}).update(
                            {f"{name}/{model}": value for model, value in inner.items()})
            elif isinstance(table, Mapping) and view != "sequential":
                merged.setdefault(view, {}).update({f"{name}/{model}": value for model, value in table.items()})
    return merged


def scores_table(metrics: Mapping) -> pd.DataFrame:
    """Models × tasks scores (rows in the metrics' order), plus the ``normalised_average`` column."""
    table = pd.DataFrame.from_dict(metrics["scores"], orient="index")
    table.index.name = "model"
    table["normalised_average"] = pd.Series(metrics.get("normalised_average", {}), dtype=float)
    return table


_NESTED = ("intervals", "n")
"""Views whose first level names other views (``intervals``) or counts (``n``), not models."""
TOO_FEW = "too few items to rank: some intervals are wider than ±10 points"


def _tasks(metrics: Mapping) -> list[str]:
    return list(dict.fromkeys(task for row in metrics["scores"].values() for task in row))


def _bounds(metrics: Mapping, view: str, model: str, keys: list | None = None) -> list[tuple[float, float]]:
    """The ``[low, high]`` intervals of ``view`` for ``model`` (per key, or the model's own), NaN
    where the metrics hold none (a run without per-item results)."""
    table = metrics.get("intervals", {}).get(view, {}).get(model)
    if keys is None:
        return [tuple(table) if table else (np.nan, np.nan)]
    table = table or {}
    return [tuple(table[k]) if k in table else (np.nan, np.nan) for k in keys]


def _error_y(values: list, bounds: list[tuple[float, float]]) -> dict:
    """Plotly error bars from the values and their intervals (none where unknown)."""
    value = np.array([np.nan if v is None else v for v in values], dtype=float)
    low, high = np.array(bounds, dtype=float).reshape(-1, 2).T
    return {"type": "data", "symmetric": False, "array": list(np.nan_to_num(high - value)),
            "arrayminus": list(np.nan_to_num(value - low)), "visible": bool(np.isfinite(low).any())}


def _too_few(fig: go.Figure, bounds: list[tuple[float, float]], scale: float = 1.0) -> None:
    """Note on the figure when any interval is wider than ±10 points (×``scale``)."""
    widths = [(h - lo) / 2 for lo, h in bounds if np.isfinite(lo)]
    if widths and max(widths) > WIDE_INTERVAL * scale:
        fig.add_annotation(text=TOO_FEW, xref="paper", yref="paper", x=0, y=1.08, showarrow=False,
                           font={"color": "#b35900"})


def scores_figure(metrics: Mapping) -> go.Figure:
    """Grouped bars: each model's score on each task (every task metric lies in [0, 1])."""
    tasks, models = _tasks(metrics), list(metrics["scores"])
    palette = colors(models)
    counts, seeds = metrics.get("n", {}).get("items", {}), metrics.get("n", {}).get("seeds", {})
    fig, every = go.Figure(), []
    for model in models:
        row = metrics["scores"][model]
        values, bounds = [row.get(t) for t in tasks], _bounds(metrics, "scores", model, tasks)
        every += bounds
        custom = [[lo, hi, counts.get(t, "?"), seeds.get(model, "?")] for t, (lo, hi) in zip(tasks, bounds)]
        fig.add_bar(x=tasks, y=values, name=model, marker_color=palette[model], error_y=_error_y(values, bounds),
                    customdata=custom, hovertemplate=f"{model}<br>%{{x}}: %{{y:.3f}} [%{{customdata[0]:.3f}}, "
                    "%{customdata[1]:.3f}]<br>n = %{customdata[2]} items × %{customdata[3]} seeds<extra></extra>")
    fig.update_layout(barmode="group", title="Scores per task (95 % intervals)", xaxis_title="task",
                      yaxis_title="score", legend_title="model", yaxis_range=[0, 1])
    _too_few(fig, every)
    return fig


def seesaw_figure(metrics: Mapping) -> go.Figure:
    """Models × tasks heatmap of score − the base's score, on a colour scale symmetric about 0.

    Raises:
        ParameterError: the metrics have no seesaw view (no ``base`` model was scored).
    """
    seesaw = metrics.get("seesaw")
    if not seesaw:
        raise ParameterError("these metrics have no seesaw view: the base model was not scored")
    tasks = _tasks(metrics)
    models = [m for m in seesaw if m.rsplit("/", 1)[-1] != BASE]
    z = np.array([[seesaw[m].get(t, np.nan) for t in tasks] for m in models], dtype=float).reshape(len(models),
                                                                                                    len(tasks))
    reach = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 0.0
    reach = reach or 1.0
    bounds = np.array([_bounds(metrics, "seesaw", m, tasks) for m in models], dtype=float).reshape(len(models),
                                                                                                   len(tasks), 2)
    p_values = metrics.get("seesaw_p", {})
    p = np.array([[p_values.get(m, {}).get(t, np.nan) for t in tasks] for m in models], dtype=float)
    clear = (bounds[..., 0] > 0) | (bounds[..., 1] < 0)  # the interval excludes 0
    text = np.where(np.isnan(z), "", np.vectorize(lambda v: f"{v:+.3f}")(np.nan_to_num(z)))
    text = np.where(clear, np.char.add(text.astype(str), " *"), text)
    custom = np.dstack([bounds, p[..., None]])
    fig = go.Figure(go.Heatmap(z=z, x=tasks, y=models, zmid=0.0, zmin=-reach, zmax=reach, colorscale="RdBu",
                               text=text, texttemplate="%{text}", colorbar={"title": "Δ score"}, customdata=custom,
                               hovertemplate="%{y} on %{x}: %{z:+.4f} against the base<br>95 % interval "
                                             "[%{customdata[0]:+.3f}, %{customdata[1]:+.3f}], p = %{customdata[2]:.3g}"
                                             "<extra></extra>"))
    fig.update_layout(title="Seesaw: change per task against the base model (* the interval excludes 0)",
                      xaxis_title="task")
    fig.update_yaxes(autorange="reversed", type="category")
    return fig


def _retention_accuracies(metrics: Mapping) -> pd.DataFrame:
    """Models × retention accuracies (the retention measures that are not losses)."""
    table = pd.DataFrame.from_dict(metrics.get("retention", {}), orient="index")
    return table.drop(columns=[c for c in RETENTION_LOSSES if c in table.columns])


def retention_figure(metrics: Mapping) -> go.Figure:
    """Grouped bars of each model's retention accuracies (held-out text, zero-shot questions…),
    with each model's mean forget ratio against the base as a marker when the metrics have it.

    Raises:
        ParameterError: the metrics have no retention scores (``eval.retention`` was off).
    """
    table = _retention_accuracies(metrics)
    if table.empty:
        raise ParameterError("these metrics have no retention scores (eval.retention was off)")
    palette = colors(list(table.columns))
    fig = go.Figure()
    for measure in table.columns:
        bounds = [_bounds(metrics, "retention", m, [measure])[0] for m in table.index]
        fig.add_bar(x=list(table.index), y=table[measure], name=measure, marker_color=palette[measure],
                    error_y=_error_y(list(table[measure]), bounds),
                    hovertemplate=f"%{{x}}<br>{measure}: %{{y:.4f}}<extra></extra>")
    forgetting = metrics.get("forgetting") or {}
    if forgetting:
        models = [m for m in table.index if m in forgetting]
        fig.add_scatter(x=models, y=[forgetting[m]["mean_forget_ratio"] for m in models], mode="markers",
                        name="mean forget ratio", marker={"symbol": "x", "size": 11, "color": "black"},
                        customdata=[forgetting[m]["collapse_rate"] for m in models],
                        hovertemplate="%{x}<br>mean forget ratio %{y:.4f}<br>collapse rate %{customdata:.2f}"
                                      "<extra></extra>")
    fig.update_layout(barmode="group", title="Retention (never trained on)", xaxis_title="model",
                      yaxis_title="accuracy / forget ratio", yaxis_range=[0, 1], legend_title="measure")
    fig.update_xaxes(type="category")
    return fig


def pareto_table(metrics: Mapping) -> pd.DataFrame:
    """Per model: ``in_distribution`` (mean score over the trained tasks), ``out_of_distribution``
    (mean retention accuracy), ``mean_forget_ratio``, ``collapse_rate`` (NaN where absent) and
    ``pareto`` (no other model is at least as good on both axes and better on one)."""
    scores = pd.DataFrame.from_dict(metrics["scores"], orient="index")
    table = pd.DataFrame({"in_distribution": scores.mean(axis=1),
                          "out_of_distribution": _retention_accuracies(metrics).mean(axis=1)})
    forgetting = metrics.get("forgetting") or {}
    for column in ("mean_forget_ratio", "collapse_rate"):
        table[column] = pd.Series({m: v[column] for m, v in forgetting.items()}, dtype=float)
    points = table[["in_distribution", "out_of_distribution"]].to_numpy(dtype=float)
    ge = (points[None, :, :] >= points[:, None, :]).all(axis=2)
    gt = (points[None, :, :] > points[:, None, :]).any(axis=2)
    table["pareto"] = ~(ge & gt).any(axis=1) & np.isfinite(points).all(axis=1)
    table.index.name = "model"
    return table


def pareto_figure(metrics: Mapping) -> go.Figure:
    """Scatter of in-distribution score (x) against out-of-distribution retention accuracy (y),
    one point per model, the Pareto front joined by a line; hover adds the forgetting metrics.

    Raises:
        ParameterError: the metrics have no retention scores.
    """
    table = pareto_table(metrics).dropna(subset=["in_distribution", "out_of_distribution"])
    if table.empty:
        raise ParameterError("these metrics have no retention scores to set against the task scores")
    palette = colors(list(metrics["scores"]))
    fig = go.Figure()
    front = table[table["pareto"]].sort_values("in_distribution")
    fig.add_scatter(x=front["in_distribution"], y=front["out_of_distribution"], mode="lines", name="Pareto front",
                    line={"dash": "dot", "color": "grey"}, hoverinfo="skip")
    for model, row in table.iterrows():
        x_bounds = [tuple(v / 10 for v in _bounds(metrics, "normalised_average", model)[0])]
        y_bounds = _bounds(metrics, "retention_mean", model)
        fig.add_scatter(x=[row["in_distribution"]], y=[row["out_of_distribution"]], mode="markers+text",
                        error_x=_error_y([row["in_distribution"]], x_bounds),
                        error_y=_error_y([row["out_of_distribution"]], y_bounds),
                        name=model, text=[model], textposition="top center",
                        marker={"size": 12, "color": palette[model], "symbol": "star" if row["pareto"] else "circle"},
                        customdata=[[row["mean_forget_ratio"], row["collapse_rate"]]],
                        hovertemplate=f"{model}<br>ID %{{x:.4f}}, OOD %{{y:.4f}}<br>mean forget ratio "
                                      "%{customdata[0]:.4f}<br>collapse rate %{customdata[1]:.2f}<extra></extra>")
    fig.update_layout(title="In-distribution score against out-of-distribution retention",
                      xaxis_title="in-distribution: mean task score", yaxis_title="out-of-distribution: "
                      "mean retention accuracy", showlegend=False)
    return fig


def sequential_table(metrics: Mapping, first: str, second: str) -> pd.DataFrame:
    """The A→B forgetting study from a run's scores: one row per variant trained on B after A.

    Columns: ``A_after_A``, ``A_after_B`` and ``delta_A`` (forgetting of A: after B − after A),
    ``B_base``, ``B_after_B`` and ``delta_B`` (learning of B: after B − the base), and where the
    metrics have the paired study (per-item results) ``delta_A_low``/``_high``/``_p_value`` and the
    same for ``delta_B``. Models are found
    by their labels (:data:`AFTER_A`, :data:`SEQUENTIAL_PREFIX` + variant; ``run/``-prefixed in
    merged metrics, with a ``run`` column then). Empty when the run has no sequential study.
    """
    scores = metrics["scores"]
    rows = []
    for label, row in scores.items():
        run, _, model = label.rpartition("/")
        if not model.startswith(SEQUENTIAL_PREFIX) or model == AFTER_A:
            continue
        prefix = f"{run}/" if run else ""
        after_a, base = scores.get(prefix + AFTER_A, {}), scores.get(prefix + BASE, {})
        rows.append({"run": run, "variant": model[len(SEQUENTIAL_PREFIX):], "A_after_A": after_a.get(first),
                     "A_after_B": row.get(first), "B_base": base.get(second), "B_after_B": row.get(second)})
    table = pd.DataFrame(rows, columns=["run", "variant", "A_after_A", "A_after_B", "B_base", "B_after_B"], dtype=object)
    for column in ("A_after_A", "A_after_B", "B_base", "B_after_B"):
        table[column] = pd.to_numeric(table[column])
    table["delta_A"] = table["A_after_B"] - table["A_after_A"]
    table["delta_B"] = table["B_after_B"] - table["B_base"]
    paired = (metrics.get("sequential") or {}).get("variants", {})
    if paired:  # intervals and p-values of the paired differences (runs with per-item results)
        for delta in ("delta_A", "delta_B"):
            for part in ("low", "high", "p_value"):
                table[f"{delta}_{part}"] = [(paired.get(v, {}).get(delta) or {}).get(part, np.nan)
                                            for v in table["variant"]]
    if not table["run"].astype(bool).any():
        table = table.drop(columns="run")
    return table


def sequential_figure(table: pd.DataFrame, first: str, second: str) -> go.Figure:
    """Bars of ΔA (forgetting of ``first``) and ΔB (learning of ``second``) per variant, from
    :func:`sequential_table`: the best variant keeps ΔA near 0 while ΔB rises.

    Raises:
        ParameterError: the table is empty (the run has no sequential study).
    """
    if table.empty:
        raise ParameterError("this run has no sequential (A → B) study: add 'sequential' to run.methods")
    names = (table["run"] + "/" + table["variant"]) if "run" in table.columns else table["variant"]
    fig = go.Figure()
    for column, label, color in (("delta_A", f"ΔA: {first} after B − after A (forgetting)", "#d62728"),
                                 ("delta_B", f"ΔB: {second} after B − base (learning)", "#2ca02c")):
        bounds = (list(zip(table[f"{column}_low"], table[f"{column}_high"])) if f"{column}_low" in table.columns
                  else [(np.nan, np.nan)] * len(table))
        fig.add_bar(x=list(names), y=table[column], name=label, marker_color=color,
                    error_y=_error_y(list(table[column]), bounds),
                    hovertemplate=f"%{{x}}<br>{label}: %{{y:+.4f}}<extra></extra>")
    fig.update_layout(barmode="group", title=f"Sequential study: {first} (A), then {second} (B)",
                      xaxis_title="variant trained on B", yaxis_title="Δ score", legend_title="")
    fig.update_xaxes(type="category")
    return fig
