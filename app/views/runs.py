"""Runs: pick a run directory and see its config, status, methods and headline metrics; start a new run."""

from __future__ import annotations

import streamlit as st
from common import errors_shown, pick_run
from launcher import TRAINING_PAGE, new_run_form

from cpift.config import parse_config
from cpift.explore import run_progress
from cpift.scores import compare, formatted
from cpift.runs import METRICS_CSV

st.title("Runs")
st.caption("A run directory holds everything one `cpift run` wrote; the app only reads it. The sample runs are "
           "listed in the sidebar; any path can be typed there.")

STATUS_NOTE = {
    "done": st.success, "running": st.info, "starting": st.info, "stopped": st.warning,
    "died": st.warning, "failed": st.error,
}


def show_run(run) -> None:
    """Status, methods, headline metrics and config of the picked run."""
    progress = run_progress(run.path)
    st.subheader(run.path.name)
    message = f"Status: **{progress.status}**"
    if progress.stage:
        message += f" — stage `{progress.stage}`"
    if progress.status == "died":
        message += " — the process ended without recording an outcome; resume it on the Training page"
    if progress.error:
        message += f" — {progress.error}"
    STATUS_NOTE.get(progress.status, st.info)(message)
    left, right = st.columns(2)
    left.markdown("**Methods:** " + (", ".join(f"`{m}`" for m in progress.methods) or "none"))
    left.markdown("**Done:** " + (", ".join(f"`{m}`" for m in progress.methods_done) or "none yet"))
    right.markdown(f"**Created** {progress.created}  \n**Updated** {progress.updated}  \n"
                   f"**Optimizer steps** {progress.steps_done}"
                   + (f" of {progress.steps_planned}" if progress.steps_planned else ""))
    st.markdown("#### Headline metrics")
    if run.exists(METRICS_CSV):
        table = formatted(compare([run.path]))
        st.caption("Scores in [0, 1] per task as mean [95 % interval] (n = items per seed; ! = too few items "
                   "to rank: an interval wider than ±10 points); normalised average on 0–10; retention next-token "
                   "accuracy; forgetting against the base (mean forget ratio, collapse rate).")
        st.dataframe(table, key="metrics")
    else:
        st.info("No metrics yet: the run has not finished its first method.")
    with st.expander("Config", expanded=False):
        with errors_shown() as unreadable:
            st.code(parse_config(run.config).to_toml(), language="toml")
        if unreadable.error is not None:  # a config this cpift cannot read: show what is stored
            st.json(run.config)
    if progress.status in ("failed", "died") and progress.log_tail:
        with st.expander("End of the log", expanded=progress.status == "failed"):
            st.code(progress.log_tail, language="text")


run = pick_run()
if run is not None:
    with errors_shown():
        show_run(run)

st.divider()
st.subheader("Start a new run")
st.caption("From a preset in `configs/` or an edited config; it runs as its own process (closing the tab does "
           "not stop it) and the Training page follows it.")
if new_run_form("runs_form"):
    st.switch_page(TRAINING_PAGE)
