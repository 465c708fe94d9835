"""Plotly figure builders: one function per figure, library data in, ``plotly.graph_objects.Figure`` out.

The app's pages and the exported report draw every figure with these same functions, from the
same data (:class:`cpift.CoreRegions`, its tables, a run's JSON and CSV files), so what a teammate
sees in a report is what the app showed. Nothing here imports Streamlit. One submodule per topic;
colours shared by all are in :mod:`cpift.plots.style`. A new figure adds its name to ``__all__``.
"""

from .compare import pareto_figure, retention_figure, scores_figure, seesaw_figure, sequential_figure
from .drift import drift_figure
from .fusion import angle_distribution_figure, transplant_shares_figure
from .grouping import dendrogram_figure, node_positions, similarity_graph_figure, stage_plan_figure, tau_sweep_figure
from .overlap import group_jaccard_heatmap, jaccard_heatmap, pairs_heatmap
from .regions import core_sizes_figure, magnitude_histogram_figure, stability_figure
from .training import loss_figure

__all__ = [
    "angle_distribution_figure",
    "core_sizes_figure",
    "dendrogram_figure",
    "drift_figure",
    "group_jaccard_heatmap",
    "jaccard_heatmap",
    "loss_figure",
    "magnitude_histogram_figure",
    "node_positions",
    "pairs_heatmap",
    "pareto_figure",
    "retention_figure",
    "scores_figure",
    "seesaw_figure",
    "sequential_figure",
    "stability_figure",
    "similarity_graph_figure",
    "stage_plan_figure",
    "tau_sweep_figure",
    "transplant_shares_figure",
]
