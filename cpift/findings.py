"""The study's findings: each claim of the papers beside cpift's measurement, its interval and n,
and a verdict no stronger than the interval allows.

:func:`findings` reads a finished (or partly finished) run directory — its per-item results,
``metrics.json``, every seed's core regions, groupings, EPI drift and probe stability — and returns
one :class:`Finding` per claim. Claims whose models the run did not train are ``not tested``.

Verdicts: a claim that one model beats another ``holds`` when the 95 % interval of the paired
difference (:func:`cpift.scores.paired_comparisons`, hierarchical over seeds and items) lies on
the claimed side of 0, ``does not hold`` when it lies at or beyond 0 on the other side, and is
``inconclusive`` when it straddles 0 — the interval says how large an effect the run could have missed. Claims that
are not a difference state their rule in :attr:`Finding.rule`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from .config import parse_config
from .errors import FormatError
from .explore import run_reliability
from .overlap import significant_pairs
from .probes import halfway, reliability
from .regions import CoreRegions
from .runs import EPI_DRIFT, GROUPS, METRICS_JSON, REGIONS, STABILITY, RunDir
from .scores import NORMALISED_AVERAGE, SEQUENTIAL_PREFIX, paired_comparisons, read_items

__all__ = ["Finding", "RELATED_PAIRS", "VERDICTS", "findings", "findings_figures", "findings_table", "seed_runs",
           "tau_sweep", "to_markdown"]

VERDICTS = ("holds", "does not hold", "inconclusive", "not tested")

RELATED_PAIRS: tuple[tuple[str, str], ...] = (
    ("format_upper", "format_lower"),
    ("bigbench:unit_conversion/si_conversion", "bigbench:elementary_math_qa/question_only"),
)
"""Task pairs the study takes as related (same prompts with opposite answers; two arithmetic tasks);
every other pair of trained tasks counts as unrelated."""

FORGETS_NOTHING = 0.05
"""A mean forget ratio whose interval stays below this counts as no forgetting (claim 5)."""

EPI_PAPER_OVERLAP = 0.78
"""The first overlap of the important set the EPI paper reports (falling to 0.45)."""


@dataclass(frozen=True)
class Finding:
    """One claim: what the paper reports, what the run measured (with intervals), n, the verdict
    (one of :data:`VERDICTS`) and the rule that gave it."""

    claim: str
    paper: str
    measured: str
    n: str
    verdict: str
    rule: str


def seed_runs(run: RunDir) -> dict[int, RunDir]:
    """Every seed of ``run`` as :meth:`~cpift.runs.RunDir.for_seed` sees it, primary first."""
    seeds = parse_config(run.config).run.all_seeds
    return {seed: run.for_seed(seed, primary=i == 0) for i, seed in enumerate(seeds)}


def _interval(mean: float, low: float, high: float, digits: int = 2, scale: float = 1.0) -> str:
    return f"{scale * mean:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"


def _side(low: float, high: float) -> str:
    """The verdict of a difference claimed to be positive."""
    return "holds" if low > 0 else "does not hold" if high <= 0 else "inconclusive"


def _n(row: pd.Series) -> str:
    return f"{int(row.n_items)} items × {int(row.n_seeds)} seed{'s' if int(row.n_seeds) != 1 else ''}"


class _Run:
    """What the claims read, loaded once."""

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.items = read_items(run)
        self.metrics = run.read_json(METRICS_JSON)
        self.config = parse_config(run.config)
        self.seeds = seed_runs(run)
        self.models = set(self.items.model)
        self._comparisons: dict[str, pd.DataFrame] = {}

    def versus(self, model: str, reference: str, task: str = NORMALISED_AVERAGE) -> pd.Series | None:
        """The paired comparison ``model − reference`` on ``task``, or ``None`` if either is missing."""
        if model not in self.models or reference not in self.models:
            return None
        if reference not in self._comparisons:
            self._comparisons[reference] = paired_comparisons(self.items, reference)
        rows = self._comparisons[reference]
        match = rows[(rows.model == model) & (rows.task == task)]
        return match.iloc[0] if len(match) else None

    def average(self, model: str) -> str:
        mean = self.metrics[NORMALISED_AVERAGE][model]
        low, high = self.metrics.get("intervals", {}).get(NORMALISED_AVERAGE, {}).get(model, [np.nan, np.nan])
        return f"{mean:.2f} [{low:.2f}, {high:.2f}]"

    @functools.cached_property
    def regions(self) -> dict[int, CoreRegions]:
        """Every seed's core regions (the seeds that have them)."""
        return {seed: CoreRegions.load(view.path_for(REGIONS)) for seed, view in self.seeds.items()
                if view.exists(f"{REGIONS}/manifest.json")}


