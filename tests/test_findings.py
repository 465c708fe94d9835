"""The study in miniature: the tiny model with the study's methods, two seeds and a τ sweep, then
`cpift findings` — every claim gets a measurement, an n and a verdict the interval supports."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cpift.cli import main
from cpift.config import load_config
from cpift.findings import VERDICTS, Finding, findings, findings_figures, tau_sweep, to_markdown
from cpift.pipeline import run_config
from cpift.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent

MINIATURE = ['run.methods=["multitask", "multistage", "cpift", "gallop", "saft", "sequential"]', "run.seeds=[0, 1]",
             "cpift.tau_sweep=[0, 1]", "probe.snapshot_every=1", 'sequential.methods=["multitask", "cpift"]',
             "eval.probes=false", 'data.tasks=["math", "logic", "format"]', 'sequential.second="logic"']


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    config = load_config(ROOT / "configs" / "tiny.toml", MINIATURE)
    return run_config(config, tmp_path_factory.mktemp("study") / "run", progress=False)


def test_the_study_config_is_valid_and_sized_for_its_budget() -> None:
    from cpift.estimate import planned_work

    config = load_config(ROOT / "configs" / "study.toml")
    assert len(config.run.all_seeds) >= 3 and config.data.n_eval >= 200
    steps, models = planned_work(config)
    assert sum(models.values()) <= 34  # ≈ 4 min each on 2 cores (configs/study.toml)
    assert config.probe.optimizer == "sgd" and not config.eval.probes


def test_every_claim_has_a_measurement_and_a_verdict(study: RunDir) -> None:
    found = findings(study)
    assert len(found) == 10 and all(isinstance(f, Finding) for f in found)
    assert all(f.verdict in VERDICTS and f.claim and f.rule for f in found)
    by_claim = {f.claim: f for f in found}
    first = by_claim["CPI-FT beats Full-SFT multi-task on the normalised average"]
    assert first.verdict != "not tested" and "difference" in first.measured and "× 2 seeds" in first.n
    heuristic = by_claim["CPI-FT beats multi-stage SFT (heuristic order)"]
    assert heuristic.verdict == "not tested"  # the run's multi-stage used the random order
    sequential = next(f for f in found if f.claim.startswith("Sequential"))
    assert "A = math, B = logic" in sequential.measured and sequential.verdict != "not tested"
    assert "test–retest" in by_claim["Core overlap follows task relatedness"].measured or \
        by_claim["Core overlap follows task relatedness"].verdict == "not tested"


def test_a_difference_claim_follows_its_interval(study: RunDir) -> None:
    from cpift.scores import paired_comparisons, read_items

    rows = paired_comparisons(read_items(study), "multitask")
    row = rows[(rows.model == "cpift") & (rows.task == "normalised_average")].iloc[0]
    expected = "holds" if row.low > 0 else "does not hold" if row.high <= 0 else "inconclusive"
    assert findings(study)[0].verdict == expected


def test_tau_sweep_pools_each_seeds_model_for_every_tau(study: RunDir) -> None:
    sweep = tau_sweep(study)
    assert list(sweep.tau) == [0.1, 1.0]  # against τ = 0, the reference
    assert all(len(groups) == 2 for groups in sweep.groups)  # one count per seed
    assert (sweep.n_seeds == 2).all() and (sweep.low <= sweep.difference).all()
    groups = study.read_json("groups.json")
    assert [row["tau"] for row in groups["sweep"]] == [0.0, 1.0]
    assert groups["sweep"][0]["groups"] == [["math", "logic", "format"]]


def test_findings_cli_prints_the_table_and_writes_the_figures(study: RunDir, tmp_path: Path, capsys) -> None:
    assert main(["findings", str(study.path), "--figures", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| # | Claim |") and out.count("\n| ") >= 10 and "Rules:" in out
    assert {p.stem for p in (tmp_path / "figures").iterdir()} == {"tau_sweep", "forgetting", "overlap_lift"}
    assert main(["findings", str(study.path), "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["verdict"] in VERDICTS for r in records] == [True] * 10
    assert set(findings_figures(study)) == {"tau_sweep", "forgetting", "overlap_lift"}


def test_findings_of_a_run_without_scores_is_one_clear_error(tmp_path: Path, capsys) -> None:
    run = RunDir.create(tmp_path / "empty", load_config(ROOT / "configs" / "tiny.toml").to_dict())
    assert main(["findings", str(run.path)]) == 2
    assert "no metrics.json yet" in capsys.readouterr().err


def test_markdown_escapes_pipes() -> None:
    text = to_markdown([Finding("a | b", "p", "m", "n", "inconclusive", "r")])
    assert "a \\| b" in text and pd.notna(text)


def test_compare_page_and_report_show_the_findings(study: RunDir, tmp_path: Path) -> None:
    from test_app_explore import figures
    from test_app_runs import open_page

    from cpift.report import export_report

    at = open_page("compare", study.path)
    shown = next(d.value for d in at.dataframe if "verdict" in d.value.columns)
    assert list(shown.verdict) == [f.verdict for f in findings(study)]
    sweep = next(fig for title, fig in figures(at).items() if title.startswith("τ sweep"))
    assert list(sweep.data[0].x) == [0.1, 1.0] and sweep.data[0].error_y.array is not None
    text = export_report([study.path], tmp_path / "report.html").read_text()
    assert "Findings: the papers' claims" in text and "CPI-FT beats Full-SFT multi-task" in text


def test_the_tau_claims_name_the_best_tau_and_the_papers(study: RunDir) -> None:
    by_claim = {f.claim: f for f in findings(study)}
    helps = by_claim["Grouping helps: some τ > 0 beats τ = 0 (all tasks in one group)"]
    near = by_claim["The best τ is near the paper's 0.1"]
    assert "τ = 1 (3 groups)" in helps.measured and "1 group)" in near.measured or "best: τ" in near.measured
    sweep = tau_sweep(study)
    best = sweep.loc[sweep.difference.idxmax()]
    assert f"best: τ = {best.tau:g}" in near.measured
    assert near.verdict in ("holds", "does not hold", "inconclusive")
