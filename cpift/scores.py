"""From per-item results to the numbers a run reports: scores with intervals, comparisons.

A run keeps every scored item (``items.parquet``, :data:`cpift.runs.ITEM_COLUMNS`) and the
scores they average to (``metrics.csv``). :func:`summarize` turns them into the reported views
(``metrics.json``), each with a 95 % interval; :func:`paired_comparisons` compares models item by
item against a reference; :func:`compare` gathers the headline numbers of one or more runs.

Definitions (choices the papers leave open):

- Normalised average: every task metric lies in [0, 1]; the normalised average is the mean over
  the trained tasks of 10 × score, a 0–10 scale like the paper's tables.
- Seesaw: score − the base model's score, per task.
- Seeds: a model trained with several seeds scores the mean over seeds (every seed is scored on
  the same items). Intervals come from :mod:`cpift.stats`: Wilson for one seed's accuracy, else
  a hierarchical bootstrap (seeds, then items within each seed); the normalised average and the
  forget ratio are bootstrapped the same way. Differences between two models are paired by item
  (exact McNemar for one seed of binary scores, a sign-flip permutation test otherwise).
- Forgetting (the GaLLoP paper's metrics), against the untuned base ("vanilla") model, over the
  retention tasks: every retention score that is an accuracy — next-token accuracy on the
  held-out prose and the zero-shot questions' accuracy (perplexity is not an accuracy and takes
  no part). Forget Ratio of a task = max(0, (Acc_vanilla − Acc) / Acc_vanilla), 0 meaning no
  forgetting, with Acc the mean over seeds; the mean is over the retention tasks. Collapse Rate =
  the share of retention tasks whose accuracy fell to about 0, where "about 0" is here an
  accuracy at most :data:`COLLAPSE_THRESHOLD` (5 %) *of the vanilla accuracy*, i.e. a forget ratio
  ≥ 0.95. A relative threshold treats retention tasks with different vanilla levels alike (the
  prose's next-token accuracy is far below the questions' accuracy, which starts near 1). A
  retention task the base scores 0 on has nothing to forget and is left out. The mean forget
  ratio's interval bootstraps the base and the model independently (a conservative choice: their
  scores on the same items are positively correlated).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .atomic import atomic_write_bytes
from .errors import FormatError, ParameterError
from .evaluate import RETENTION, Evaluation
from .runs import ITEMS, METRICS_CSV, METRICS_JSON, RunDir
from .stats import bootstrap_means, paired_difference, percentile_interval, score_interval

LEVEL = 0.95
"""The confidence level of every interval cpift reports."""
RETENTION_LOSSES = ("perplexity",)
"""Retention metrics that are not accuracies (lower is better): left out of the forgetting metrics."""
COLLAPSE_THRESHOLD = 0.05
"""A retention task has collapsed when its accuracy is at most this fraction of the vanilla accuracy."""
NORMALISED_AVERAGE = "normalised_average"
SEQUENTIAL_PREFIX = "seq:"
"""The sequential study's models (:mod:`cpift.methods.sequential`): ``seq:after_A`` after task A,
and ``SEQUENTIAL_PREFIX + variant`` after B."""
AFTER_A = f"{SEQUENTIAL_PREFIX}after_A"
WIDE_INTERVAL = 0.10
"""An interval wider than ± this (10 points of accuracy) is too wide to rank models by."""

Samples = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
"""(task, metric) → (scores, weights), each of shape (seeds, items), seeds in ascending order."""


def item_samples(items: pd.DataFrame, model: str) -> Samples:
    """One model's item scores and weights per (task, metric), as seeds × items arrays.

    Raises:
        FormatError: the seeds of a task were not scored on the same items.
    """
    out: Samples = {}
    for (task, metric), group in items[items.model == model].groupby(["task", "metric"], sort=False):
        scores = group.pivot(index="seed", columns="item", values="score").sort_index()
        weights = group.pivot(index="seed", columns="item", values="weight").sort_index()
        if scores.isna().any().any():
            raise FormatError(f"model {model!r}, task {task!r}: its seeds were not scored on the same items")
        out[(task, metric)] = (scores.to_numpy(float), weights.to_numpy(float))
    return out


def forgetting(accuracy: pd.DataFrame, base: str = "base", threshold: float = COLLAPSE_THRESHOLD) -> dict:
    """Forget ratios and collapse rate of every model against the ``base`` (vanilla) model.

    Args:
        accuracy: models × retention tasks, each cell an accuracy in [0, 1] (NaN: not scored);
            the ``base`` row is the vanilla model.
        base: the vanilla model's row.
        threshold: a task has collapsed when its accuracy is ≤ ``threshold`` × the vanilla
            accuracy (see the module docstring), in [0, 1).

    Returns:
        ``{model: {"forget_ratio": {task: max(0, (Acc_vanilla − Acc) / Acc_vanilla)},
        "mean_forget_ratio": mean over the tasks, "collapse_rate": share of the tasks collapsed}}``
        over the retention tasks the base scores above 0 (nothing to forget elsewhere); a model
        with no such score is left out.

    Raises:
        ParameterError: ``base`` is not a row, or ``threshold`` is outside [0, 1).
    """
    if base not in accuracy.index:
        raise ParameterError(f"the vanilla model {base!r} is not among the models: {', '.join(map(str, accuracy.index))}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise ParameterError(f"threshold must be a number in [0, 1), got {threshold!r}")
    vanilla = accuracy.loc[base]
    vanilla = vanilla[vanilla > 0]
    acc = accuracy[vanilla.index]
    ratio = ((vanilla - acc) / vanilla).clip(lower=0)
    collapsed = (acc <= threshold * vanilla).where(acc.notna())
    out = {}
    for model in accuracy.index:
        ratios = ratio.loc[model].dropna()
        if ratios.empty:
            continue
        out[model] = {"forget_ratio": {task: float(v) for task, v in ratios.items()},
                      "mean_forget_ratio": float(ratios.mean()),
                      "collapse_rate": float(collapsed.loc[model].dropna().astype(float).mean())}
    return out


def _interval(samples: Samples, key: tuple[str, str], level: float) -> list[float]:
    """[low, high] of one (task, metric)'s mean score: weighted items are bootstrapped."""
    scores, weights = samples[key]
    if np.all(weights == 1):
        return list(score_interval(scores, level)[1:])
    replicates = bootstrap_means({"x": scores}, weights={"x": weights})["x"]
    return list(percentile_interval(replicates, level))


