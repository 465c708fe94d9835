"""CPI-FT, the paper's four stages, keeping every intermediate artifact in the run directory.

1. Probe: fine-tune the base briefly on each task alone (``probes/<task>/``); optionally measure
   how far its core still moves (``stability.json``) and probe again with other data orders to
   measure how reproducible the core is (``reliability.json``; :mod:`cpift.probes`).
2. Core regions at p of the first probes (``regions/``, compact: masks and the top-p |Δ|
   deflated), their Jaccard similarity (``similarity.json``), groups at τ and the stage order
   (``groups.json``, with every grouping by τ).
3. Fusion: core transplant + SLERP (``fusion/`` weights, ``fusion/report.csv``). Its base is the
   pretrained model (``fusion_base = "pretrained"``, the default) or the probe of the task that
   trains last (``"last_stage"``): the paper's "model of the last fine-tuning stage" reads both ways.
4. Consolidation from the fused model: the groups train in stage order on a balanced sample of
   their tasks' data (``samples_per_task`` each), every core of the earlier groups frozen exactly.

A τ sweep (``tau_sweep``) consolidates once more for every further τ whose grouping differs from
τ's and from the other sweep values' (τ values that group the tasks alike would train the same
model): model ``cpift@tau=<τ>`` in ``methods/cpift/tau-<τ>/final``, from the same probes and
fusion; ``groups.json`` lists, for every τ of the sweep, its groups and the model that trains them.

The probes are extra training the baselines do not get; the consolidation uses the same
optimizer-step budget as every other method.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from ..fusion import FOLDS, OVERLAP_RULES, fuse
from ..grouping import STAGE_ORDERS, group_tasks, groupings_by_tau, stage_order
from ..masks import unpack_all
from ..regions import CoreRegions, core_regions
from ..probes import CoreSnapshots, reliability
from ..processes import barrier
from ..runs import FUSION, FUSION_REPORT, GROUPS, REGIONS, RELIABILITY, SIMILARITY, STABILITY, method_file
from ..runs import method_final_dir
from ..runs import probe_dir, retest_regions_dir
from ..settings import ConfigError, Float, Section, choice, numbers
from .common import Context, split_evenly
from .registry import Method, Plan, register

FUSION_BASES = ("pretrained", "last_stage")


class CpiftSettings(Section):
    """``[cpift]``: core size ``p`` (percent of all parameters), grouping threshold ``tau`` on the
    Jaccard overlap, stage ``order`` of the groups, SLERP factor ``omega``, the ``overlap`` rule for
    an element in several cores, how several task models are SLERP-ed (``fold``), the fusion's
    base, the consolidation sample per task (default ``data.n_train``) and a ``tau_sweep`` of
    further τ values (module docstring).

    ``fusion_base``: the paper fuses into "the model of the last fine-tuning stage", which is
    ambiguous (no stage has run when fusion happens in its own pipeline figure). The default
    ``"pretrained"`` starts from the pretrained base θ⁽⁰⁾, the reading that keeps the fusion
    independent of any stage order and equal to the task-vector merge literature;
    ``"last_stage"`` starts from the probe of the task that trains last.
    """

    p: Float = Field(1.0, gt=0, le=100)
    tau: Float = Field(0.1, ge=0, le=1)
    order: Annotated[str, choice(tuple(STAGE_ORDERS))] = "random"
    omega: Float = Field(0.5, ge=0, le=1)
    overlap: Annotated[str, choice(tuple(OVERLAP_RULES))] = "max_delta"
    fold: Annotated[str, choice(tuple(FOLDS))] = "mean"
    fusion_base: Annotated[str, choice(FUSION_BASES)] = "pretrained"
    samples_per_task: int | None = Field(None, ge=1)
    tau_sweep: numbers(min_length=0, ge=0, le=1) = ()

    def resolve(self, config: Any) -> CpiftSettings:
        n_train = config.data.n_train
        if self.samples_per_task is None:
            return self.model_copy(update={"samples_per_task": n_train})
        if self.samples_per_task > n_train:
            raise ConfigError("cpift.samples_per_task", f"{self.samples_per_task} is more than data.n_train "
                              f"({n_train}): the consolidation sample is drawn from each task's training data")
        return self


def _probe_seed(run_seed: int, repeat: int) -> int:
    """The data-order seed of a task's ``repeat``-th probe: the run's seed for the first, one
    derived from (run seed, repeat) for every further one."""
    return run_seed if repeat == 1 else int(np.random.SeedSequence([run_seed, repeat]).generate_state(1)[0])


def probe(ctx: Context, task: str, repeat: int = 1) -> torch.nn.Module:
    """The ``repeat``-th probe fine-tune of ``task`` from the base (``probe.steps`` steps of
    ``probe.optimizer``), saved in ``probes/``. The first probe's core stability is measured with
    ``probe.snapshot_every`` and saved in ``stability.json``."""
    settings = ctx.config.probe

    def build() -> torch.nn.Module:
        model = ctx.fresh_base()
        snapshots = (CoreSnapshots(ctx.base_model, model, ctx.config.cpift.p, settings.snapshot_every, settings.steps)
                     if settings.snapshot_every and repeat == 1 else None)
        stage = f"probe/{task}" if repeat == 1 else f"probe-repeat{repeat}/{task}"
        ctx.train_stage(model, ctx.examples([task], seed=_probe_seed(ctx.config.run.seed, repeat)), stage,
                        settings.steps, lr=settings.lr, optimizer=settings.optimizer, hook=snapshots)
        if snapshots is not None:
            curves = ctx.run.read_json(STABILITY, default={})
            ctx.run.write_json(STABILITY, {**curves, task: snapshots.curve().to_dict(orient="list")})
        return model

    return ctx.cached_model(probe_dir(task, repeat), build)


def probes(ctx: Context) -> dict[str, torch.nn.Module]:
    """One probe per task (:func:`probe`); with ``probe.repeats`` > 1, every task is probed again
    with other data orders, the cores of those retests saved in ``regions_retest/<r>/`` (masks only;
    the retest models are not kept in memory) and the test–retest Jaccards in ``reliability.json``."""
    tuned = {task: probe(ctx, task) for task in ctx.tasks}
    regions = regions_of(ctx, tuned)
    retests = []
    for repeat in range(2, ctx.config.probe.repeats + 1):
        path = ctx.run.path_for(retest_regions_dir(repeat))
        if ctx.cached(f"{retest_regions_dir(repeat)}/manifest.json"):
            retests.append(CoreRegions.load(path))
            continue
        retest = core_regions(ctx.base_model, {task: probe(ctx, task, repeat) for task in ctx.tasks},
                              p=ctx.config.cpift.p, keep_magnitudes=False, progress=ctx.progress)
        if ctx.run.writes:
            retest.save(path, compress=True)
        retests.append(retest)
    if retests:
        ctx.run.write_json(RELIABILITY, reliability(regions, retests).to_dict(orient="records"))
    return tuned


def tau_label(tau: float) -> str:
    """The model label of the consolidation at a sweep's ``tau``: ``cpift@tau=0.05``."""
    return f"cpift@tau={tau:g}"