def _untested(claim: str, paper: str, rule: str, why: str) -> Finding:
    """A claim the run cannot test, and why."""
    return Finding(claim, paper, why, "—", "not tested", rule)


def _beats(data: _Run, claim: str, paper: str, model: str, reference: str) -> Finding:
    """A "``model`` beats ``reference`` on the normalised average" claim."""
    row = data.versus(model, reference)
    rule = "95 % paired interval of the difference in normalised average (0–10) against 0"
    if row is None:
        return _untested(claim, paper, rule, f"{model} or {reference} has no scores in this run (not among its "
                         "methods, or not scored yet)")
    measured = (f"{model} {data.average(model)} vs {reference} {data.average(reference)}; difference "
                f"{_interval(row.difference, row.low, row.high)}, p = {row.p_value:.2g}")
    return Finding(claim, paper, measured, _n(row), _side(row.low, row.high), rule)


def _multistage(data: _Run) -> list[Finding]:
    order = data.config.multistage.order
    claim = "CPI-FT beats multi-stage SFT ({} order)"
    tested = _beats(data, claim.format(order), "6.70 (random), 6.75 (heuristic) vs CPI-FT 7.21", "cpift", "multistage")
    other = "heuristic" if order == "random" else "random"
    return [tested, _untested(claim.format(other), tested.paper, tested.rule,
                              f"the run's multi-stage SFT used the {order} order")]


def _sequential(data: _Run) -> Finding:
    claim = "Sequential A → B: CPI-FT forgets A less than Full SFT, and learns B as well"
    paper = "ΔA −24.5 (Full SFT), −16.2 (multi-stage), −5.7 (CPI-FT); ΔB +13.4, +12.6, +12.2"
    rule = ("ΔA = score on A − after A alone, ΔB = score on B − base, in points with 95 % paired intervals; the "
            "verdict is the paired difference of CPI-FT and Full SFT on A's items, and needs Full SFT to forget A")
    view = data.metrics.get("sequential")
    full, ours = f"{SEQUENTIAL_PREFIX}multitask", f"{SEQUENTIAL_PREFIX}cpift"
    if not view or full not in data.models or ours not in data.models:
        return _untested(claim, paper, rule, "the run has no A → B study with Full SFT and CPI-FT")
    first, second = view["first"], view["second"]
    parts = []
    for variant, deltas in view["variants"].items():
        a, b = deltas["delta_A"], deltas["delta_B"]
        parts.append(f"{variant}: ΔA {_interval(a['mean'], a['low'], a['high'], 1, 100)}, "
                     f"ΔB {_interval(b['mean'], b['low'], b['high'], 1, 100)}")
    row = data.versus(ours, full, first)
    forgets = view["variants"]["multitask"]["delta_A"]["high"] < 0
    verdict = _side(row.low, row.high) if forgets else "inconclusive"
    measured = (f"A = {first}, B = {second}. " + "; ".join(parts)
                + f". CPI-FT − Full SFT on A: {_interval(row.difference, row.low, row.high, 1, 100)} points"
                + ("" if forgets else "; Full SFT did not measurably forget A, so there was nothing to protect"))
    return Finding(claim, paper, measured, _n(row), verdict, rule)


def _overlap_beyond_chance(regions: dict[int, CoreRegions]) -> tuple[str, bool]:
    """Per seed, how many task pairs overlap more than chance, and the range of their lifts."""
    parts, any_significant = [], False
    for seed, seed_regions in regions.items():
        table = seed_regions.overlap_significance()
        significant = len(significant_pairs(table))
        any_significant |= significant > 0
        parts.append(f"seed {seed}: {significant}/{len(table)} pairs above chance, lift {table.lift.min():.1f}–"
                     f"{table.lift.max():.1f}× (chance Jaccard {table.expected_jaccard.mean():.4f})")
    return "; ".join(parts), any_significant


