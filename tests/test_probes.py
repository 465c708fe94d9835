"""Probe reliability (repeated probes) and core stability (snapshots) in a tiny run, and the
chance level they are read against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpift.config import load_config
from cpift.masks import from_positions
from cpift.overlap import expected_jaccard
from cpift.pipeline import run_config
from cpift.probes import mask_jaccard, stability
from cpift.runs import RELIABILITY, STABILITY, probe_dir, retest_regions_dir

ROOT = Path(__file__).resolve().parents[1]


def test_expected_jaccard_matches_simulation() -> None:
    rng = np.random.default_rng(0)
    d, k_a, k_b = 300, 40, 25
    draws = []
    for _ in range(20000):
        a, b = rng.choice(d, k_a, replace=False), rng.choice(d, k_b, replace=False)
        shared = len(np.intersect1d(a, b))
        draws.append(shared / (k_a + k_b - shared))
    assert expected_jaccard(k_a, k_b, d) == pytest.approx(np.mean(draws), abs=4 * np.std(draws) / np.sqrt(20000))
    assert expected_jaccard(1_350_000, 1_350_000, 135_000_000) == pytest.approx(1 / 199, rel=1e-3)
    assert expected_jaccard(0, 0, 10) == 0.0 and expected_jaccard(10, 10, 10) == pytest.approx(1.0)


def test_stability_curve_ends_at_one() -> None:
    snaps = {2: from_positions(np.array([0, 1, 2]), 1), 4: from_positions(np.array([1, 2, 3]), 1)}
    curve = stability(snaps)
    assert curve.step.tolist() == [2, 4] and curve.jaccard_to_final.tolist() == [0.5, 1.0]
    assert mask_jaccard(snaps[2], snaps[2]) == 1.0


def test_a_run_reports_reliability_and_stability(tmp_path: Path) -> None:
    overrides = ['run.methods=["cpift"]', "probe.repeats=2", "probe.snapshot_every=1", "probe.steps=3",
                 'probe.optimizer="sgd"', "probe.lr=0.05"]
    run = run_config(load_config(ROOT / "configs" / "tiny.toml", overrides), tmp_path / "run", progress=False)
    assert run.exists(probe_dir("math", 2)) and run.exists(retest_regions_dir(2) + "/manifest.json")
    records = run.read_json(RELIABILITY)
    assert {r["task"] for r in records} == {"math", "code", "logic", "format"}
    for record in records:
        assert 0 <= record["jaccard"] <= 1 and 0 < record["expected"] < 1 and record["repeat"] == 2
    curves = run.read_json(STABILITY)
    assert set(curves) == {"math", "code", "logic", "format"}
    assert curves["math"]["step"] == [1, 2, 3] and curves["math"]["jaccard_to_final"][-1] == 1.0
    assert json.loads((run.path / "similarity.json").read_text())["tasks"] == ["math", "code", "logic", "format"]

    from test_app_explore import figure
    from test_app_runs import open_page

    heat = figure(open_page("overlap", run.path), "Jaccard overlap of the cores").data[0]
    retest = {r["task"]: r["jaccard"] for r in records}
    assert list(np.diag(np.array(heat.z, dtype=float))) == pytest.approx([retest[t] for t in heat.x])


def test_planted_overlap_is_significant_and_independent_cores_are_not() -> None:
    from cpift.masks import Layout
    from cpift.overlap import overlap_significance, significant_pairs

    rng = np.random.default_rng(1)
    layout = Layout(("model.layers.0.w", "model.layers.1.w"), ((100, 100), (100, 100)))
    d = layout.numel

    def mask(indices):
        return from_positions(np.unique(indices), layout.n_words)

    shared = rng.choice(d, 100, replace=False)
    planted = {"a": mask(np.r_[shared, rng.choice(d, 100, replace=False)]),
               "b": mask(np.r_[shared, rng.choice(d, 100, replace=False)])}
    table = overlap_significance(planted, layout)
    assert table.p_value[0] < 1e-20 and table.lift[0] > 10 and len(significant_pairs(table)) == 1
    per_layer = overlap_significance(planted, layout, "layer")
    assert (per_layer.size_a + per_layer.size_b > 0).all() and set(per_layer.group) == {"0", "1"}
    p_values = [overlap_significance({"x": mask(rng.choice(d, 200, replace=False)),
                                      "y": mask(rng.choice(d, 200, replace=False))}, layout).p_value[0]
                for _ in range(300)]
    assert 0.01 < np.mean(np.array(p_values) < 0.05) < 0.10  # about 5 % by chance (discrete: conservative)


def test_regions_page_draws_the_stability_curves(tmp_path: Path) -> None:
    from test_app_runs import chart, open_page

    overrides = ['run.methods=["cpift"]', "probe.snapshot_every=1", "probe.steps=2", 'data.tasks=["math", "code"]']
    run = run_config(load_config(ROOT / "configs" / "tiny.toml", overrides), tmp_path / "run", progress=False)
    at = open_page("regions", run.path)
    figures = [chart(at, i) for i in range(len(at.get("plotly_chart")))]
    stability_chart = next(f for f in figures if "stability" in f.layout.title.text)
    assert {t.name for t in stability_chart.data} == {"math", "code"}
    assert list(stability_chart.data[0].y)[-1] == 1.0
    said = " ".join(str(e.value) for e in [*at.warning, *at.caption])
    assert "halfway point" in said
    assert any(a.text == "chance" for a in stability_chart.layout.annotations)  # the chance level, dashed


def test_halfway_says_whether_a_core_had_settled() -> None:
    from cpift.probes import halfway

    assert halfway({"step": [2, 4, 6, 8, 10], "jaccard_to_final": [0.1, 0.3, 0.85, 0.9, 1.0]}) == (4, 0.3, False)
    assert halfway({"step": [10, 20, 30, 40], "jaccard_to_final": [0.5, 0.82, 0.9, 1.0]}) == (20, 0.82, True)
    assert halfway({"step": [3], "jaccard_to_final": [1.0]}) == (3, 1.0, True)  # one snapshot: nothing to compare