def sweep(tau: float, taus: tuple[float, ...], similarity) -> list[dict]:
    """For ``tau`` and every sweep value: its groups and the label of the model that trains them —
    ``"cpift"`` for τ's own grouping, else the first sweep value with that grouping."""
    rows, trained = [], {_key(group_tasks(similarity, tau)): "cpift"}
    for value in taus:
        groups = group_tasks(similarity, value)
        model = trained.setdefault(_key(groups), tau_label(value))
        rows.append({"tau": value, "groups": groups, "model": model})
    return rows


def _key(groups: list[list[str]]) -> tuple:
    return tuple(sorted(tuple(sorted(g)) for g in groups))


def regions_of(ctx: Context, tuned: dict[str, torch.nn.Module]) -> CoreRegions:
    """The probes' core regions at p, saved once under ``regions/``."""
    path = ctx.run.path_for(REGIONS)
    if ctx.cached(f"{REGIONS}/manifest.json"):
        return CoreRegions.load(path)
    regions = core_regions(ctx.base_model, tuned, p=ctx.config.cpift.p, progress=ctx.progress)
    if ctx.run.writes:
        # The top-p magnitudes (float16, deflated: ~4 MB per task at 135M) let the app move p below the run's.
        regions.save(path, magnitudes=ctx.config.cpift.p, compress=True)
    barrier()  # the next call loads them in every process
    return regions