def tau_sweep(run: RunDir, items: pd.DataFrame | None = None) -> pd.DataFrame:
    """The τ sweep of a run's CPI-FT (``cpift.tau`` and ``cpift.tau_sweep``): for every τ, the
    number of groups in each seed and the paired difference of its model's normalised average to
    τ = 0's (one group), pooled over seeds — each seed's model for a τ is the one that trained
    that seed's grouping at τ. Columns ``tau, groups`` (per seed), ``difference, low, high,
    p_value, n_items, n_seeds``; empty when the run swept no τ down to 0. ``items``: the run's
    per-item results when the caller has read them already."""
    items = read_items(run) if items is None else items
    relabelled, groups_at = [], {}
    for seed, view in seed_runs(run).items():
        groups = view.read_json(GROUPS, default=None)
        if groups is None:
            continue
        for row in [{"tau": groups["tau"], "groups": groups["groups"], "model": "cpift"}, *groups.get("sweep", [])]:
            mine = items[(items.seed == seed) & (items.model == row["model"])]
            if mine.empty:  # not scored yet (a run still going)
                continue
            groups_at.setdefault(row["tau"], []).append(len(row["groups"]))
            relabelled.append(mine.assign(model=f"{row['tau']:g}"))
    columns = ["tau", "groups", "difference", "low", "high", "p_value", "n_items", "n_seeds"]
    if 0.0 not in groups_at or len(groups_at) < 2:
        return pd.DataFrame(columns=columns)
    comparisons = paired_comparisons(pd.concat(relabelled, ignore_index=True), "0")
    rows = comparisons[comparisons.task == NORMALISED_AVERAGE].assign(tau=lambda t: t.model.astype(float))
    rows["groups"] = rows.tau.map(lambda tau: groups_at[tau])
    return rows.sort_values("tau")[columns].reset_index(drop=True)


def _tau_sweep(data: _Run) -> list[Finding]:
    """Two claims from the τ sweep: some grouping beats one group, and the best τ is the paper's."""
    claim = "Grouping helps: some τ > 0 beats τ = 0 (all tasks in one group)"
    paper = "τ = 0.1 beats τ = 0 (LLaMA-2-7B)"
    rule = ("first, whether any pair of cores overlaps more than chance (hypergeometric, Bonferroni); then the best "
            "τ's model against τ = 0's, 95 % paired interval of the difference in normalised average")
    near = "The best τ is near the paper's 0.1"
    near_paper = "normalised average best at τ = 0.1"
    near_rule = ("the paper's τ against the best τ of the sweep: holds if the paper's τ is the best or their "
                 "intervals (each against τ = 0) overlap, does not hold if the paper's lies wholly below the best's")
    regions = data.regions
    if not regions:
        return [_untested(claim, paper, rule, "the run has no core regions"),
                _untested(near, near_paper, near_rule, "the run has no core regions")]
    overlap, any_significant = _overlap_beyond_chance(regions)
    rows = tau_sweep(data.run, data.items)
    if rows.empty:
        why = overlap + "; the run swept no τ down to 0"
        return [_untested(claim, paper, rule, why), _untested(near, near_paper, near_rule, why)]

    def groups(row) -> str:
        counts = "/".join(map(str, sorted(set(row.groups))))
        return f"{counts} group{'s' if counts != '1' else ''}"

    sweep = "; ".join(f"τ = {row.tau:g} ({groups(row)}): {_interval(row.difference, row.low, row.high)}"
                      for row in rows.itertuples())
    best = rows.loc[rows.difference.idxmax()]
    measured = (f"{overlap}. Normalised average against τ = 0: {sweep}"
                + ("" if any_significant else ". No pair overlaps more than chance: the grouping claim cannot be "
                                              "tested at this scale (any grouping is noise)"))
    verdict = _side(best.low, best.high) if any_significant else "inconclusive"
    found = [Finding(claim, paper, measured, _n(best), verdict, rule)]
    paper_tau = rows[np.isclose(rows.tau, data.config.cpift.tau)]
    if paper_tau.empty or not any_significant:
        return [*found, _untested(near, near_paper, near_rule, f"the run's τ is {data.config.cpift.tau:g}, not swept "
                                  "against τ = 0" if paper_tau.empty else "no overlap beyond chance")]
    ours = paper_tau.iloc[0]
    verdict = ("holds" if ours.tau == best.tau or ours.high >= best.low else "does not hold")
    found.append(Finding(near, near_paper, f"best: τ = {best.tau:g} ({groups(best)}), "
                         f"{_interval(best.difference, best.low, best.high)}; τ = {ours.tau:g} ({groups(ours)}): "
                         f"{_interval(ours.difference, ours.low, ours.high)}", _n(ours), verdict, near_rule))
    return found


