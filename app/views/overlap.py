"""Overlap: how much the tasks' cores share, over the whole model and per layer or module."""

from __future__ import annotations

import streamlit as st
from common import Source, errors_shown, linked_select, memo, p_slider, page_source

from cpift.overlap import GROUP_BY, significant_pairs
from cpift.runs import RELIABILITY
from cpift.plots import group_jaccard_heatmap, jaccard_heatmap, pairs_heatmap

st.title("Overlap")
st.caption("Jaccard |A ∩ B| / |A ∪ B| of two tasks' cores; every heatmap uses the fixed scale 0–1. "
           "Hover a cell for the intersection and union counts.")


@st.fragment
@errors_shown()  # a fragment reruns alone, outside the page's own errors_shown
def one_group(table, by: str) -> None:
    """The layer (or module) slider and its heatmap: redrawn alone when the slider moves."""
    groups = list(dict.fromkeys(table["group"].astype(str)))
    group = linked_select(f"{by.capitalize()}", "layer", groups, widget="select_slider")
    st.plotly_chart(group_jaccard_heatmap(table, group, by), key="group_heatmap")


def chance(src: Source, regions, p: float) -> None:
    """Each pair's overlap beside what random cores of the same sizes would share, and each task's
    test–retest overlap where the run probed its tasks more than once."""
    table = memo(src, "significance", p, regions.overlap_significance)
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
    if src.run is not None and src.run.exists(RELIABILITY):
        st.markdown("#### Test–retest: each task probed again with another data order")
        retest = src.run.read_json(RELIABILITY)
        st.dataframe(retest, key="reliability")
        st.caption("A task's core against the core of its repeated probe (the run's p): two tasks cannot share "
                   "more than a task shares with itself, so read the cross-task Jaccards against these.")


def page(src: Source) -> None:
    p = p_slider(src)
    regions = src.regions(p)
    if len(regions.tasks) < 2:
        st.info("Overlap needs at least two tasks.")
        return
    st.plotly_chart(jaccard_heatmap(memo(src, "jaccard", p, regions.jaccard),
                                    title=f"Jaccard overlap of the cores at p = {p:g} %"), key="jaccard")
    chance(src, regions, p)
    by = st.radio("Group by", GROUP_BY[:2], horizontal=True, key="w_overlap_by")
    table = memo(src, f"layer_jaccard:{by}", p, lambda: regions.layer_jaccard(by))
    one_group(table, by)
    st.plotly_chart(pairs_heatmap(table, by), key="pairs_heatmap")


src = page_source()
with errors_shown():
    page(src)
