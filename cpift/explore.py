"""Reading a finished (or running) run directory for exploration, without ever writing to it.

The app's exploration pages and notebooks use these to look at a run from another angle than the
one it was run at: its core regions at another p, the fusion at another ω or overlap rule, a quick
score of such a fused model. Everything is read from the run directory (see :mod:`cpift.runs`):

- :func:`run_regions` loads ``regions/``; when they cannot answer a new p (saved without
  magnitudes) and the run kept its probes, :func:`regions_from_probes` measures them again from
  the base and ``probes/<task>/`` with every |Δ| kept.
- :func:`run_similarity` and :func:`run_fusion_report` read ``similarity.json`` and
  ``fusion_report.csv``.
- :func:`quick_fusion_eval` fuses the probes at a chosen ω and overlap rule and scores the result
  and the base on a few evaluation items per task.
- :func:`run_progress` summarises a run that may still be going, from its manifest,
  ``events.jsonl`` and ``logs/launch.log``: status (``"running"``/``"starting"``/``"done"``/
  ``"failed"``/``"stopped"``, or ``"died"`` for a run whose process ended without recording an
  outcome), stage, step/steps, the loss curve, ETA, tokens/s, the error and the log's tail. A page
  may poll it every second on a run it merely views.

Sample runs ship without model weights: everything except :func:`regions_from_probes` and
:func:`quick_fusion_eval` works on them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .config import parse_config
from .data import get_task
from .errors import CpiftError, FormatError
from .estimate import planned_work
from .evaluate import score_task
from .fusion import fuse
from .launch import launcher_alive
from .pipeline import load_base
from .regions import CoreRegions, core_regions
from .probes import reliability
from .runs import FUSION_REPORT, LAUNCH_LOG, REGIONS, RELIABILITY, SEEDS, SIMILARITY, RunDir, probe_dir


def run_regions(run: RunDir) -> CoreRegions:
    """The run's saved core regions (``regions/``).

    Raises:
        FormatError: the run has no regions (a method other than cpift, or not that far yet), or
            they are damaged or of another format version.
    """
    path = run.path / REGIONS
    if not path.is_dir():
        raise FormatError(f"{run.path} holds no core regions ({REGIONS}/ is missing): the run has not "
                          "reached the cpift regions step")
    return CoreRegions.load(path)


def run_reliability(run: RunDir) -> pd.DataFrame | None:
    """How reproducible the run's cores are, or ``None`` if it cannot say: the repeated probes'
    ``reliability.json`` (``probe.repeats``), else each further seed's cores against the primary
    seed's (each seed probes with its own data order; column ``seed`` for ``repeat``)."""
    if run.exists(RELIABILITY):
        return pd.DataFrame(run.read_json(RELIABILITY))
    primary = run.path / REGIONS / "manifest.json"
    others = {int(path.parent.parent.name.removeprefix("seed-")): path.parent
              for path in sorted((run.path / SEEDS).glob(f"seed-*/{REGIONS}/manifest.json"))}
    if not primary.is_file() or not others:
        return None
    retests = {seed: CoreRegions.load(path) for seed, path in others.items()}
    return reliability(CoreRegions.load(primary.parent), retests, by="seed")


def run_similarity(run: RunDir) -> pd.DataFrame:
    """The run's task × task Jaccard (``similarity.json``) as a DataFrame."""
    data = run.read_json(SIMILARITY)
    try:
        tasks = [str(t) for t in data["tasks"]]
        return pd.DataFrame(data["jaccard"], index=pd.Index(tasks, name="task"),
                            columns=pd.Index(tasks, name="task"), dtype=float)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{run.path / SIMILARITY}: not a similarity table ({exc})") from exc


def run_fusion_report(run: RunDir) -> pd.DataFrame | None:
    """The run's fusion report (one row per tensor: ``from:TASK``, ``contested``, ``angle:TASK``), or
    None when the run has not fused yet."""
    path = run.path / FUSION_REPORT
    if not path.is_file():
        return None
    try:
        report = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable fusion report ({exc})") from exc
    if "tensor" not in report.columns or not any(c.startswith("angle:") for c in report.columns):
        raise FormatError(f"{path}: not a fusion report (no tensor and angle:TASK columns)")
    return report


