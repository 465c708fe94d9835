"""Compare & report: methods × tasks across runs, the comparison charts, and a self-contained HTML report."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from common import errors_shown, list_runs, pick_run, resolve_path

from cpift.errors import FormatError
from cpift.findings import findings, findings_table, tau_sweep
from cpift.plots import tau_sweep_figure
from cpift.plots.compare import merge_metrics
from cpift.runs import ITEMS
from cpift.scores import compare, formatted, paired_comparisons, read_items
from cpift.report import chromium_path, comparison_figures, export_report, figure_file, load_metrics, sequential_view
from cpift.runs import RunDir

st.title("Compare & report")
st.caption("Every method of every chosen run, side by side; the report holds the same tables and figures in one "
           "HTML file that opens offline.")


@st.cache_data(show_spinner=False)
def _png_export() -> bool:
    """Whether kaleido finds a Chromium-based browser for PNG export (asked once per server)."""
    return chromium_path() is not None


def chart(fig: go.Figure | str, title: str, key: str) -> None:
    """A chart with its download button (PNG when kaleido can render, else HTML), or its note."""
    if isinstance(fig, str):
        st.caption(f"{title}: {fig}")
        return
    st.plotly_chart(fig, key=key)
    png = _png_export()
    stem = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()
    st.download_button(f"Download {'PNG' if png else 'HTML'}", data=lambda: figure_file(fig, stem, png=png)[1],
                       file_name=f"{stem}.{'png' if png else 'html'}", mime="image/png" if png else "text/html",
                       key=f"download_{key}", on_click="ignore")


def chosen_runs(current: RunDir | None) -> list[Path]:
    """The runs to compare: listed ones picked here (the sidebar's run by default) and typed paths."""
    listed = list_runs()
    current_label = str(current.path) if current is not None else None
    options = list(dict.fromkeys([*listed, *([current_label] if current_label else [])]))
    default = [current_label] if current_label else listed[:1]
    picked = st.multiselect("Runs", options, default=default, key="w_compare_runs")
    typed = st.text_input("More run directories (comma-separated paths)", key="w_compare_more")
    paths = [resolve_path(p) for p in [*picked, *typed.split(",")] if p.strip()]
    return list(dict.fromkeys(p.resolve() for p in paths))


def show(paths: list[Path]) -> None:
    runs = [RunDir.open(p) for p in paths]
    metrics = load_metrics(paths)
    scored = [r.path for r in runs if r.path.name in metrics]
    missing = [r.path.name for r in runs if r.path.name not in metrics]
    if missing:
        st.warning(f"No metrics yet in {', '.join(missing)}: left out of the comparison.")
    if not scored:
        return
    st.markdown("#### Methods × tasks")
    st.dataframe(formatted(compare(scored)), key="compare_table")
    st.caption("mean [95 % interval]; n = evaluation items per seed; `!` = an interval wider than ±10 points: too "
               "few items to rank the models by that score.")
    for run in runs:
        if run.path in scored:
            paired_table(run)
            claims(run)
    for i, (title, fig) in enumerate(comparison_figures(merge_metrics(metrics)).items()):
        chart(fig, title, f"cmp{i}")
    for run in runs:
        table, fig = sequential_view(run, metrics.get(run.path.name))
        if table is not None and not table.empty:
            st.markdown(f"#### Sequential study — {run.path.name}")
            st.dataframe(table.style.format("{:+.3f}", subset=["delta_A", "delta_B"]), key=f"seq_{run.path.name}")
            chart(fig, f"sequential {run.path.name}", f"seq_fig_{run.path.name}")


def paired_table(run: RunDir) -> None:
    """Each model of ``run`` against a chosen reference, paired by item: differences with intervals."""
    try:
        items = read_items(run)
    except FormatError:
        st.info(f"{run.path.name}: no per-item results (made by an older cpift), so no paired comparison.")
        return
    models = list(dict.fromkeys(items.model))
    default = "multitask" if "multitask" in models else "base"
    reference = st.selectbox(f"Paired comparison in {run.path.name}: reference model", models,
                             index=models.index(default) if default in models else 0, key=f"ref_{run.path.name}")
    table = paired_comparisons(items, reference)
    st.dataframe(table.style.format({"difference": "{:+.3f}", "low": "{:+.3f}", "high": "{:+.3f}",
                                     "p_value": "{:.3g}"}), key=f"paired_{run.path.name}")
    st.caption(f"difference = model − {reference} on the same items (normalised average on 0–10), its 95 % paired "
               "interval and p-value (exact McNemar for one seed of binary scores, else a sign-flip permutation "
               "test; bootstrap for the normalised average); `excludes_zero`: the difference is distinguishable "
               "from no difference.")


@st.cache_data(show_spinner="Measuring the papers' claims…")
def _claims(path: str, stamp: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's findings and τ sweep, computed again only when its per-item results change."""
    return findings_table(findings(path)), tau_sweep(RunDir.open(path))


def claims(run: RunDir) -> None:
    """The papers' claims measured on the run: verdicts with intervals, and the τ sweep."""
    if not run.exists(ITEMS):
        return
    table, sweep = _claims(str(run.path), run.path_for(ITEMS).stat().st_mtime_ns)
    st.markdown(f"#### Findings — {run.path.name}")
    st.dataframe(table.drop(columns="rule"), hide_index=True, key=f"findings_{run.path.name}")
    st.caption("Each claim of the papers at this run's scale; the verdict is never stronger than the 95 % interval "
               "allows (rules: " + " ".join(f"{i}. {r}." for i, r in enumerate(table.rule, 1)) + ")")
    if not sweep.empty:
        chart(tau_sweep_figure(sweep), f"tau sweep {run.path.name}", f"tau_{run.path.name}")


def report(paths: list[Path]) -> None:
    """Export the HTML report of the chosen runs and offer it for download."""
    if st.button("Export report", key="export", help="One HTML file: figures, tables and every run's config"):
        with st.spinner("Writing the report…"), tempfile.TemporaryDirectory() as tmp:
            out = export_report(paths, Path(tmp) / "cpift-report.html")
            st.session_state["report_html"] = (paths, out.read_bytes())
    made_for, data = st.session_state.get("report_html", (None, None))
    if made_for == paths:
        st.download_button("Download report (HTML)", data=data, file_name="cpift-report.html", mime="text/html",
                           key="download_report", on_click="ignore")


current = pick_run()
paths = chosen_runs(current)
if not paths:
    st.info("Choose at least one run.")
    st.stop()
with errors_shown():
    show(paths)
    report(paths)
