"""Overlap: how much the tasks' cores share, over the whole model and per layer or module."""

from __future__ import annotations

import streamlit as st
from common import Source, errors_shown, linked_select, memo, p_slider, page_source

from cpift.explore import run_reliability
from cpift.overlap import GROUP_BY, significant_pairs
from cpift.plots import group_jaccard_heatmap, jaccard_heatmap, pairs_heatmap

st.title("Overlap")
st.caption("Jaccard |A ∩ B| / |A ∪ B| of two tasks' cores, or its lift over chance: the Jaccard divided by what "
           "two random cores of the same sizes would share. Hover a cell for the chance level, the p-value and "
           "the intersection and union counts.")

VALUE_LABELS = {"jaccard": "Jaccard", "lift": "Lift over chance"}
SCALE_LABELS = {"data": "fitted to the data", "fixed": "fixed (Jaccard 0–1, lift 0–2)"}


@st.fragment
@errors_shown()  # a fragment reruns alone, outside the page's own errors_shown
def one_group(table, by: str, value: str, scale: str) -> None:
    """The layer (or module) slider and its heatmap: redrawn alone when the slider moves."""
    groups = list(dict.fromkeys(table["group"].astype(str)))
    group = linked_select(f"{by.capitalize()}", "layer", groups, widget="select_slider")
    st.plotly_chart(group_jaccard_heatmap(table, group, by, value, scale), key="group_heatmap")


def chance(src: Source, table, retest, p: float) -> None:
    """Each pair's overlap beside what random cores of the same sizes would share, and each task's
    test–retest overlap where the run probed its tasks more than once."""
    st.markdown("#### Against chance")
    st.dataframe(table[["task_a", "task_b", "jaccard", "expected_jaccard", "lift", "p_value"]].style.format(
        {"jaccard": "{:.4f}", "expected_jaccard": "{:.4f}", "lift": "{:.2f}", "p_value": "{:.2g}"}),
        key="significance")
    chance_level = float(table.expected_jaccard.mean())
    if significant_pairs(table).empty:
        st.warning(f"No pair of tasks overlaps more than chance at p = {p:g} % (chance Jaccard ≈ {chance_level:.4f}; "
                   "hypergeometric test, Bonferroni over the pairs): the overlaps above are noise.")
    else:
        st.caption(f"expected_jaccard: two random sets of the cores' sizes (≈ {chance_level:.4f}); lift = observed / "
                   "expected; p_value: an intersection at least this large by chance (hypergeometric).")
    if retest is not None:
        st.markdown("#### Test–retest: each task probed again with another data order"
                    + (" (the run's other seeds)" if "seed" in retest.columns else ""))
        st.dataframe(retest, key="reliability")
        st.caption("A task's core against the core of its repeated probe (the run's p), shown on the heatmap's "
                   "diagonal: two tasks cannot share more than a task shares with itself, so read the cross-task "
                   "Jaccards against these.")
    elif src.run is not None:
        st.caption("This run probed each task once, so the diagonal is blank: set probe.repeats = 2 (or run.seeds "
                   "with two seeds or more) to measure how reproducible each core is; the retest is shown at the "
                   "run's own p only.")


def page(src: Source) -> None:
    p = p_slider(src)
    regions = src.regions(p)
    if len(regions.tasks) < 2:
        st.info("Overlap needs at least two tasks.")
        return
    left, right = st.columns(2)
    value = left.radio("Show", list(VALUE_LABELS), format_func=VALUE_LABELS.get, horizontal=True, key="w_overlap_value")
    scale = right.radio("Colour scale", list(SCALE_LABELS), format_func=SCALE_LABELS.get, horizontal=True,
                        key="w_overlap_scale")
    significance = memo(src, "significance", p, regions.overlap_significance)
    # The retests were cored at the run's p: their diagonal only means something there.
    retest = memo(src, "reliability", src.saved.p, lambda: run_reliability(src.run)) \
        if src.run is not None and p == src.saved.p else None
    st.plotly_chart(jaccard_heatmap(significance, value, scale, retest, p), key="jaccard")
    chance(src, significance, retest, p)
    by = st.radio("Group by", GROUP_BY[:2], horizontal=True, key="w_overlap_by")
    table = memo(src, f"significance:{by}", p, lambda: regions.overlap_significance(by))
    one_group(table, by, value, scale)
    st.plotly_chart(pairs_heatmap(table, by, value, scale), key="pairs_heatmap")


src = page_source()
with errors_shown():
    page(src)