def probe_models(run: RunDir, tasks: list[str]) -> dict[str, Path]:
    """Each task's probe model directory, or {} unless every task's probe weights are in the run."""
    paths = {task: run.path / probe_dir(task) for task in tasks}
    return paths if all(p.is_dir() and any(p.glob("*.safetensors")) for p in paths.values()) else {}


def regions_from_probes(run: RunDir, p: float, tasks: list[str]) -> CoreRegions:
    """The tasks' core regions at p measured again from the run's base and probes, every |Δ| kept
    (so that :meth:`CoreRegions.with_p` answers any p).

    Raises:
        CpiftError: the run kept no probe weights.
    """
    probes = probe_models(run, tasks)
    if not probes:
        raise CpiftError(f"{run.path} holds no probe weights ({probe_dir('<task>')}/): the regions cannot be "
                         "measured again")
    base, _ = load_base(parse_config(run.config))
    return core_regions(base, probes, p=p, progress=False)


def quick_fusion_eval(
    run: RunDir, regions: CoreRegions, omega: float, overlap: str, n_items: int = 4, max_new_tokens: int = 16
) -> pd.DataFrame:
    """Fuse the run's probes at ``omega`` / ``overlap`` and score it beside the base on a few items.

    Returns one row per task: ``task, metric, base, fused, n`` (``n`` items scored, the first
    ``n_items`` of the task's evaluation set at the run's data seed). A handful of items is a
    sanity check of the fusion, not a measurement.

    Raises:
        CpiftError: the run kept no probe weights, or its model or tasks cannot be loaded.
    """
    probes = probe_models(run, regions.tasks)
    if not probes:
        raise CpiftError(f"{run.path} holds no probe weights: a fused model cannot be built")
    config = parse_config(run.config)
    model, tokenizer = load_base(config)
    state = fuse(model, probes, regions, omega, overlap, fold=config.cpift.fold, progress=False)
    specs = dict(zip(config.data.tasks, (spec for _, spec in config.data.task_specs())))
    tasks = [get_task(specs[t], n_train=1, n_eval=n_items, seed=config.data.seed) for t in regions.tasks]
    options = {"max_new_tokens": max_new_tokens, "batch_size": n_items, "progress": False}
    base_scores = [score_task(model, tokenizer, task, **options) for task in tasks]
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    fused_scores = [score_task(model, tokenizer, task, **options) for task in tasks]
    return pd.DataFrame({"task": [s.task for s in base_scores], "metric": [s.metric for s in base_scores],
                         "base": [s.score for s in base_scores], "fused": [s.score for s in fused_scores],
                         "n": [s.n for s in base_scores]})


