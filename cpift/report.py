"""One self-contained HTML report of one or more runs, to share findings with teammates.

:func:`export_report` writes a single HTML file that works offline: plotly.js is inlined once in
the page head and every figure is a ``<div>`` drawn by it (no ``<script src=…>``, no CDN). It
holds, across the runs, the methods × tasks table (:func:`cpift.scores.compare`) and the
comparison figures (:func:`comparison_figures`), then per run its status, its config (TOML), the
sequential study, the training loss, and the exploration figures at the run's own p and τ
(:func:`run_figures`). Every figure comes from the same builders in :mod:`cpift.plots` that the
app's pages call, from the same files, so the report shows what the app showed.

A figure a run cannot have (no retention scores, no sequential study, no regions yet) is replaced
by a one-line note saying why; a run still going is reported as far as it got. The file is written
atomically. :func:`figure_file` gives one chart as a PNG when kaleido finds a Chromium-based
browser (:func:`chromium_path`), else as a standalone HTML file.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from ._version import __version__
from .atomic import atomic_write_text
from .config import parse_config
from .errors import CpiftError, FormatError, ParameterError
from .explore import run_fusion_report, run_progress, run_regions, run_reliability, run_similarity
from .grouping import dendrogram_data, groupings_by_tau
from .overlap import layer_of
from .plots import (
    angle_distribution_figure,
    core_sizes_figure,
    dendrogram_figure,
    jaccard_heatmap,
    loss_figure,
    node_positions,
    pairs_heatmap,
    pareto_figure,
    retention_figure,
    scores_figure,
    seesaw_figure,
    sequential_figure,
    similarity_graph_figure,
    stage_plan_figure,
    transplant_shares_figure,
)
from .plots.compare import merge_metrics, sequential_table
from .runs import GROUPS, METRICS_JSON, REGIONS, RunDir
from .scores import compare, formatted, paired_comparisons, read_items

_log = logging.getLogger(__name__)

__all__ = ["chromium_path", "comparison_figures", "export_report", "figure_file", "layer_shares", "load_metrics",
           "run_figures", "run_names", "sequential_view"]

Figures = dict[str, go.Figure | str]
"""Title → figure, or → the reason the figure is not available (a one-line note)."""


def run_names(run_dirs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The runs' labels: their directory names, as :func:`cpift.scores.compare` prefixes rows.

    Raises:
        ParameterError: two runs have the same directory name (their models would be confused).
    """
    names = [Path(p).name for p in run_dirs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ParameterError(f"runs in different folders share the name {', '.join(map(repr, twice))}; "
                             "compare runs whose directory names differ")
    return names


def load_metrics(run_dirs: Sequence[str | os.PathLike[str]]) -> dict[str, dict]:
    """Each run's ``metrics.json`` by run label (:func:`run_names`); runs without one are left out.

    Raises:
        CpiftError / FormatError: a run directory is missing, or its manifest or metrics are corrupt.
    """
    out = {}
    for name, path in zip(run_names(run_dirs), run_dirs):
        metrics = RunDir.open(path).read_json(METRICS_JSON, default=None)
        if metrics is not None:
            out[name] = metrics
    return out


def _attempt(figures: Figures, title: str, build) -> None:
    """Add ``build()`` under ``title``, or the reason it cannot be drawn (a library error)."""
    try:
        figures[title] = build()
    except CpiftError as exc:
        figures[title] = str(exc)


def comparison_figures(metrics: Mapping) -> Figures:
    """The comparison views of metrics (one run's, or several merged by
    :func:`cpift.plots.compare.merge_metrics`): scores, seesaw, retention, ID vs OOD."""
    figures: Figures = {}
    _attempt(figures, "Scores per task", lambda: scores_figure(metrics))
    _attempt(figures, "Seesaw against the base", lambda: seesaw_figure(metrics))
    _attempt(figures, "Retention", lambda: retention_figure(metrics))
    _attempt(figures, "In-distribution vs out-of-distribution", lambda: pareto_figure(metrics))
    return figures


def sequential_view(run: RunDir, metrics: Mapping | None) -> tuple[pd.DataFrame | None, go.Figure | str]:
    """A run's A→B study: its table and figure, or ``(None, reason)``."""
    if metrics is None:
        return None, "the run has no metrics yet"
    seq = run.config.get("sequential", {})
    first, second = seq.get("first"), seq.get("second")
    if "sequential" not in run.config.get("run", {}).get("methods", ()) or not first or not second:
        return None, "this run has no sequential (A → B) study"
    table = sequential_table(metrics, first, second)
    try:
        return table, sequential_figure(table, first, second)
    except CpiftError as exc:
        return table, str(exc)


def run_figures(run_dir: str | os.PathLike[str]) -> Figures:
    """One run's training loss and its exploration figures at the run's own p and τ: core sizes,
    Jaccard, per-layer Jaccard, the τ graph, stage plan and dendrogram, transplant shares, angles."""
    run = RunDir.open(run_dir)
    figures: Figures = {}
    losses = run_progress(run.path).losses
    figures["Training loss"] = loss_figure(losses) if len(losses) else "no optimizer step recorded yet"
    if not run.exists(REGIONS):
        figures["Core regions"] = "the run has no core regions (it did not run cpift, or not that far)"
        return figures
    try:
        _exploration_figures(run, figures)
    except CpiftError as exc:  # regions of another version, a corrupt file: say so, keep the rest
        figures["Core regions"] = str(exc)
    return figures


def _exploration_figures(run: RunDir, figures: Figures) -> None:
    regions = run_regions(run)
    _attempt(figures, "Core size per layer", lambda: core_sizes_figure(regions.sizes("layer")))
    similarity = run_similarity(run)
    significance = regions.overlap_significance()
    retest = run_reliability(run)
    figures["Overlap beside chance"] = jaccard_heatmap(significance, "lift", retest=retest)
    figures["Jaccard overlap"] = jaccard_heatmap(significance, retest=retest)
    _attempt(figures, "Lift over chance per layer",
             lambda: pairs_heatmap(regions.overlap_significance("layer"), "layer", "lift"))
    groups = run.read_json(GROUPS, default=None)
    if groups is not None:
        tau = float(groups["tau"])
        figures[f"Task graph at τ = {tau:g}"] = similarity_graph_figure(similarity, tau, node_positions(similarity),
                                                                          groups["groups"])
        figures["Stage plan"] = stage_plan_figure(groups["stages"], groups["groups"])
        figures["Dendrogram"] = dendrogram_figure(dendrogram_data(similarity, "single"),
                                                  groupings_by_tau(similarity), tau,
                                                  float(significance.expected_jaccard.mean()))
    report = run_fusion_report(run)
    if report is None:
        figures["Fusion"] = "the run has no fusion report"
        return
    figures["Transplant shares per layer"] = transplant_shares_figure(layer_shares(report))
    figures["Base ↔ task angles"] = angle_distribution_figure(report)


def layer_shares(report: pd.DataFrame) -> pd.DataFrame:
    """A fusion report (one row per tensor) summed per layer: ``group, numel, contested,
    from:TASK…``, as :func:`cpift.fusion.transplant_report` gives for ``by="layer"``."""
    columns = ["numel", "contested", *[c for c in report.columns if c.startswith("from:")]]
    table = report.groupby(report["tensor"].map(layer_of), sort=False)[columns].sum()
    return table.rename_axis("group").reset_index()


# -- HTML ------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table.data { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
table.data th, table.data td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
table.data th { background: #f3f3f3; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #777; font-style: italic; }
.figure { margin: 1em 0 2em; }
"""


def _figures_html(figures: Figures) -> str:
    parts = []
    for title, figure in figures.items():
        if isinstance(figure, go.Figure):
            body = pio.to_html(figure, full_html=False, include_plotlyjs=False, include_mathjax=False,
                               config={"responsive": True})
            parts.append(f'<div class="figure" data-title="{html.escape(title)}">{body}</div>')
        else:
            parts.append(f'<p class="note">{html.escape(title)}: {html.escape(figure)}</p>')
    return "\n".join(parts)


def _table_html(table: pd.DataFrame) -> str:
    return table.to_html(classes="data", float_format=lambda v: f"{v:.4f}", na_rep="—", border=0)


def _paired_html(run: RunDir) -> str:
    """The run's models against multitask (else the base), paired by item, as an HTML table."""
    try:
        items = read_items(run)
    except FormatError:
        return '<p class="note">No per-item results (an older cpift made this run): no paired comparison.</p>'
    reference = "multitask" if "multitask" in set(items.model) else "base"
    return (f"<h3>Paired comparison against {html.escape(reference)}</h3>"
            + _table_html(paired_comparisons(items, reference).set_index(["model", "task"]))
            + f'<p class="note">difference = model − {html.escape(reference)} on the same items (normalised '
            "average on 0–10), 95 % paired interval, p-value (exact McNemar for one seed of binary scores, else "
            "a sign-flip permutation test; bootstrap for the normalised average).</p>")


def _findings_html(run: RunDir) -> str:
    """The papers' claims measured on the run (:func:`cpift.findings.findings`) and its τ sweep."""
    from .findings import findings, findings_table, tau_sweep
    from .plots import tau_sweep_figure

    try:
        table = findings_table(findings(run))
    except FormatError:
        return ""
    sweep = tau_sweep(run)
    return ("<h3>Findings: the papers' claims at this run's scale</h3>"
            + table.drop(columns="rule").to_html(classes="data", index=False, border=0)
            + '<p class="note">' + "<br>".join(f"{i}. {html.escape(rule)}." for i, rule in enumerate(table.rule, 1))
            + "</p>" + ("" if sweep.empty else _figures_html({"τ sweep": tau_sweep_figure(sweep)})))


def _run_html(run: RunDir, metrics: Mapping | None) -> str:
    manifest = run.manifest
    status = f"status {manifest['status']}" + (f" — {manifest['error']}" if manifest.get("error") else "")
    when = (f"created {manifest.get('created')}, updated {manifest.get('updated')}; "
            f"cpift {manifest.get('cpift_version')}")
    parts = [f"<h2>Run {html.escape(run.path.name)}</h2>", f"<p>{html.escape(status)}; {html.escape(when)}</p>"]
    table, figure = sequential_view(run, metrics)
    parts.append("<h3>Sequential study (A, then B)</h3>")
    if table is not None and not table.empty:
        parts.append(_table_html(table.set_index(table.columns[0])))
    parts.append(_figures_html({"Sequential study": figure}))
    parts.append(_paired_html(run))
    parts.append(_findings_html(run))
    parts.append("<h3>Training and exploration</h3>")
    parts.append(_figures_html(run_figures(run.path)))
    try:
        config_text = parse_config(run.config).to_toml()
    except CpiftError:  # a config of another version: show it as stored
        config_text = repr(run.config)
    parts += ["<h3>Config</h3>", f'<pre class="config">{html.escape(config_text)}</pre>']
    return "\n".join(parts)


def export_report(run_dirs: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str]) -> Path:
    """Write one self-contained HTML report of ``run_dirs`` to ``out_path`` (atomically); returns it.

    Raises:
        ParameterError: no run given, or two runs with the same directory name.
        CpiftError / FormatError: a run directory is missing or corrupt.
    """
    if not run_dirs:
        raise ParameterError("export_report needs at least one run directory")
    runs = [RunDir.open(p) for p in run_dirs]
    metrics = load_metrics([r.path for r in runs])
    names = run_names([r.path for r in runs])
    scored = [r.path for r, n in zip(runs, names) if n in metrics]
    title = "cpift report: " + ", ".join(names)
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Generated {_dt.datetime.now().isoformat(timespec='seconds')} by cpift {__version__}.</p>",
             "<h2>Methods × tasks</h2>"]
    if scored:
        parts.append(_table_html(formatted(compare(scored))))
        parts.append(_figures_html(comparison_figures(merge_metrics(metrics))))
    else:
        parts.append('<p class="note">No run has metrics yet.</p>')
    for run, name in zip(runs, names):
        parts.append(_run_html(run, metrics.get(name)))
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style>\n<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n"
            f"<body>\n{chr(10).join(parts)}\n</body></html>\n")
    return atomic_write_text(Path(out_path), page)


