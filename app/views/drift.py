"""Importance drift: how EPI's protected set changed at each refresh of a run (``methods/epi/drift.json``)."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from common import errors_shown, pick_run

from cpift.runs import EPI_DRIFT
from cpift.plots import drift_figure

st.title("Importance drift")
st.caption("EPI re-selects the protected set — the top p% of an exponential moving average of squared gradients, "
           "normalised per tensor — every R steps and at each stage boundary. A Jaccard with the previous set "
           "well below 1 means parameter importance drifts during training: a mask fixed once goes stale.")

run = pick_run()
if run is not None:
    with errors_shown():
        drift = run.read_json(EPI_DRIFT, default=None)
        if drift is None:
            st.info(f"{run.path.name} has no EPI run ({EPI_DRIFT} is missing): add \"epi\" to run.methods.")
        elif not drift["refreshes"]:
            st.info(f"No refresh yet: the first comes after {drift['interval']} optimizer step(s).")
        else:
            st.plotly_chart(drift_figure(drift, title=f"Importance drift — {run.path.name}"), key="drift")
            st.dataframe(pd.DataFrame(drift["refreshes"]), hide_index=True)
