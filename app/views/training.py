"""Training: launch any method or preset as a separate process and follow it: stage, step, loss, ETA, Stop."""

from __future__ import annotations

import streamlit as st
from common import errors_shown, pick_run
from launcher import new_run_form

from cpift.explore import run_progress
from cpift.launch import STOP_GRACE_S, start_run, stop_run
from cpift.plots import loss_figure

#: Seconds between progress refreshes while a process works on the run.
REFRESH_S = 2.0

st.title("Training")
st.caption("Each run is its own process (its own process group, output in the run's `logs/launch.log`): it goes "
           "on when this tab closes, and this page picks it up again from the run directory.")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    hours, rest = divmod(round(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


@errors_shown()  # polled as a fragment, which reruns alone, outside the page's own errors_shown
def show_progress(path: str) -> None:
    """The run's progress; polled every :data:`REFRESH_S` while a process works on it."""
    progress = run_progress(path)
    was_active = st.session_state.get(f"_was_active:{path}")
    st.session_state[f"_was_active:{path}"] = progress.active
    if was_active and not progress.active:
        st.rerun()  # the process ended: redraw the page once, which stops the polling
    cols = st.columns(5)
    cols[0].metric("Status", progress.status)
    stage = progress.training_stage or progress.stage or "—"
    cols[1].metric("Stage", f"{stage} · seed {progress.seed}" if len(progress.seeds) > 1 else stage)
    cols[2].metric("Step", f"{progress.step} / {progress.steps}" if progress.step else "—")
    cols[3].metric("Stage ETA", _duration(progress.eta_s))
    cols[4].metric("Tokens/s", f"{progress.tokens_per_s:,.0f}" if progress.tokens_per_s else "—")
    if progress.fraction is not None:
        eta = f"; about {_duration(progress.run_eta_s)} of training left" if progress.run_eta_s is not None else ""
        st.progress(progress.fraction, text=f"{progress.steps_done} of {progress.steps_planned} optimizer steps of "
                                            f"the run{eta} (scoring comes on top)")
    if progress.status == "failed":
        st.error(f"The run failed: {progress.error}")
    elif progress.status == "died":
        st.warning("The run's process ended without recording an outcome (killed, or out of memory). "
                   "Resume it to continue from its last checkpoint.")
    elif progress.status == "stopped":
        st.warning(f"Stopped: {progress.error or 'by the user'}. Resume continues from the last checkpoint.")
    elif progress.status == "done":
        st.success("Done. Compare its methods on the Compare & report page.")
    if len(progress.losses):
        st.plotly_chart(loss_figure(progress.losses, title=f"Training loss — {progress.path.name}"), key="loss")
    with st.expander("Log (last lines of logs/launch.log)", expanded=progress.status in ("failed", "died")):
        st.code(progress.log_tail or "(no log: the run was not started from here)", language="text")
    actions(progress)


def actions(progress) -> None:
    """Stop (a process works on the run) or Resume (it stopped, failed or died)."""
    if progress.active and st.button("Stop", key="stop", type="primary",
                                     help="SIGTERM to the run's process group (a clean stop), SIGKILL if it has "
                                          f"not ended in {STOP_GRACE_S:g} s"):
        with st.spinner("Stopping…"):
            stop_run(progress.path)
        st.rerun()
    elif progress.status in ("stopped", "failed", "died") and st.button(
            "Resume", key="resume", help="Continue with the run's own config from its last checkpoint"):
        start_run(None, progress.path, resume=True)
        st.rerun()


run = pick_run()
if run is not None:
    st.subheader(run.path.name)
    with errors_shown():
        active = run_progress(run.path).active
        st.fragment(run_every=REFRESH_S if active else None)(show_progress)(str(run.path))

with st.expander("Start a run", expanded=run is None):
    new_run_form("training_form")
