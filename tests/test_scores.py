"""From per-item results to reported numbers: intervals in the summary, paired comparisons, the
compare table's text, on hand-made items whose answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cpift.config import load_config
from cpift.errors import FormatError, ParameterError
from cpift.runs import ITEM_COLUMNS, RunDir
from cpift.scores import (AFTER_A, compare, formatted, item_samples, paired_comparisons, summarize, wide,
                          write_metrics)

RNG = np.random.default_rng(0)


def _items(model: str, task: str, scores, seed: int = 0, metric: str = "accuracy", weights=None) -> pd.DataFrame:
    n = len(scores)
    return pd.DataFrame({"model": model, "seed": seed, "task": task, "metric": metric, "item": range(n),
                         "score": np.asarray(scores, float), "weight": np.ones(n) if weights is None else weights,
                         "prediction": ""}, columns=list(ITEM_COLUMNS))


def _scores(items: pd.DataFrame) -> pd.DataFrame:
    weighted = items.assign(w=items.score * items.weight)
    sums = weighted.groupby(["model", "seed", "task", "metric"], sort=False)[["w", "weight"]].sum()
    table = (sums.w / sums.weight).rename("score").reset_index()
    table["n"] = items.groupby(["model", "seed", "task", "metric"], sort=False).size().to_numpy()
    return table


def _run_items() -> pd.DataFrame:
    base = RNG.random(200) < 0.3
    better = base | (RNG.random(200) < 0.4)   # the trained model gets many more right
    parts = [_items("base", "math", base), _items("base", "code", RNG.random(50) < 0.5)]
    for seed in (0, 1, 2):
        parts += [_items("tuned", "math", better, seed), _items("tuned", "code", RNG.random(50) < 0.5, seed)]
    prose = RNG.random((2, 8)) * 0.5 + 0.2
    parts += [_items("base", "retention", prose[0], metric="next_token_accuracy", weights=np.arange(1, 9))]
    parts += [_items("tuned", "retention", prose[1], seed, "next_token_accuracy", np.arange(1, 9)) for seed in (0, 1, 2)]
    return pd.concat(parts, ignore_index=True)


def test_summary_intervals_match_the_statistics() -> None:
    items = _run_items()
    summary = summarize(_scores(items), items)
    assert summary["level"] == 0.95
    assert summary["n"] == {"items": {"math": 200, "code": 50}, "seeds": {"base": 1, "tuned": 3}}
    k = int(items[(items.model == "base") & (items.task == "math")].score.sum())
    wilson = sps.binomtest(k, 200).proportion_ci(method="wilson")
    assert summary["intervals"]["scores"]["base"]["math"] == pytest.approx([wilson.low, wilson.high])
    for model in ("base", "tuned"):
        low, high = summary["intervals"]["normalised_average"][model]
        assert low <= summary["normalised_average"][model] <= high
        low, high = summary["intervals"]["retention"][model]["next_token_accuracy"]
        assert low <= summary["retention"][model]["next_token_accuracy"] <= high
    assert summary["intervals"]["seesaw"]["tuned"]["math"][0] > 0  # the gain on math is clear
    assert summary["seesaw_p"]["tuned"]["math"] <= 2 / 2001  # two-sided, at the permutation test's floor
    assert summary["intervals"]["mean_forget_ratio"]["base"] == [0.0, 0.0]
    low, high = summary["intervals"]["mean_forget_ratio"]["tuned"]
    assert 0 <= low <= high
    pd.io.json.ujson_dumps(summary)  # JSON-able


def test_paired_comparisons_use_mcnemar_for_one_seed_of_binary_scores() -> None:
    a = RNG.random(100) < 0.6
    b = RNG.random(100) < 0.4
    items = pd.concat([_items("m", "t", a), _items("ref", "t", b)])
    table = paired_comparisons(items, "ref").set_index("task")
    discordant_b, discordant_c = int((a & ~b).sum()), int((~a & b).sum())
    expected = sps.binomtest(discordant_b, discordant_b + discordant_c, 0.5).pvalue
    assert table.loc["t", "test"] == "mcnemar-exact"
    assert table.loc["t", "p_value"] == pytest.approx(expected)
    assert table.loc["t", "difference"] == pytest.approx(a.mean() - b.mean())
    assert table.loc["normalised_average", "difference"] == pytest.approx(10 * (a.mean() - b.mean()))
    assert table.loc["t", "excludes_zero"] == (table.loc["t", "low"] > 0 or table.loc["t", "high"] < 0)
    with pytest.raises(ParameterError, match="no model 'other'"):
        paired_comparisons(items, "other")


def test_sequential_view_pairs_each_variant_with_after_a_and_the_base() -> None:
    right, wrong = np.ones(40), np.zeros(40)
    items = pd.concat([_items("base", "A", wrong), _items("base", "B", wrong),
                       _items(AFTER_A, "A", right), _items(AFTER_A, "B", wrong),
                       _items("seq:multitask", "A", wrong), _items("seq:multitask", "B", right),
                       _items("seq:cpift", "A", right), _items("seq:cpift", "B", right)])
    view = summarize(_scores(items), items, sequential=("A", "B"))["sequential"]
    assert view["first"] == "A" and view["second"] == "B"
    forgot = view["variants"]["multitask"]["delta_A"]
    assert forgot["mean"] == -1 and forgot["high"] < 0 and forgot["p_value"] < 1e-6
    kept = view["variants"]["cpift"]["delta_A"]
    assert kept["mean"] == 0 and kept["p_value"] == 1.0
    assert view["variants"]["cpift"]["delta_B"]["mean"] == 1


def test_seeds_must_share_their_items() -> None:
    items = pd.concat([_items("m", "t", [1, 0, 1], 0), _items("m", "t", [1, 0], 1)])
    with pytest.raises(FormatError, match="not scored on the same items"):
        item_samples(items, "m")


def test_compare_text_flags_wide_intervals(tmp_path) -> None:
    run = RunDir.create(tmp_path / "run", load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml").to_dict())
    items = pd.concat([_items("base", "few", [1, 0, 1, 0]), _items("base", "many", RNG.random(2000) < 0.5)])
    write_metrics(run, _scores(items), items)
    rows = compare([run.path])
    assert rows.set_index("measure").loc["few", "n_items"] == 4
    text = formatted(rows)
    assert list(text.columns[:3]) == ["seeds", "few (n=4)", "many (n=2000)"]
    assert text.loc["base", "few (n=4)"].endswith("!")  # four items cannot rank anything
    assert not text.loc["base", "many (n=2000)"].endswith("!")
    assert wide(rows).loc["base", "few"] == 0.5