# -- one chart as a file -----------------------------------------------------------------------------


def chromium_path() -> str | None:
    """The Chromium-based browser kaleido would use for PNG export, or ``None``.

    kaleido 1.x drives Chrome through choreographer, which takes ``$BROWSER_PATH`` if set, then a
    browser it downloaded itself (``kaleido.get_chrome_sync()``), then ``chrome``/``chromium``/…
    on ``PATH`` and their usual install paths (Debian's ``/usr/bin/chromium`` among them).
    """
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return None
    path = Chromium.find_browser(skip_local=False)
    return path if path and os.access(path, os.X_OK) else None


def figure_file(fig: go.Figure, stem: str, *, png: bool | None = None) -> tuple[str, bytes, str]:
    """One chart as a downloadable file: ``(file name, bytes, MIME type)``.

    A PNG (rendered by kaleido) when ``png`` is true, or by default when :func:`chromium_path`
    finds a browser; else a standalone HTML file with plotly.js inlined (opens offline). Kaleido's
    browser sometimes fails a render on a busy machine (its page not ready yet): a render is tried
    twice, and by default a second failure gives the HTML file instead.
    """
    if png if png is not None else chromium_path() is not None:
        for attempt in (1, 2):
            try:
                return f"{stem}.png", pio.to_image(fig, format="png", scale=2), "image/png"
            except Exception as exc:  # kaleido raises its own types (e.g. a JavaScript error in the page)
                if attempt == 2 and png:
                    raise
                if attempt == 2:
                    _log.warning("PNG export of %r failed twice (%s): writing HTML instead", stem, exc)
    text = pio.to_html(fig, full_html=True, include_plotlyjs=True, include_mathjax=False)
    return f"{stem}.html", text.encode("utf-8"), "text/html"
