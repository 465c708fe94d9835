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

Sample runs ship without model weights: everything except the last two functions works on them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from .config import parse_config
from .data import get_task
from .errors import CpiftError, FormatError
from .evaluate import score_task
from .fusion import fuse
from .pipeline import load_base
from .regions import CoreRegions, core_regions
from .runs import FUSION_REPORT, REGIONS, SIMILARITY, RunDir, probe_dir


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
