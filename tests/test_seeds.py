"""Seeds as an axis of a run (run.seeds): every method once per seed in one run directory, per-item
results, intervals in metrics.json and `cpift compare`, paired comparisons, resume and pack."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cpift.cli import main
from cpift.config import load_config
from cpift.estimate import planned_work
from cpift.explore import run_progress
from cpift.models import WEIGHTS_FILE
from cpift.pipeline import pack_run, run_config
from cpift.runs import ITEM_COLUMNS, ITEMS, RunDir, seed_dir
from cpift.scores import compare, paired_comparisons, read_items, wide

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
TWO_SEEDS = ['run.methods=["multitask", "cpift", "sequential"]', "run.seeds=[0, 1]", "train.steps=4",
             "probe.steps=2", "sequential.methods=[\"multitask\", \"cpift\"]"]


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory) -> RunDir:
    return run_config(load_config(TINY, TWO_SEEDS), tmp_path_factory.mktemp("seeds") / "run", progress=False)


def test_every_method_once_per_seed(seeded_run: RunDir) -> None:
    run = seeded_run
    assert run.status == "done"
    for root in (run.path, run.path / seed_dir(1)):
        assert (root / "methods" / "multitask" / "final" / WEIGHTS_FILE).is_file()
        assert (root / "regions" / "manifest.json").is_file()
        assert (root / "sequential" / "after_A" / WEIGHTS_FILE).is_file()
    steps = [e for e in run.events("step")]
    assert {e["seed"] for e in steps} == {0, 1}
    assert {(e["seed"], e["method"]) for e in run.events("method_done")} == {
        (s, m) for s in (0, 1) for m in ("multitask", "cpift", "sequential")}
    progress = run_progress(run.path)
    assert progress.seeds == (0, 1) and progress.methods_done == ("multitask", "cpift", "sequential")
    config = load_config(TINY, TWO_SEEDS)
    steps_one = planned_work(load_config(TINY, [*TWO_SEEDS[:1], *TWO_SEEDS[2:]]))[0]
    assert planned_work(config)[0]["multitask"] == 2 * steps_one["multitask"]


def test_items_are_the_ground_truth_of_the_metrics(seeded_run: RunDir) -> None:
    items = read_items(seeded_run)
    assert tuple(items.columns) == ITEM_COLUMNS
    assert items.seed.dtype == "int64" and items.item.dtype == "int64" and items.score.dtype == "float64"
    assert items.score.between(0, 1).all()
    assert set(items[items.model == "multitask"].seed) == {0, 1}
    assert set(items[items.model == "base"].seed) == {0}  # scored once, shared by the seeds
    per_seed = items[(items.model == "multitask") & (items.task == "math")].groupby("seed").item.apply(list)
    assert per_seed[0] == per_seed[1]  # every seed scored on the same items
    metrics = json.loads((seeded_run.path / "metrics.csv").with_name("metrics.json").read_text())
    math = items[(items.model == "multitask") & (items.task == "math")]
    assert metrics["scores"]["multitask"]["math"] == pytest.approx(math.groupby("seed").score.mean().mean())
    assert metrics["n"]["seeds"]["multitask"] == 2 and metrics["n"]["seeds"]["base"] == 1
    assert metrics["n"]["items"]["math"] == 4
    low, high = metrics["intervals"]["scores"]["multitask"]["math"]
    assert low <= metrics["scores"]["multitask"]["math"] <= high
    low, high = metrics["intervals"]["normalised_average"]["cpift"]
    assert low <= metrics["normalised_average"]["cpift"] <= high
    assert set(metrics["seesaw_p"]["multitask"]) == {"math", "code", "logic", "format"}
    assert set(metrics["sequential"]["variants"]) == {"multitask", "cpift"}
    scores = pd.read_csv(seeded_run.path / "metrics.csv")
    assert set(scores[scores.model == "cpift"].seed) == {0, 1}


def test_compare_prints_intervals_and_paired_differences(seeded_run: RunDir, capsys) -> None:
    rows = compare([seeded_run.path])
    assert rows[["low", "high"]].notna().any().all()
    assert wide(rows).loc["multitask", "math"] == pytest.approx(
        json.loads((seeded_run.path / "metrics.json").read_text())["scores"]["multitask"]["math"])
    assert main(["compare", str(seeded_run.path)]) == 0
    out = capsys.readouterr().out
    assert "[" in out and "math (n=4)" in out and "interval" in out
    assert main(["compare", str(seeded_run.path), "--vs", "multitask", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    cpift_average = next(r for r in records if r["model"] == "cpift" and r["task"] == "normalised_average")
    assert cpift_average["n_seeds"] == 2 and cpift_average["low"] <= cpift_average["difference"] <= cpift_average["high"]
    table = paired_comparisons(read_items(seeded_run), "multitask")
    assert "multitask" not in set(table.model) and {"cpift", "base"} <= set(table.model)
    assert main(["compare", str(seeded_run.path), "--vs", "nosuch"]) == 2
    assert "no model 'nosuch'" in capsys.readouterr().err


def test_resume_does_not_retrain_any_seed(seeded_run: RunDir) -> None:
    before = len(seeded_run.events("step"))
    run_config(load_config(TINY, TWO_SEEDS), seeded_run.path, resume=True, progress=False)
    assert len(seeded_run.events("step")) == before


def test_pack_keeps_items_and_every_seed_without_weights(seeded_run: RunDir, tmp_path: Path) -> None:
    packed = pack_run(seeded_run.path, tmp_path / "packed")
    assert (packed / ITEMS).is_file()
    assert (packed / seed_dir(1) / "regions" / "manifest.json").is_file()
    assert not list(packed.rglob(WEIGHTS_FILE)) and not list(packed.rglob("checkpoints"))
    assert compare([packed]).drop(columns="run").equals(compare([seeded_run.path]).drop(columns="run"))


def test_a_smaller_pack_keeps_the_primary_cores_and_the_seeds_retest(seeded_run: RunDir, tmp_path: Path) -> None:
    from cpift.explore import run_reliability
    from cpift.regions import CoreRegions

    full = run_reliability(seeded_run)
    assert list(full.columns) == ["task", "seed", "jaccard", "expected", "lift"] and set(full.seed) == {1}
    assert main(["pack", str(seeded_run.path), "--out", str(tmp_path / "small"), "--max-p", "0.5",
                 "--primary-regions-only"]) == 0
    small = RunDir.open(tmp_path / "small")
    assert not (small.path / seed_dir(1) / "regions").exists()
    assert CoreRegions.load(small.path / "regions").max_p == 0.5
    assert run_reliability(small).equals(full)  # kept as reliability.json


def test_compare_page_draws_error_bars_and_a_paired_table(seeded_run: RunDir) -> None:
    from test_app_runs import chart, open_page, texts

    at = open_page("compare", seeded_run.path)
    metrics = json.loads((seeded_run.path / "metrics.json").read_text())
    scores = chart(at, 0)
    first = scores.data[0]
    low, high = metrics["intervals"]["scores"][first.name][first.x[0]]
    assert first.error_y.array[0] == pytest.approx(high - first.y[0])
    assert first.error_y.arrayminus[0] == pytest.approx(first.y[0] - low)
    assert "too few items to rank" in str(scores.layout.annotations)  # 4 items per task
    paired = next(d.value for d in at.dataframe if "excludes_zero" in d.value.columns)
    assert {"cpift", "base"} <= set(paired.model) and "multitask" not in set(paired.model)
    assert "mcnemar" in texts(at.caption).lower() or "McNemar" in texts(at.caption)


def test_sequential_study_and_report_carry_intervals(seeded_run: RunDir, tmp_path: Path) -> None:
    from cpift.plots.compare import sequential_figure, sequential_table
    from cpift.report import export_report

    metrics = json.loads((seeded_run.path / "metrics.json").read_text())
    table = sequential_table(metrics, "math", "code")
    assert {"delta_A_low", "delta_A_high", "delta_B_p_value"} <= set(table.columns)
    assert (table.delta_A_low <= table.delta_A).all() and (table.delta_A <= table.delta_A_high).all()
    assert sequential_figure(table, "math", "code").data[0].error_y.visible
    page = export_report([seeded_run.path], tmp_path / "report.html").read_text()
    assert "Paired comparison against multitask" in page and "McNemar" in page
