"""Forgetting metrics (forget ratio, collapse rate) on a hand-computed example, the zero-shot
retention task in the scores, and the new columns of `cpift compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from cpift.cli import main
from cpift.config import load_config
from cpift.data import RETENTION_TASK, get_task, retention_task
from cpift.errors import ParameterError
from cpift.evaluate import evaluate_model
from cpift.models import tiny_llama, tiny_tokenizer
from cpift.scores import COLLAPSE_THRESHOLD, compare, forgetting, summarize, wide, write_metrics
from cpift.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]

# Retention accuracies: next-token accuracy on prose, the zero-shot questions, and a task the base
# scores 0 on (nothing to forget: left out). Perplexity rows must be ignored.
RETENTION = {
    #          next_token  retention_qa  other  perplexity
    "base": (0.40, 1.00, 0.0, 10.0),
    "a": (0.30, 0.50, 0.3, 12.0),   # FR 0.25, 0.5 → mean 0.375; nothing collapsed
    "b": (0.50, 0.00, 0.0, 9.0),    # FR 0 (a gain is clipped), 1 → mean 0.5; the questions collapsed
    "c": (0.01, 0.04, 0.0, 90.0),   # FR 0.975, 0.96 → mean 0.9675; both ≤ 5 % of vanilla: collapse 1
    "d": (0.03, 0.06, 0.0, 50.0),   # FR 0.925, 0.94; 0.03 > 0.02 and 0.06 > 0.05: collapse 0
}
EXPECTED = {
    "base": ({"next_token_accuracy": 0.0, RETENTION_TASK: 0.0}, 0.0, 0.0),
    "a": ({"next_token_accuracy": 0.25, RETENTION_TASK: 0.5}, 0.375, 0.0),
    "b": ({"next_token_accuracy": 0.0, RETENTION_TASK: 1.0}, 0.5, 0.5),
    "c": ({"next_token_accuracy": 0.975, RETENTION_TASK: 0.96}, 0.9675, 1.0),
    "d": ({"next_token_accuracy": 0.925, RETENTION_TASK: 0.94}, 0.9325, 0.0),
}


def _scores() -> pd.DataFrame:
    rows = []
    for model, (nta, qa, other, ppl) in RETENTION.items():
        rows.append({"model": model, "task": "math", "metric": "accuracy", "score": 0.5, "n": 4})
        for metric, value in (("next_token_accuracy", nta), (RETENTION_TASK, qa), ("other", other),
                              ("perplexity", ppl)):
            rows.append({"model": model, "task": "retention", "metric": metric, "score": value, "n": 10})
    return pd.DataFrame(rows)


def test_summary_matches_hand_computed_values() -> None:
    summary = summarize(_scores())
    assert summary["collapse_threshold"] == COLLAPSE_THRESHOLD == 0.05
    assert list(summary["forgetting"]) == list(EXPECTED)
    for model, (ratios, mean, collapse) in EXPECTED.items():
        got = summary["forgetting"][model]
        assert set(got) == {"forget_ratio", "mean_forget_ratio", "collapse_rate"}
        assert got["forget_ratio"] == pytest.approx(ratios)
        assert got["mean_forget_ratio"] == pytest.approx(mean)
        assert got["collapse_rate"] == pytest.approx(collapse)
    json.dumps(summary, allow_nan=False)  # plain JSON, no NaN


def test_threshold_and_missing_scores() -> None:
    accuracy = pd.DataFrame({"x": [0.5, 0.05, float("nan")], "y": [0.8, 0.8, 0.0]}, index=["base", "m", "n"])
    # m: x at 10 % of vanilla collapses only at a threshold ≥ 0.1; n: x not scored, y collapsed.
    assert forgetting(accuracy)["m"]["collapse_rate"] == 0.0
    assert forgetting(accuracy, threshold=0.1)["m"]["collapse_rate"] == 0.5
    assert forgetting(accuracy)["n"] == {"forget_ratio": {"y": 1.0}, "mean_forget_ratio": 1.0, "collapse_rate": 1.0}
    with pytest.raises(ParameterError, match="vanilla model 'vanilla'"):
        forgetting(accuracy, base="vanilla")
    with pytest.raises(ParameterError, match="threshold"):
        forgetting(accuracy, threshold=1.0)


def test_no_retention_scores_means_no_forgetting_view() -> None:
    scores = _scores()
    summary = summarize(scores[scores.task != "retention"])
    assert "forgetting" not in summary and "collapse_threshold" not in summary


def test_zero_shot_questions_are_a_retention_row() -> None:
    task = get_task("math", n_train=2, n_eval=2, seed=0)
    scores = evaluate_model(tiny_llama(0), tiny_tokenizer(), "base", [task], retention_texts=["Some prose text."],
                            retention_tasks=[retention_task()], max_new_tokens=2).scores
    rows = {(t, m): n for t, m, n in zip(scores.task, scores.metric, scores.n)}
    assert set(rows) == {("math", task.metric), ("retention", RETENTION_TASK),
                         ("retention", "next_token_accuracy"), ("retention", "perplexity")}
    assert rows[("retention", RETENTION_TASK)] == len(retention_task().eval)
    assert list(summarize(scores)["scores"]["base"]) == ["math"]  # not among the trained tasks


def test_compare_shows_forgetting_columns(tmp_path: Path, capsys) -> None:
    config = load_config(ROOT / "configs" / "tiny.toml")
    run = RunDir.create(tmp_path / "run", config.to_dict())
    write_metrics(run, _scores())
    table = wide(compare([run.path]))
    for model, (_, mean, collapse) in EXPECTED.items():
        assert table.loc[model, "mean_forget_ratio"] == pytest.approx(mean)
        assert table.loc[model, "collapse_rate"] == pytest.approx(collapse)
    assert main(["compare", str(run.path)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "mean_forget_ratio" in header and "collapse_rate" in header