def _forgetting(data: _Run) -> list[Finding]:
    forgetting = data.metrics.get("forgetting", {})
    intervals = data.metrics.get("intervals", {}).get("mean_forget_ratio", {})

    def described(model: str) -> str:
        low, high = intervals.get(model, [np.nan, np.nan])
        return (f"{model} FR {forgetting[model]['mean_forget_ratio']:.3f} [{low:.3f}, {high:.3f}], "
                f"CR {forgetting[model]['collapse_rate']:.2f}")

    gallop = sorted(m for m in forgetting if m.startswith("gallop@"))
    others = [m for m in forgetting if m.split("@")[0] in ("saft", "pafi", "lora", "dora", "multitask")]
    claim = "GaLLoP forgets nothing: forget ratio and collapse rate 0 at every density"
    rule = (f"mean forget ratio (FR) over the out-of-distribution retention tasks with its 95 % bootstrap interval: "
            f"holds if every density's interval stays below {FORGETS_NOTHING} and its collapse rate (CR) is 0")
    if not gallop:
        return [_untested(claim, "FR 0, CR 0 (GaLLoP paper)", rule, "no GaLLoP model in this run")]
    highs = [intervals.get(m, [np.nan, np.nan])[1] for m in gallop]
    lows = [intervals.get(m, [np.nan, np.nan])[0] for m in gallop]
    collapsed = any(forgetting[m]["collapse_rate"] > 0 for m in gallop)
    verdict = ("holds" if all(h < FORGETS_NOTHING for h in highs) and not collapsed
               else "does not hold" if collapsed or any(low > FORGETS_NOTHING for low in lows) else "inconclusive")
    seeds = max(data.metrics.get("n", {}).get("seeds", {}).get(m, 1) for m in gallop)
    n = (f"{len(data.metrics.get('retention', {}).get('base', {}))} retention measures × {seeds} "
         f"seed{'s' if seeds != 1 else ''}")
    first = Finding(claim, "FR 0, CR 0 (GaLLoP paper)", "; ".join(described(m) for m in gallop), n, verdict, rule)
    claim = "LoRA, DoRA, SAFT and Full FT forget more than GaLLoP"
    rule = "each model's FR interval above every GaLLoP density's (disjoint intervals: conservative)"
    if not others:
        return [first, _untested(claim, "they forget, more as density grows", rule, "none of them in this run")]
    more = [intervals.get(m, [np.nan])[0] > max(highs) for m in others]
    less = [intervals.get(m, [np.nan, np.nan])[1] < min(lows) for m in others]
    verdict = "holds" if all(more) else "does not hold" if any(less) else "inconclusive"
    return [first, Finding(claim, "they forget, more as density grows (LoRA's density not varied here)",
                           "; ".join(described(m) for m in others), n, verdict, rule)]


def _share(jaccard: float) -> float:
    """|A ∩ B| / k of two sets of equal size k, from their Jaccard."""
    return 2 * jaccard / (1 + jaccard)


def _drift(data: _Run) -> Finding:
    claim = "EPI's premise: the important set drifts during training"
    paper = f"overlap of the important set falls from {EPI_PAPER_OVERLAP * 100:.0f} % to 45 %"
    rule = (f"share of the important set still important later (|A ∩ B| / k): EPI's first against its last refresh "
            f"where the run trained EPI, else each probe's core at its halfway point against its final core; holds "
            f"if below {EPI_PAPER_OVERLAP * 100:.0f} % everywhere, does not hold if above everywhere")
    shares: list[float] = []
    parts: list[str] = []
    probed = 0
    for seed, view in data.seeds.items():
        drift = view.read_json(EPI_DRIFT, default=None)
        if drift and len(drift.get("refreshes", [])) > 1:
            shares.append(_share(float(drift["refreshes"][-1]["jaccard_first"])))
            parts.append(f"EPI seed {seed}: {shares[-1]:.0%} of the first set after "
                         f"{len(drift['refreshes'])} refreshes")
    source = "EPI"
    if not shares:
        source = "probes"
        for view in data.seeds.values():
            curves = view.read_json(STABILITY, default={})
            probed += bool(curves)
            shares += [_share(halfway(curve)[1]) for curve in curves.values()]
        if shares:
            parts.append(f"no EPI in this run; the probes' cores (p = {data.config.cpift.p:g} %) at their halfway "
                         "point "
                         f"keep {min(shares):.0%}–{max(shares):.0%} of their final cores "
                         f"({len(shares)} probes, {probed} seed{'s' if probed != 1 else ''})")
    if not shares:
        return _untested(claim, paper, rule, "neither EPI nor probe snapshots in this run")
    verdict = ("holds" if max(shares) < EPI_PAPER_OVERLAP else "does not hold" if min(shares) > EPI_PAPER_OVERLAP
               else "inconclusive")
    n = f"{len(shares)} {'seeds' if source == 'EPI' else 'probes'}"
    return Finding(claim, paper, "; ".join(parts), n, verdict, rule)


