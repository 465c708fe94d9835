"""Grouping: tasks linked when their cores' Jaccard reaches τ, the stage plan, and the dendrogram."""

from __future__ import annotations

import numpy as np
import streamlit as st
from common import Source, errors_shown, linked_slider, memo, p_slider, page_source

from cpift.overlap import significant_pairs
from cpift.grouping import STAGE_ORDERS, dendrogram_data, group_tasks, groupings_by_tau, stage_order
from cpift.plots import dendrogram_figure, node_positions, similarity_graph_figure, stage_plan_figure

st.title("Grouping")
st.caption("Tasks whose cores overlap by at least τ (Jaccard) are linked; each connected group trains in one "
           "stage, with the cores of earlier stages frozen.")


@st.fragment
@errors_shown()  # a fragment reruns alone, outside the page's own errors_shown
def by_tau(src: Source, similarity, p: float, chance_level: float | None) -> None:
    """The τ slider and what depends on τ: redrawn alone when τ moves."""
    values = similarity.to_numpy()
    largest = float(values[~np.eye(len(values), dtype=bool)].max(initial=0.0))
    high = min(1.0, round(1.25 * largest + 0.01, 2))  # above the largest Jaccard every task is alone
    default = float(src.run.config.get("cpift", {}).get("tau", 0.1)) if src.run is not None else 0.1
    # The label stays fixed (a changing label would reset the slider); chance is said below it.
    tau = linked_slider("τ: link threshold on the Jaccard overlap", "tau", 0.0, high, default, 0.001, "%.3f",
                        help=f"Every task is alone above {largest:.4f}, the largest pairwise overlap; at or below "
                        "the chance level, tasks are linked by what random cores of these sizes share.")
    if chance_level is not None:
        where = "at or below" if tau <= chance_level else "above"
        st.caption(f"τ = {tau:.3f} is {where} the chance level {chance_level:.4f} (dashed on the dendrogram)"
                   + (": these links are what random cores would give." if tau <= chance_level else "."))
    groups = group_tasks(similarity, tau)
    positions = memo(src, "positions", p, lambda: node_positions(similarity))
    graph_col, plan_col = st.columns([3, 2])
    graph_col.plotly_chart(similarity_graph_figure(similarity, tau, positions, groups), key="graph")
    with plan_col:
        default_order = src.run.config.get("cpift", {}).get("order", "random") if src.run is not None else "random"
        strategy = st.selectbox("Stage order", STAGE_ORDERS, index=STAGE_ORDERS.index(default_order)
                                if default_order in STAGE_ORDERS else 0, key="w_stage_order")
        seed = st.number_input("Seed (random order)", min_value=0, value=0, step=1, key="w_stage_seed",
                               disabled=strategy != "random")
        stages = stage_order(groups, strategy, similarity, seed=int(seed))
        st.plotly_chart(stage_plan_figure(stages, groups), key="stage_plan")
    if len(similarity) >= 2:
        dendrogram = memo(src, "dendrogram", p, lambda: dendrogram_data(similarity, "single"))
        breakpoints = memo(src, "groupings_by_tau", p, lambda: groupings_by_tau(similarity))
        st.plotly_chart(dendrogram_figure(dendrogram, breakpoints, tau, chance_level), key="dendrogram")


src = page_source()
with errors_shown():
    p = p_slider(src)
    regions = src.regions(p)
    similarity = memo(src, "jaccard", p, regions.jaccard)
    chance_level = None
    if len(regions.tasks) > 1:
        significance = memo(src, "significance", p, regions.overlap_significance)
        chance_level = float(significance.expected_jaccard.mean())
        if significant_pairs(significance).empty:
            st.warning(f"No pair of tasks overlaps more than chance at p = {p:g} % (chance Jaccard ≈ "
                       f"{chance_level:.4f}): a grouping at any τ is noise.")
        else:
            st.caption(f"Chance Jaccard at p = {p:g} %: ≈ {chance_level:.4f} (two random cores of these sizes); "
                       "a τ at or below it links tasks by chance.")
    by_tau(src, similarity, p, chance_level)
