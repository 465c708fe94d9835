"""The comparison and training figures: built from whatever models the metrics hold, values exact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cpift.errors import FormatError, ParameterError
from cpift.plots import loss_figure, pareto_figure, retention_figure, scores_figure, seesaw_figure, sequential_figure
from cpift.plots.compare import merge_metrics, pareto_table, scores_table, sequential_table

# A run's metrics.json as cpift.scores.summarize writes it, with methods no list in the app names.
SCORES = {
    "base": {"math": 0.2, "code": 0.4},
    "gallop": {"math": 0.6, "code": 0.3},
    "epi": {"math": 0.5, "code": 0.5},
    "seq:after_A": {"math": 0.7, "code": 0.1},
    "seq:multitask": {"math": 0.3, "code": 0.8},
    "seq:cpift": {"math": 0.6, "code": 0.6},
}
METRICS = {
    "scores": SCORES,
    "normalised_average": {m: 10 * np.mean(list(s.values())) for m, s in SCORES.items()},
    "seesaw": {m: {t: v - SCORES["base"][t] for t, v in s.items()} for m, s in SCORES.items()},
    "retention": {m: {"next_token_accuracy": 0.4 - 0.05 * i, "retention_qa": 0.9 - 0.1 * i, "perplexity": 20.0 + i}
                  for i, m in enumerate(SCORES)},
    "forgetting": {m: {"forget_ratio": {"next_token_accuracy": 0.1 * i}, "mean_forget_ratio": 0.1 * i,
                       "collapse_rate": 0.0} for i, m in enumerate(SCORES)},
}


def test_scores_figure_draws_every_model_of_the_run():
    fig = scores_figure(METRICS)
    assert [t.name for t in fig.data] == list(SCORES)
    gallop = next(t for t in fig.data if t.name == "gallop")
    assert list(gallop.x) == ["math", "code"] and list(gallop.y) == [0.6, 0.3]
    table = scores_table(METRICS)
    assert table.loc["epi", "normalised_average"] == pytest.approx(5.0)


def test_seesaw_is_the_change_against_the_base():
    heat = seesaw_figure(METRICS).data[0]
    assert list(heat.y) == [m for m in SCORES if m != "base"]
    z = np.array(heat.z)
    assert z[list(heat.y).index("gallop")] == pytest.approx([0.4, -0.1])
    assert heat.zmid == 0 and heat.zmin == -heat.zmax
    with pytest.raises(ParameterError, match="base model was not scored"):
        seesaw_figure({"scores": SCORES})


def test_retention_leaves_out_perplexity_and_marks_the_forget_ratio():
    fig = retention_figure(METRICS)
    names = [t.name for t in fig.data]
    assert names == ["next_token_accuracy", "retention_qa", "mean forget ratio"]
    assert list(fig.data[2].y) == pytest.approx([0.1 * i for i in range(len(SCORES))])
    with pytest.raises(ParameterError, match="no retention"):
        retention_figure({"scores": SCORES, "retention": {}})


def test_pareto_front_holds_exactly_the_undominated_models():
    table = pareto_table(METRICS)
    ood = {m: np.mean([0.4 - 0.05 * i, 0.9 - 0.1 * i]) for i, m in enumerate(SCORES)}
    assert table["out_of_distribution"].to_dict() == pytest.approx(ood)
    points = table[["in_distribution", "out_of_distribution"]].to_numpy()
    for i, model in enumerate(table.index):  # brute force: dominated by some other point?
        dominated = any((points[j] >= points[i]).all() and (points[j] > points[i]).any() for j in range(len(points)))
        assert table.loc[model, "pareto"] == (not dominated)
    fig = pareto_figure(METRICS)
    front = fig.data[0]
    assert list(front.x) == sorted(table.loc[table["pareto"], "in_distribution"])
    assert {t.name for t in fig.data[1:]} == set(SCORES)


def test_sequential_table_forgetting_and_learning():
    table = sequential_table(METRICS, "math", "code").set_index("variant")
    assert list(table.index) == ["multitask", "cpift"]
    assert table.loc["multitask", "delta_A"] == pytest.approx(0.3 - 0.7)
    assert table.loc["cpift", "delta_A"] == pytest.approx(0.6 - 0.7)
    assert table.loc["cpift", "delta_B"] == pytest.approx(0.6 - 0.4)
    fig = sequential_figure(table.reset_index(), "math", "code")
    assert list(fig.data[0].y) == pytest.approx([-0.4, -0.1])
    empty = sequential_table({"scores": {"base": {"math": 0.1}}}, "math", "code")
    with pytest.raises(ParameterError, match="no sequential"):
        sequential_figure(empty, "math", "code")


def test_merged_runs_prefix_models_and_keep_each_runs_base():
    other = {**METRICS, "scores": {**SCORES, "base": {"math": 0.0, "code": 0.0}}}
    merged = merge_metrics({"a": METRICS, "b": other})
    assert list(merged["scores"])[:2] == ["a/base", "a/gallop"] and "b/seq:cpift" in merged["scores"]
    table = sequential_table(merged, "math", "code")
    assert sorted(set(table["run"])) == ["a", "b"]
    b = table[(table["run"] == "b") & (table["variant"] == "cpift")].iloc[0]
    assert b["delta_B"] == pytest.approx(0.6)  # against b's own base (0.0)
    assert merge_metrics({"a": METRICS}) == METRICS
    with pytest.raises(FormatError, match="'broken'"):
        merge_metrics({"a": METRICS, "broken": {"normalised_average": {}}})


def test_loss_figure_one_trace_per_stage_and_the_lr_below():
    losses = pd.DataFrame({"stage": ["probe/math"] * 2 + ["cpift/stage1"] * 3, "step": [1, 2, 1, 2, 3],
                           "steps": [2, 2, 3, 3, 3], "loss": [3.0, 2.5, 2.4, 2.2, 2.0],
                           "lr": [0.0, 1e-3, 0.0, 1e-3, 5e-4], "n": [1, 2, 3, 4, 5]})
    fig = loss_figure(losses)
    loss_traces = [t for t in fig.data if t.yaxis == "y"]
    lr_traces = [t for t in fig.data if t.yaxis == "y2"]
    assert [t.name for t in loss_traces] == ["probe/math", "cpift/stage1"]
    assert list(loss_traces[1].x) == [3, 4, 5] and list(loss_traces[1].y) == [2.4, 2.2, 2.0]
    assert list(lr_traces[0].y) == [0.0, 1e-3]
