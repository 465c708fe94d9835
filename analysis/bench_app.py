"""Responsiveness of the app's exploration pages: server time per slider move, beside a naive way.

Run from the repository root::

    .venv/bin/python analysis/bench_app.py                 # both parts (~3 min on 2 cores, ~4 GB)
    .venv/bin/python analysis/bench_app.py --part tau      # the 12-task τ row only (seconds)

What is timed is what the server does when a slider moves, inside the page's ``st.fragment``:
computing the new values, building the figures with :mod:`cpift.plots`, and what
``st.plotly_chart`` does with each figure (``plotly.tools.return_figure_from_figure_or_data`` with
validation, then ``plotly.io.to_json``). What the pages cache (node positions, dendrogram data,
the per-layer overlap table, the |Δ| histograms) is computed once beforehand, as in the app.
Streamlit's own messaging and the browser's drawing are not included.

- τ (Grouping page, 12 tasks): grouping, graph, stage plan and dendrogram at a new τ. Naive:
  the layout recomputed at every τ, one plotly trace per edge, ``add_hline`` for the dendrogram's
  lines, the dendrogram data recomputed.
- layer (Overlap page): the heatmap of another layer from the cached per-layer table (Jaccard beside
  chance). Naive: the per-layer table recomputed at every move.
- p (Core regions page, 134.5M parameters in SmolLM2-135M's shapes, random weights and sparse task
  updates made by ``analysis/bench_core.py``'s helpers, 4 tasks): the regions at the new p through
  ``CoreRegions.with_p`` from the run directory's compact regions (top-q |Δ| kept, as the pipeline
  saves them, q = 1), the per-layer sizes, thresholds and both figures. Naive: the regions measured
  again from the models at the new p (``core_regions``), then the same figures.

Wall times are the best of ``--repeat`` runs (``time.perf_counter``), on whatever else the machine
is doing: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import plotly
import plotly.graph_objects as go

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import build_model, log, make_tasks

import cpift
from cpift.grouping import dendrogram_data, group_tasks, groupings_by_tau, stage_order
from cpift.plots import (
    core_sizes_figure,
    dendrogram_figure,
    group_jaccard_heatmap,
    magnitude_histogram_figure,
    node_positions,
    similarity_graph_figure,
    stage_plan_figure,
)


def serve(*figures: go.Figure) -> int:
    """What ``st.plotly_chart`` does with each figure: validate, then serialise. Returns the bytes."""
    size = 0
    for fig in figures:
        checked = plotly.tools.return_figure_from_figure_or_data(fig, validate_figure=True)
        size += len(plotly.io.to_json(checked, validate=False))
    return size


def best(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


# ---------------------------------------------------------------------------------------------
# τ on the Grouping page
# ---------------------------------------------------------------------------------------------

def similarity_of(n_tasks: int, seed: int = 0) -> pd.DataFrame:
    """A symmetric task × task Jaccard matrix in the range real cores give (0 – 0.3)."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.0, 0.3, (n_tasks, n_tasks))
    values = (values + values.T) / 2
    np.fill_diagonal(values, 1.0)
    tasks = [f"task{i:02d}" for i in range(n_tasks)]
    return pd.DataFrame(values, index=tasks, columns=tasks)


def tau_cpift(similarity, tau, positions, dendrogram, groupings) -> int:
    groups = group_tasks(similarity, tau)
    stages = stage_order(groups, "least_overlap_first", similarity)
    return serve(similarity_graph_figure(similarity, tau, positions, groups), stage_plan_figure(stages, groups),
                 dendrogram_figure(dendrogram, groupings, tau))


def tau_naive(similarity, tau) -> int:
    """The straightforward page: layout, a trace per edge and per node, add_hline, all recomputed."""
    graph = cpift.similarity_graph(similarity, tau)
    positions = nx.spring_layout(cpift.similarity_graph(similarity, 0.0), weight="weight", seed=0)
    groups = group_tasks(similarity, tau)
    group_of = {t: i for i, g in enumerate(groups) for t in g}
    fig = go.Figure()
    for a, b, w in graph.edges(data="weight"):
        fig.add_scatter(x=[positions[a][0], positions[b][0]], y=[positions[a][1], positions[b][1]], mode="lines",
                        line={"width": 1 + 30 * w}, hovertext=f"{a}–{b}: {w:.3f}", showlegend=False)
    for task, (x, y) in positions.items():
        fig.add_scatter(x=[x], y=[y], mode="markers+text", text=[task], marker={"size": 20, "color": group_of[task]})
    stages = stage_order(groups, "least_overlap_first", similarity)
    plan = go.Figure(go.Table(cells={"values": [list(range(1, len(stages) + 1)), [", ".join(s) for s in stages]]}))
    data = dendrogram_data(similarity, "single")
    dendro = go.Figure()
    for xs, ys in zip(data["icoord"], data["scoord"]):
        dendro.add_scatter(x=xs, y=ys, mode="lines", showlegend=False)
    for grouping in groupings_by_tau(similarity):
        dendro.add_hline(y=grouping.tau_max, line_dash="dot")
    dendro.add_hline(y=tau)
    return serve(fig, plan, dendro)