def _retention_means(samples: Samples, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Bootstrap replicates of the retention accuracies ``metrics`` of one model."""
    keys = {metric: (RETENTION, metric) for metric in metrics if (RETENTION, metric) in samples}
    if not keys:
        return {}
    return bootstrap_means({m: samples[k][0] for m, k in keys.items()},
                           weights={m: samples[k][1] for m, k in keys.items()})


def _difference(samples: dict[str, Samples], model: str, reference: str, task: str, level: float) -> dict | None:
    """``model`` − ``reference`` on ``task``, paired by item: mean, low, high, p_value (None if
    either was not scored on it)."""
    mine = next((v for k, v in samples.get(model, {}).items() if k[0] == task), None)
    theirs = next((v for k, v in samples.get(reference, {}).items() if k[0] == task), None)
    if mine is None or theirs is None:
        return None
    d = paired_difference(mine[0], theirs[0], level)
    return {"mean": d.mean, "low": d.low, "high": d.high, "p_value": d.p_value}


def _sequential(samples: dict[str, Samples], first: str, second: str, base: str, level: float) -> dict:
    """The A → B study with intervals: per variant, ΔA (its score on A − ``seq:after_A``'s,
    forgetting) and ΔB (on B − the base's, learning), each paired by item."""
    variants = {}
    for model in samples:
        if model.startswith(SEQUENTIAL_PREFIX) and model != AFTER_A:
            variants[model[len(SEQUENTIAL_PREFIX):]] = {
                "delta_A": _difference(samples, model, AFTER_A, first, level),
                "delta_B": _difference(samples, model, base, second, level)}
    return {"first": first, "second": second, "variants": variants}


def _intervals(summary: dict, items: pd.DataFrame, base: str, level: float,
               sequential: tuple[str, str] | None) -> dict:
    """The ``intervals``, ``seesaw_p``, ``n`` and ``sequential`` views of :func:`summarize`."""
    models = list(summary["scores"])
    samples = {m: item_samples(items, m) for m in items.model.unique()}
    out: dict = {"scores": {}, NORMALISED_AVERAGE: {}, "seesaw": {}, "retention": {}, "retention_mean": {},
                 "mean_forget_ratio": {}}
    seesaw_p: dict = {}
    n_items: dict[str, int] = {}
    for model in models:
        mine = samples.get(model, {})
        tasks = {task: key for key in mine if (task := key[0]) != RETENTION and task in summary["scores"][model]}
        out["scores"][model] = {task: _interval(mine, key, level) for task, key in tasks.items()}
        n_items.update({task: mine[key][0].shape[1] for task, key in tasks.items()})
        if tasks:
            replicates = bootstrap_means({task: mine[key][0] for task, key in tasks.items()})
            average = 10 * np.mean([replicates[task] for task in tasks], axis=0)
            out[NORMALISED_AVERAGE][model] = list(percentile_interval(average, level))
        if model != base and base in samples:
            diffs = {task: paired_difference(mine[key][0], samples[base][key][0], level)
                     for task, key in tasks.items() if key in samples[base]}
            out["seesaw"][model] = {task: [d.low, d.high] for task, d in diffs.items()}
            seesaw_p[model] = {task: d.p_value for task, d in diffs.items()}
        out["retention"][model] = {metric: _interval(mine, key, level) for key in mine
                                   if key[0] == RETENTION for metric in [key[1]]}
        accuracies = _retention_means(mine, [k[1] for k in mine if k[0] == RETENTION and k[1] not in RETENTION_LOSSES])
        if accuracies:
            out["retention_mean"][model] = list(percentile_interval(np.mean(list(accuracies.values()), axis=0), level))
    forgetting_view = summary.get("forgetting", {})
    if forgetting_view and base in samples:
        vanilla = _retention_means(samples[base], list(forgetting_view.get(base, {}).get("forget_ratio", {})))
        for model in forgetting_view:
            if model == base:
                out["mean_forget_ratio"][model] = [0.0, 0.0]
                continue
            mine = _retention_means(samples.get(model, {}), list(forgetting_view[model]["forget_ratio"]))
            ratios = [np.clip((vanilla[t] - mine[t]) / vanilla[t], 0, None) for t in mine if t in vanilla]
            if ratios:
                out["mean_forget_ratio"][model] = list(percentile_interval(np.mean(ratios, axis=0), level))
    seeds = items.groupby("model").seed.nunique()
    views = {"intervals": out, "seesaw_p": seesaw_p, "level": level,
             "n": {"items": n_items, "seeds": {m: int(seeds.get(m, 0)) for m in models}}}
    if sequential is not None and AFTER_A in samples:
        views["sequential"] = _sequential(samples, *sequential, base, level)
    return views


def summarize(scores: pd.DataFrame, items: pd.DataFrame | None = None, base: str = "base",
              level: float = LEVEL, sequential: tuple[str, str] | None = None) -> dict:
    """The reported views of a run's scores (:attr:`cpift.evaluate.Evaluation.scores`,
    concatenated), with intervals when its ``items`` are given.

    Returns a JSON-able dict: ``scores`` (model → task → score, the mean over seeds),
    ``normalised_average`` (model → mean of 10 × score over the trained tasks, retention
    excluded), ``seesaw`` (model → task → score − the ``base`` model's score), ``retention``
    (model → metric → value) and, when the ``base`` model has retention accuracies,
    ``forgetting`` (:func:`forgetting`) with the ``collapse_threshold`` it used. With ``items``
    also: ``intervals`` (for each of ``scores``, ``normalised_average``, ``seesaw``,
    ``retention`` and ``mean_forget_ratio``: the same keys → ``[low, high]`` at ``level``; and
    ``retention_mean``: model → the interval of its mean retention accuracy, the out-of-distribution
    score of the trade-off view),
    ``seesaw_p`` (model → task → p-value of the paired difference to the base), ``level`` and
    ``n`` (``items``: task → items scored; ``seeds``: model → seeds), and with ``sequential =
    (A, B)`` the A → B study's ``sequential`` view (``first``, ``second``, ``variants``: variant →
    ``delta_A`` / ``delta_B`` → ``mean``, ``low``, ``high``, ``p_value``).
    """
    tasks = scores[scores.task != RETENTION]
    table = tasks.pivot_table(index="model", columns="task", values="score", sort=False)
    summary: dict = {"scores": {m: row.dropna().to_dict() for m, row in table.iterrows()}}
    summary[NORMALISED_AVERAGE] = (10 * table).mean(axis=1).to_dict()
    if base in table.index:
        summary["seesaw"] = {m: (row - table.loc[base]).dropna().to_dict() for m, row in table.iterrows()}
    kept = scores[scores.task == RETENTION]
    retention = kept.pivot_table(index="model", columns="metric", values="score", sort=False)
    summary["retention"] = {m: row.dropna().to_dict() for m, row in retention.iterrows()}
    accuracy = retention.drop(columns=[c for c in RETENTION_LOSSES if c in retention.columns])
    if base in accuracy.index:
        summary["forgetting"] = forgetting(accuracy, base, COLLAPSE_THRESHOLD)
        summary["collapse_threshold"] = COLLAPSE_THRESHOLD
    if items is not None and not items.empty:
        summary.update(_intervals(summary, items, base, level, sequential))
    return summary


def _na_samples(samples: Samples, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    return {task: samples[key][0] for key in samples if (task := key[0]) in tasks}


def paired_comparisons(items: pd.DataFrame, reference: str, level: float = LEVEL) -> pd.DataFrame:
    """Every model against ``reference`` on the same items: per trained task and on the normalised
    average, the mean difference (model − reference), its paired interval, the p-value and its
    test (:func:`cpift.stats.paired_difference`; the normalised average's p-value is the
    bootstrap's: twice the share of replicates on the far side of 0), ``n_items``, ``n_seeds``
    and whether the interval excludes 0.

    Raises:
        ParameterError: ``reference`` was not scored.
    """
    models = list(dict.fromkeys(items.model))
    if reference not in models:
        raise ParameterError(f"no model {reference!r} was scored; the models are {', '.join(models)}")
    trained = [t for t in dict.fromkeys(items.task) if t != RETENTION]
    theirs = item_samples(items, reference)
    rows = []
    for model in models:
        if model == reference:
            continue
        mine = item_samples(items, model)
        shared = [key for key in mine if key[0] in trained and key in theirs]
        for key in shared:
            d = paired_difference(mine[key][0], theirs[key][0], level)
            rows.append({"model": model, "task": key[0], "difference": d.mean, "low": d.low, "high": d.high,
                         "p_value": d.p_value, "test": d.test, "n_items": d.n_items, "n_seeds": d.n_seeds})
        if shared:
            a, b = mine, theirs
            diffs = {key[0]: a[key][0] - b[key][0] for key in shared}  # a reference of one seed broadcasts
            replicates = 10 * np.mean(list(bootstrap_means(diffs).values()), axis=0)
            mean = 10 * float(np.mean([d.mean() for d in diffs.values()]))
            low, high = percentile_interval(replicates, level)
            p_value = min(1.0, 2 * min(np.mean(replicates <= 0), np.mean(replicates >= 0)))
            rows.append({"model": model, "task": NORMALISED_AVERAGE, "difference": mean, "low": low, "high": high,
                         "p_value": float(p_value), "test": "bootstrap",
                         "n_items": sum(d.shape[1] for d in diffs.values()),
                         "n_seeds": max(d.shape[0] for d in diffs.values())})
    table = pd.DataFrame(rows, columns=["model", "task", "difference", "low", "high", "p_value", "test",
                                        "n_items", "n_seeds"])
    table["excludes_zero"] = (table.low > 0) | (table.high < 0)
    return table


def read_items(run: RunDir) -> pd.DataFrame:
    """A run's per-item results.

    Raises:
        FormatError: the run has none (it has not scored a model yet, or an older cpift made it).
    """
    path = run.path_for(ITEMS)
    if not path.is_file():
        raise FormatError(f"{run.path} has no per-item results ({ITEMS}): it has not scored a model yet, "
                          "or an older cpift made it")
    return pd.read_parquet(path)


def score_intervals(evaluation: Evaluation, level: float = LEVEL) -> pd.DataFrame:
    """An :class:`~cpift.evaluate.Evaluation`'s scores with the interval of each (``low``,
    ``high``; NaN for the perplexity, which is no mean of item scores)."""
    table = evaluation.scores.copy()
    intervals = {}
    for model in table.model.unique():
        samples = item_samples(evaluation.items, model)
        intervals.update({(model, *key): _interval(samples, key, level) for key in samples})
    bounds = [intervals.get((m, t, k), [np.nan, np.nan]) for m, t, k in zip(table.model, table.task, table.metric)]
    table[["low", "high"]] = bounds if bounds else np.empty((0, 2))
    return table


COMPARE_COLUMNS = ("run", "model", "measure", "mean", "low", "high", "n_items", "n_seeds")


def compare(run_dirs: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """The headline numbers of one or more runs, one row per (model, measure), from each run's
    ``metrics.json``: every trained task's score, the normalised average, the retention
    next-token accuracy and the forgetting metrics (mean forget ratio, collapse rate), each with
    its interval where the run has per-item results (``low``/``high`` NaN otherwise), the items
    scored and the model's seeds. ``model`` is ``run/model`` when several runs are compared.
    Columns: :data:`COMPARE_COLUMNS`.
    """
    rows = []
    for path in run_dirs:
        run = RunDir.open(path)
        summary = run.read_json(METRICS_JSON)
        intervals, n = summary.get("intervals", {}), summary.get("n", {})
        items = n.get("items", {})
        label = (lambda m: f"{run.path.name}/{m}") if len(run_dirs) > 1 else (lambda m: m)

        def row(model: str, measure: str, mean: float, interval: Sequence[float] | None, n_items: int | None) -> None:
            low, high = interval if interval else (np.nan, np.nan)
            rows.append({"run": run.path.name, "model": label(model), "measure": measure, "mean": mean, "low": low,
                         "high": high, "n_items": n_items, "n_seeds": n.get("seeds", {}).get(model)})

        for model, by_task in summary["scores"].items():
            for task, value in by_task.items():
                row(model, task, value, intervals.get("scores", {}).get(model, {}).get(task), items.get(task))
            row(model, NORMALISED_AVERAGE, summary[NORMALISED_AVERAGE][model],
                intervals.get(NORMALISED_AVERAGE, {}).get(model), sum(items.get(t, 0) for t in by_task) or None)
            retention = summary.get("retention", {}).get(model, {})
            if "next_token_accuracy" in retention:
                row(model, "retention_acc", retention["next_token_accuracy"],
                    intervals.get("retention", {}).get(model, {}).get("next_token_accuracy"), None)
            forgot = summary.get("forgetting", {}).get(model)
            if forgot:
                row(model, "mean_forget_ratio", forgot["mean_forget_ratio"],
                    intervals.get("mean_forget_ratio", {}).get(model), None)
                row(model, "collapse_rate", forgot["collapse_rate"], None, None)
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))


def wide(rows: pd.DataFrame, value: str = "mean") -> pd.DataFrame:
    """:func:`compare`'s rows as a models × measures table of one column (``mean``, ``low``, …)."""
    return rows.pivot_table(index="model", columns="measure", values=value, sort=False, dropna=False)


def formatted(rows: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`compare`'s rows as a models × measures table of text, ``mean [low, high]`` (just
    the mean where there is no interval), the items per measure in the column names and the
    seeds per model in a ``seeds`` column; a ``!`` marks an interval wider than ±10 points
    (:data:`WIDE_INTERVAL`; for the 0–10 normalised average ±1): too few items to rank by."""
    def cell(r: pd.Series) -> str:
        if pd.isna(r["mean"]):
            return "—"
        text = f"{r['mean']:.{digits}f}"
        if pd.notna(r["low"]):
            text += f" [{r['low']:.{digits}f}, {r['high']:.{digits}f}]"
            scale = 10 if r["measure"] == NORMALISED_AVERAGE else 1
            if (r["high"] - r["low"]) / 2 > WIDE_INTERVAL * scale:
                text += " !"
        return text

    rows = rows.assign(cell=rows.apply(cell, axis=1))
    table = rows.pivot_table(index="model", columns="measure", values="cell", aggfunc="first", sort=False)
    counts = rows.dropna(subset=["n_items"]).groupby("measure", sort=False).n_items.max()
    table.columns = [f"{m} (n={int(counts[m])})" if m in counts.index else m for m in table.columns]
    seeds = rows.groupby("model", sort=False).n_seeds.max()
    table.insert(0, "seeds", [int(s) if pd.notna(s) else "—" for s in seeds.reindex(table.index)])
    return table.fillna("—")


def write_metrics(run: RunDir, scores: pd.DataFrame, items: pd.DataFrame | None = None,
                  sequential: tuple[str, str] | None = None) -> None:
    """Write ``items.parquet`` (when ``items`` are given), ``metrics.csv`` and ``metrics.json``
    (:func:`summarize`; ``sequential``: the A → B study's tasks)."""
    if items is not None:
        atomic_write_bytes(run.path_for(ITEMS), items.to_parquet(index=False))
    run.write_json(METRICS_JSON, summarize(scores, items, sequential=sequential))
    run.write_text(METRICS_CSV, scores.to_csv(index=False))