def _relatedness(data: _Run) -> Finding:
    claim = "Core overlap follows task relatedness"
    paper = "related tasks share more of their cores (CPI-FT's premise)"
    rule = ("Jaccard lift over chance of related pairs (RELATED_PAIRS) against every other pair, per seed: holds if "
            "every related pair's lift exceeds every unrelated pair's in every seed")
    regions = data.regions
    tasks = list(next(iter(regions.values())).tasks) if regions else []
    related = [pair for pair in RELATED_PAIRS if set(pair) <= set(tasks)]
    if not related:
        return _untested(claim, paper, rule, "the run has no related pair of tasks")
    parts, wins, losses = [], [], []
    for seed, seed_regions in regions.items():
        table = seed_regions.overlap_significance().set_index(["task_a", "task_b"])
        lift = {frozenset(key): row.lift for key, row in table.iterrows()}
        ours = [lift[frozenset(p)] for p in related]
        rest = [v for k, v in lift.items() if k not in {frozenset(p) for p in related}]
        wins.append(min(ours) > max(rest, default=-np.inf))
        losses.append(max(ours) < min(rest, default=np.inf))
        parts.append(f"seed {seed}: related {', '.join(f'{v:.1f}×' for v in ours)}; others "
                     f"{min(rest, default=np.nan):.1f}–{max(rest, default=np.nan):.1f}×")
    retest = _retest(regions)
    verdict = "holds" if all(wins) else "does not hold" if all(losses) else "inconclusive"
    return Finding(claim, paper, "; ".join(parts) + retest,
                   f"{len(regions)} seed{'s' if len(regions) != 1 else ''} × {len(tasks)} tasks", verdict, rule)


def _retest(regions: dict[int, CoreRegions]) -> str:
    """Each task's core in the first seed against the same task's in every other (other data orders)."""
    (_, primary), *others = regions.items()
    table = reliability(primary, dict(others), by="seed")
    if table.empty:
        return ""
    return (f"; the same task across seeds (test–retest): Jaccard "
            f"{table.jaccard.min():.2f}–{table.jaccard.max():.2f} "
            f"(chance {table.expected.mean():.4f})")


def findings(run: RunDir | str) -> list[Finding]:
    """Every claim of the study (module docstring) measured on ``run``.

    Raises:
        FormatError: the run has no per-item results or no metrics yet.
    """
    run = run if isinstance(run, RunDir) else RunDir.open(run)
    if not run.exists(METRICS_JSON):
        raise FormatError(f"{run.path} has no {METRICS_JSON} yet: no model has been scored")
    data = _Run(run)
    return [
        _beats(data, "CPI-FT beats Full-SFT multi-task on the normalised average", "7.21 vs 6.58 (LLaMA-2-7B)",
               "cpift", "multitask"),
        *_multistage(data),
        _sequential(data),
        *_tau_sweep(data),
        *_forgetting(data),
        _drift(data),
        _relatedness(data),
    ]


def findings_figures(run: RunDir | str) -> dict[str, go.Figure]:
    """The study's figures that matter most, by file stem, drawn by the app's builders: the τ sweep,
    the A → B forgetting study and the primary seed's core overlap as lift over chance (diagonal:
    test–retest where the run has it). A figure the run cannot give is left out."""
    from .plots import jaccard_heatmap, sequential_figure, tau_sweep_figure
    from .plots.compare import sequential_table

    run = run if isinstance(run, RunDir) else RunDir.open(run)
    figures = {}
    sweep = tau_sweep(run)
    if not sweep.empty:
        figures["tau_sweep"] = tau_sweep_figure(sweep)
    metrics = run.read_json(METRICS_JSON)
    if "sequential" in metrics:
        first, second = metrics["sequential"]["first"], metrics["sequential"]["second"]
        figures["forgetting"] = sequential_figure(sequential_table(metrics, first, second), first, second)
    if run.exists(f"{REGIONS}/manifest.json"):
        figures["overlap_lift"] = jaccard_heatmap(CoreRegions.load(run.path_for(REGIONS)).overlap_significance(),
                                                  "lift", "data", run_reliability(run))
    return figures


def findings_table(found: Sequence[Finding]) -> pd.DataFrame:
    """The findings as a table, one row per claim."""
    return pd.DataFrame([asdict(f) for f in found], columns=list(Finding.__dataclass_fields__))


def to_markdown(found: Sequence[Finding]) -> str:
    """The findings as a Markdown table (README's "Findings"), then each verdict's rule."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| # | Claim | Paper | cpift (95 % interval) | n | Verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {cell(f.claim)} | {cell(f.paper)} | {cell(f.measured)} | {cell(f.n)} | **{f.verdict}** |"
              for i, f in enumerate(found, 1)]
    lines += ["", "Rules:"] + [f"{i}. {f.rule}." for i, f in enumerate(found, 1)]
    return "\n".join(lines) + "\n"