def bench_tau(n_tasks: int, repeat: int) -> list[tuple]:
    similarity = similarity_of(n_tasks)
    positions = node_positions(similarity)
    dendrogram = dendrogram_data(similarity, "single")
    groupings = groupings_by_tau(similarity)
    taus = [0.0, 0.05, 0.1, 0.15, 0.2]
    tau_cpift(similarity, 0.1, positions, dendrogram, groupings)  # warm-up: plotly builds its validators once
    tau_naive(similarity, 0.1)
    rows = []
    for tau in (0.0, 0.1):
        edges = cpift.similarity_graph(similarity, tau).number_of_edges()
        fast = best(lambda tau=tau: tau_cpift(similarity, tau, positions, dendrogram, groupings), repeat)
        slow = best(lambda tau=tau: tau_naive(similarity, tau), repeat)
        rows.append((f"τ → {tau} ({n_tasks} tasks, {edges} edges): graph, plan, dendrogram", fast, slow, 150))
    mean = best(lambda: [tau_cpift(similarity, t, positions, dendrogram, groupings) for t in taus], repeat) / len(taus)
    rows.append((f"τ, mean over τ ∈ {taus}", mean, None, 150))
    return rows


# ---------------------------------------------------------------------------------------------
# p and layer on a 134.5M-parameter model
# ---------------------------------------------------------------------------------------------

def p_page(regions, p: float) -> int:
    """What the Core regions page's fragment does after the regions at p are known."""
    thresholds = {t: regions.threshold(t) for t in regions.tasks}
    histograms = {t: regions.histogram(t) for t in regions.tasks}
    return serve(core_sizes_figure(regions.sizes("layer")), magnitude_histogram_figure(histograms, thresholds, p))


def bench_model(n_tasks: int, repeat: int) -> list[tuple]:
    log("building the 134.5M model and its task models…")
    model = build_model("random")
    base = {n: t.detach() for n, t in model.named_parameters()}
    tasks = make_tasks(base, n_tasks)
    log("core regions at p = 1, saved compact (top 1 % of |Δ|) as the pipeline does…")
    regions = cpift.core_regions(base, tasks, p=1.0, progress=False)
    for task in regions.tasks:  # computed once and kept, as a saved run's histograms are
        regions.histogram(task)
    with tempfile.TemporaryDirectory() as tmp:
        regions.save(Path(tmp) / "regions", magnitudes=1.0, compress=True)
        compact = cpift.CoreRegions.load(Path(tmp) / "regions")
    rows = []
    for p in (0.5, 0.25):
        fast = best(lambda p=p: p_page(compact.with_p(p), p), repeat)
        dense = best(lambda p=p: p_page(regions.with_p(p), p), repeat)
        slow = best(lambda p=p: p_page(cpift.core_regions(base, tasks, p=p, progress=False), p), max(1, repeat - 1))
        rows.append((f"p → {p} ({n_tasks} tasks): with_p on the run's compact regions + sizes + figures",
                     fast, slow, 1000))
        rows.append((f"p → {p}: the same from every |Δ| held (regions computed in the session)", dense, slow, 1000))
    table = compact.overlap_significance("layer")
    layers = list(dict.fromkeys(table["group"]))
    fast = best(lambda: [serve(group_jaccard_heatmap(table, g)) for g in layers[:5]], repeat) / 5
    slow = best(lambda: [serve(group_jaccard_heatmap(compact.overlap_significance("layer"), g)) for g in layers[:2]],
                repeat) / 2
    rows.append((f"layer change ({n_tasks} tasks, {len(layers)} layers): heatmap from the cached table",
                 fast, slow, 200))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "tau", "model"), default="all")
    parser.add_argument("--tasks", type=int, default=12, help="tasks on the Grouping page (τ row)")
    parser.add_argument("--model-tasks", type=int, default=4, help="tasks on the 134.5M model (p, layer rows)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    load_before = os.getloadavg()
    rows = []
    if args.part in ("all", "tau"):
        rows += bench_tau(args.tasks, args.repeat)
    if args.part in ("all", "model"):
        rows += bench_model(args.model_tasks, max(2, args.repeat // 2))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"plotly {plotly.__version__}; load average {load_before[0]:.2f} → {os.getloadavg()[0]:.2f}")
    print()
    print("| slider move | cpift (ms) | naive (ms) | target (ms) |")
    print("|---|---:|---:|---|")
    for what, fast, slow, target in rows:
        naive = "—" if slow is None else f"{slow:.0f}"
        print(f"| {what} | {fast:.0f} | {naive} | ≤ {target} {'✓' if fast <= target else '✗'} |")


if __name__ == "__main__":
    main()
