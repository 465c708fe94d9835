"""Core regions: each task's core at any p (through CoreRegions.with_p), its size per layer, and |Δθ|."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from common import CUSTOM, Source, errors_shown, p_slider, page_source, remember

from cpift.errors import ParameterError
from cpift.overlap import GROUP_BY, expected_jaccard
from cpift.plots import core_sizes_figure, magnitude_histogram_figure, stability_figure
from cpift.regions import core_regions, magnitudes_fit
from cpift.probes import SETTLED_JACCARD, halfway
from cpift.runs import STABILITY
from cpift.selection import k_for_percent

st.title("Core regions")
st.caption("Each task's core: the top p % of parameters by |θ_task − θ_base| after its probe fine-tune.")


def checkpoints_form() -> None:
    """Core regions of any base and task checkpoints (paths or hub ids), used as the app's source."""
    with st.expander("Compute core regions from checkpoints (paths or hub ids)"):
        with st.form("checkpoints"):
            base = st.text_input("Base model", placeholder="smollm2-135m, a model directory or org/name")
            lines = st.text_area("Task models, one `task = path or hub id` per line",
                                 placeholder="math = runs/quick/probes/math\ncode = runs/quick/probes/code")
            p = st.number_input("p (%)", min_value=0.01, max_value=100.0, value=1.0, step=0.1)
            submitted = st.form_submit_button("Compute")
        if not submitted:
            return
        with errors_shown():  # bad lines, paths and models are messages
            tuned = {}
            for number, line in enumerate(lines.splitlines(), start=1):
                if line.strip():
                    name, sep, model = line.partition("=")
                    if not sep or not name.strip() or not model.strip():
                        raise ValueError(f"line {number}: expected `task = path or hub id`, got {line!r}")
                    tuned[name.strip()] = model.strip()
            with st.spinner("Reading the checkpoints…"):
                # Models too large to hold every |Δ| (a 7B pair: 27 GB) get their cores streamed, p fixed.
                keep = magnitudes_fit(base.strip(), len(tuned))
                regions = core_regions(base.strip(), tuned, p=p, keep_magnitudes=keep, progress=False)
            st.session_state["custom_source"] = Source(f"{base} + {len(tuned)} tasks", None, regions,
                                                       100.0 if keep else p, False)  # p fixed: the slider says so
            st.session_state.pop("custom_at", None)
            remember("run", CUSTOM)
            remember("p", regions.p)  # the sliders start at the p just computed
            st.session_state["w_run"] = CUSTOM
            st.session_state.pop("w_p", None)
            st.rerun()


@st.fragment
@errors_shown()  # a fragment reruns alone, outside the page's own errors_shown
def explore(src: Source) -> None:
    """The p slider and everything that depends on p: redrawn alone when p moves."""
    left, right = st.columns([3, 1])
    p = p_slider(src, left)
    by = right.radio("Group by", GROUP_BY[:2], horizontal=True, key="w_regions_by")
    regions = src.regions(p)
    thresholds = {t: regions.threshold(t) for t in regions.tasks} if regions.scope == "global" else {}
    summary = pd.DataFrame({"task": regions.tasks, "core elements": [regions.size(t) for t in regions.tasks]})
    if thresholds:
        summary["threshold |Δ|"] = [thresholds[t] for t in regions.tasks]
    st.dataframe(summary, hide_index=True)
    st.plotly_chart(core_sizes_figure(regions.sizes(by), by), key="core_sizes")
    try:
        histograms = {t: regions.histogram(t) for t in regions.tasks}
    except ParameterError as exc:  # regions computed without keeping |Δ| have no distribution
        st.info(f"No |Δθ| distribution for these regions: {exc}")
        return
    st.plotly_chart(magnitude_histogram_figure(histograms, thresholds, p), key="histogram")


def stability(src: Source) -> None:
    """The run's core-stability curves (probe.snapshot_every), or why there are none."""
    if src.run is None:
        return
    st.markdown("#### Was the probe long enough?")
    if not src.run.exists(STABILITY):
        st.info("This run kept no snapshots of its probes' cores (probe.snapshot_every = 0): whether its cores had "
                "stopped moving is unknown; short probes give cores that are largely arbitrary.")
        return
    curves = src.run.read_json(STABILITY)
    # The snapshots are cores at the run's p: two random sets of that size share this much.
    d = src.saved.layout.numel
    k = k_for_percent(src.saved.p, d)
    st.plotly_chart(stability_figure(curves, chance=expected_jaccard(k, k, d)), key="stability")
    verdicts = {task: halfway(curve) for task, curve in curves.items()}
    moving = [f"{task} ({jaccard:.2f} at step {step})" for task, (step, jaccard, settled) in verdicts.items()
              if not settled]
    if moving:
        st.warning(f"Not yet stable: the core at the probe's halfway point shares less than {SETTLED_JACCARD} "
                   f"(Jaccard) with the final core for {', '.join(moving)}. A longer probe would give other cores; "
                   "read the overlaps as provisional.")
    else:
        st.caption(f"Every task's core at the probe's halfway point already shares ≥ {SETTLED_JACCARD} with its "
                   "final core.")

checkpoints_form()
source = page_source()
explore(source)
stability(source)
