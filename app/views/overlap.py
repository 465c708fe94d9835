"""Overlap: how much the tasks' cores share, over the whole model and per layer or module."""

from __future__ import annotations

import streamlit as st
from common import Source, errors_shown, linked_select, memo, p_slider, page_source

from cpift.overlap import GROUP_BY
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


def page(src: Source) -> None:
    p = p_slider(src)
    regions = src.regions(p)
    if len(regions.tasks) < 2:
        st.info("Overlap needs at least two tasks.")
        return
    st.plotly_chart(jaccard_heatmap(memo(src, "jaccard", p, regions.jaccard),
                                    title=f"Jaccard overlap of the cores at p = {p:g} %"), key="jaccard")
    by = st.radio("Group by", GROUP_BY[:2], horizontal=True, key="w_overlap_by")
    table = memo(src, f"layer_jaccard:{by}", p, lambda: regions.layer_jaccard(by))
    one_group(table, by)
    st.plotly_chart(pairs_heatmap(table, by), key="pairs_heatmap")


src = page_source()
with errors_shown():
    page(src)