def frozen_union(regions: CoreRegions, tasks: list[str]) -> dict[str, torch.Tensor]:
    """The union of ``tasks``' cores as per-parameter boolean masks."""
    words = np.zeros(regions.layout.n_words, dtype=np.uint64)
    for task in tasks:
        words |= regions.packed(task)
    return unpack_all(words, regions.layout)


def run(ctx: Context) -> dict[str, torch.nn.Module]:
    """Probe, regions, groups, fusion and staged consolidation; returns the final model, the τ
    sweep's and (unless ``eval.probes`` is off) the probes."""
    settings = ctx.config.cpift
    tuned = probes(ctx)
    regions = regions_of(ctx, tuned)  # saved by probes(): loaded here
    similarity = regions.jaccard()
    groups = group_tasks(similarity, settings.tau)
    stages = stage_order(groups, settings.order, similarity, seed=ctx.config.run.seed)
    swept = sweep(settings.tau, settings.tau_sweep, similarity)
    ctx.run.write_json(SIMILARITY, {"tasks": list(similarity.index), "jaccard": similarity.to_numpy().tolist()})
    ctx.run.write_json(GROUPS, {
        "tau": settings.tau, "order": settings.order, "groups": groups, "stages": stages,
        "groupings_by_tau": [{"tau_min": g.tau_min, "tau_max": g.tau_max, "groups": [list(x) for x in g.groups]}
                             for g in groupings_by_tau(similarity)],
        "sweep": swept,
    })

    def fused_model() -> torch.nn.Module:
        fusion_base = ctx.base_model if settings.fusion_base == "pretrained" else tuned[stages[-1][-1]]
        state = fuse(fusion_base, tuned, regions, settings.omega, settings.overlap, fold=settings.fold,
                     progress=ctx.progress)
        model = ctx.fresh_base()
        model.load_state_dict(state, strict=False)
        ctx.run.write_text(FUSION_REPORT, state.report.to_csv(index=False))
        return model

    def consolidated(stages: list[list[str]], stage_prefix: str) -> torch.nn.Module:
        model = ctx.cached_model(FUSION, fused_model)
        done: list[str] = []
        for i, (group, steps) in enumerate(zip(stages, split_evenly(ctx.steps, len(stages)))):
            frozen = frozen_union(regions, done) if done else None
            examples = ctx.examples(group, per_task=settings.samples_per_task, seed=ctx.config.run.seed + i)
            ctx.train_stage(model, examples, f"{stage_prefix}/stage{i + 1}", steps, frozen=frozen)
            done.extend(group)
        return model

    models = {"cpift": ctx.cached_model(method_final_dir("cpift"), lambda: consolidated(stages, "cpift"))}
    for row in swept:
        label = row["model"]
        if label not in models:
            tau_stages = stage_order(row["groups"], settings.order, similarity, seed=ctx.config.run.seed)
            where = f"tau-{row['tau']:g}"
            models[label] = ctx.cached_model(method_file("cpift", f"{where}/final"),
                                             lambda s=tau_stages, w=where: consolidated(s, f"cpift/{w}"))
    scored = {f"probe:{task}": model for task, model in tuned.items()} if ctx.config.eval.probes else {}
    return {**scored, **models}


register(Method(
    "cpift", run, "probes per task → core regions at p → Jaccard groups at τ → fusion → consolidation over the "
    "groups with earlier cores frozen", "cpift", CpiftSettings,
    # The sweep's extra models are counted at most: which τ values group alike is known after the probes.
    plan=lambda c: Plan(
        len(c.data.tasks) * c.probe.steps * c.probe.repeats + c.train.steps * (1 + len(c.cpift.tau_sweep)),
        len(c.data.tasks) * c.eval.probes + 1 + len(c.cpift.tau_sweep))))
