"""Fusion preview: where the transplanted core elements come from at an overlap rule, and the angles
between base and task tensors; optionally a quick score of the fused model."""

from __future__ import annotations

import streamlit as st
from common import Source, errors_shown, memo, p_slider, page_source

from cpift.explore import quick_fusion_eval
from cpift.fusion import OVERLAP_RULES, transplant_report
from cpift.plots import angle_distribution_figure, transplant_shares_figure

st.title("Fusion preview")
st.caption("Fusion = core transplant (each core element takes its task's value) + SLERP with factor ω "
           "elsewhere. Which task supplies a core element depends only on the cores and the overlap rule, "
           "so it is previewed here without any model weights.")

OVERLAP_HELP = ("max_delta: the task with the largest |Δ| takes a contested element; last: the later task "
                "(the paper's transplant order); mean: the contending tasks' mean (counted as no task's).")


def quick_eval(src: Source, regions, omega: float, overlap: str) -> None:
    """Score the fused probes beside the base on a few items, behind a button."""
    st.subheader("Quick evaluation")
    if not src.has_probes():
        st.caption("This run kept no probe weights (sample runs ship without weights), so no fused model can "
                   "be built here.")
        return
    n = st.number_input("Items per task", min_value=1, max_value=32, value=4, key="w_eval_items")
    if st.button(f"Fuse at ω = {omega:.2f}, {overlap}, and score"):
        with errors_shown(), st.spinner("Fusing the probes and generating…"):
            st.session_state["quick_eval"] = quick_fusion_eval(src.run, regions, omega, overlap, int(n))
    if "quick_eval" in st.session_state:
        st.dataframe(st.session_state["quick_eval"], hide_index=True)


@st.fragment
@errors_shown()  # a fragment reruns alone, outside the page's own errors_shown
def preview(src: Source, p: float) -> None:
    """ω, the overlap rule and the shares: redrawn alone when they change."""
    regions = src.regions(p)
    left, right = st.columns(2)
    omega = left.slider("ω: SLERP factor of the non-core elements", 0.0, 1.0, 0.5, 0.05, key="w_omega",
                        help="ω changes the non-core elements only: the transplant below does not depend on it.")
    rules = list(OVERLAP_RULES) if regions.max_p is not None else [r for r in OVERLAP_RULES if r != "max_delta"]
    overlap = right.radio("Overlap rule", rules, horizontal=True, key="w_overlap_rule", help=OVERLAP_HELP)
    if len(rules) < len(OVERLAP_RULES):
        right.caption("max_delta needs |Δ| magnitudes, which these regions do not hold.")
    table = memo(src, f"transplant:{overlap}", p, lambda: transplant_report(regions, overlap, by="layer"))
    contested = int(table["contested"].sum())
    transplanted = int(table.filter(like="from:").to_numpy().sum()) + (contested if overlap == "mean" else 0)
    st.metric("Contested core elements", f"{contested:,}",
              help="elements in the cores of two or more tasks")
    st.caption(f"{transplanted:,} core elements are transplanted"
               + (" (the contested ones as their tasks' mean)" if overlap == "mean" else ""))
    st.plotly_chart(transplant_shares_figure(table, "layer"), key="shares")
    quick_eval(src, regions, omega, overlap)


src = page_source()
with errors_shown():
    p = p_slider(src)
    preview(src, p)
    report = src.fusion_report()
    if report is not None:
        st.plotly_chart(angle_distribution_figure(report), key="angles")
        st.caption("Angles come from the run's fusion (fusion_report.csv); they do not depend on ω or the rule.")
    else:
        st.info("No fusion report in this source: the base ↔ task angles need the run's fusion step.")