# -- progress of a run that may still be going ----------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """What :func:`run_progress` read from a run directory.

    ``status`` is the manifest's, refined by who holds the run: ``"starting"`` (launched, not yet
    locked), ``"running"`` (a process holds the lock), ``"died"`` (the manifest says running but
    no process works on it: it can be resumed). ``losses`` has one row per optimizer step (the
    latest attempt of each ``stage``/``step`` after a resume) with columns ``time``, ``stage``,
    ``step``, ``steps``, ``loss``, ``lr``, ``tokens_per_s``, ``eta_s``, ``seed`` and ``n`` (steps
    done in the whole run up to that row). ``seeds`` are the run's, ``seed`` the one training now
    (or last). ``methods_done`` lists a method once it finished for the first seed. ``eta_s`` is the current stage's remaining time as the trainer
    reported it; ``run_eta_s`` the remaining optimizer steps of the whole run
    (:func:`~cpift.estimate.planned_work`) at the median measured time per step (training only;
    scoring comes on top).
    """

    path: Path
    status: str
    pid: int | None
    stage: str | None
    error: str | None
    created: str | None
    updated: str | None
    methods: tuple[str, ...]
    methods_done: tuple[str, ...]
    seeds: tuple[int, ...]
    seed: int | None
    training_stage: str | None
    step: int | None
    steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    steps_done: int
    steps_planned: int | None
    run_eta_s: float | None
    losses: pd.DataFrame
    log_tail: str

    @property
    def active(self) -> bool:
        """Whether a process is working on the run now."""
        return self.status in ("starting", "running")

    @property
    def fraction(self) -> float | None:
        """Optimizer steps done over those planned, in [0, 1] (``None`` when unknown)."""
        if not self.steps_planned:
            return None
        return min(1.0, self.steps_done / self.steps_planned)


LOG_TAIL_LINES = 40
"""Lines of ``logs/launch.log`` in :attr:`Progress.log_tail`."""

_LOSS_COLUMNS = ("time", "seed", "stage", "step", "steps", "loss", "lr", "tokens_per_s", "eta_s")


def run_progress(run_dir: str | os.PathLike[str]) -> Progress:
    """A run's progress from its manifest, ``events.jsonl`` and ``logs/launch.log``; reads only.

    Raises:
        CpiftError: ``run_dir`` does not exist.
        FormatError: the manifest or the events are corrupt or of another version (names the file).
    """
    run = RunDir.open(run_dir)
    manifest = run.manifest
    status = manifest["status"]
    pid = run.locked_by()
    if pid is not None:
        status = "running"
    else:
        pid = launcher_alive(run)
        if pid is not None:
            status = "starting"
        elif status == "running":
            status = "died"

    steps = [e for e in run.events("step") if {"stage", "step"} <= e.keys()]
    losses = pd.DataFrame([{k: e.get(k) for k in _LOSS_COLUMNS} for e in steps], columns=list(_LOSS_COLUMNS))
    losses = losses.drop_duplicates(["seed", "stage", "step"], keep="last").reset_index(drop=True)
    losses["n"] = range(1, len(losses) + 1)
    last = steps[-1] if steps else {}

    config = manifest["config"]
    methods = tuple(config.get("run", {}).get("methods", ()))
    try:
        planned = sum(planned_work(parse_config(config))[0].values())
    except CpiftError:  # a config this version cannot read (written by another version)
        planned = None
    run_eta = None
    if status in ("starting", "running") and planned is not None:
        per_step = _seconds_per_step(losses)
        if per_step is not None:
            run_eta = max(0, planned - len(losses)) * per_step

    return Progress(
        path=run.path, status=status, pid=pid, stage=manifest.get("stage"), error=manifest.get("error"),
        created=manifest.get("created"), updated=manifest.get("updated"), methods=methods,
        methods_done=tuple(dict.fromkeys(e.get("method") for e in run.events("method_done"))),
        seeds=tuple(config.get("run", {}).get("seeds") or (config.get("run", {}).get("seed", 0),)),
        seed=last.get("seed", manifest.get("seed")),
        training_stage=last.get("stage"), step=last.get("step"), steps=last.get("steps"), loss=last.get("loss"),
        tokens_per_s=last.get("tokens_per_s"), eta_s=last.get("eta_s") if status == "running" else None,
        steps_done=len(losses), steps_planned=planned, run_eta_s=run_eta, losses=losses,
        log_tail=_log_tail(run.path / LAUNCH_LOG),
    )


def _seconds_per_step(losses: pd.DataFrame) -> float | None:
    """The median time between consecutive steps of the same stage (evaluation gaps excluded)."""
    if len(losses) < 2:
        return None
    job = losses[["seed", "stage"]].fillna(-1)  # runs before seeds logged none
    gaps = losses["time"].diff()[(job == job.shift()).all(axis=1)]
    gaps = gaps[gaps > 0]
    return float(gaps.median()) if len(gaps) else None


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 65536) -> str:
    """The last ``lines`` lines of a log, progress-bar redraws (``\\r``) reduced to their last state."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(line for line in kept[-lines:])
