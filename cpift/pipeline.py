"""A config file in, a run directory out: every configured method trained, scored and compared.

``run_config`` validates everything that can be checked before training (the config's keys and
ranges, task names, non-empty datasets, the model), then, holding the run directory's lock:
scores the base model, runs each method (:data:`cpift.methods.METHODS`) once per seed
(``run.seeds``), scores its models item by item, and writes ``items.parquet``, ``metrics.csv`` and
``metrics.json`` (:func:`cpift.scores.write_metrics`) after every method, so a stopped run keeps
what it finished. ``resume=True`` continues a stopped run: finished
artifacts are reused and an interrupted training stage continues from its last checkpoint.
Launched on several processes (``torchrun``), every process runs this and trains data-parallel;
the main one holds the lock, writes and scores (:mod:`cpift.processes`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .config import Config, ConfigError, config_changes, cpu_threads, load_config, parse_config
from .data import get_task, retention_task, retention_text
from .data.tasks import Task
from . import processes
from .evaluate import EvalCache, Evaluation, evaluate_model
from .methods import METHODS, Context
from .atomic import atomic_dir, atomic_write_text
from .models import WEIGHTS_FILE, load_model, tiny_llama, tiny_tokenizer
from .errors import CpiftError
from .regions import CoreRegions
from .runs import CHECKPOINTS, EVAL_CACHE, LOCK, REGIONS, RELIABILITY, SEEDS, RunDir, RunLockedError
from .scores import write_metrics
from .runs import METHODS as METHODS_DIR
from .settings import TrainConfig
from .train import resolve_device


def _task_at(key: str, spec: str | dict[str, Any], **counts: int) -> Task:
    """The task ``spec`` names (:func:`cpift.data.get_task`), its failure reported against ``key``."""
    try:
        return get_task(spec, **counts)
    except Exception as exc:  # unknown names and unreadable datasets, reported against the key
        raise ConfigError(f"{key}: {exc}") from exc


def build_tasks(config: Config) -> dict[str, Task]:
    """The config's tasks, each checked to exist and to have training and evaluation data."""
    tasks: dict[str, Task] = {}
    for key, spec in config.data.task_specs():
        task = _task_at(key, spec, n_train=config.data.n_train, n_eval=config.data.n_eval, seed=config.data.seed)
        if not task.train or not task.eval:
            raise ConfigError(f"{key}: task {task.name!r} has an empty training or evaluation set")
        if task.name in tasks:
            raise ConfigError(f"{key}: a second task named {task.name!r}; task names must differ")
        tasks[task.name] = task
    return tasks


def load_base(config: Config) -> tuple[torch.nn.Module, object]:
    """The base model and tokenizer named by ``model.name`` (``"tiny"``: the tiny random test model)."""
    if config.model.name == "tiny":
        return tiny_llama(seed=config.run.seed), tiny_tokenizer()
    dtype = torch.float32 if config.model.dtype in ("auto", "float32") else getattr(torch, config.model.dtype)
    return load_model(config.model.name, dtype=dtype)


def retention_suite(config: Config) -> dict[str, list]:
    """The retention inputs of :func:`~cpift.evaluate.evaluate_model` for ``config``: the held-out
    prose (``retention_texts``), the zero-shot questions and the ``eval.retention_tasks``
    (``retention_tasks``, ``data.n_eval`` items each); all empty when ``eval.retention`` is off."""
    if not config.eval.retention:
        return {"retention_texts": [], "retention_tasks": []}
    tasks = [retention_task()]
    tasks += [_task_at(f"eval.retention_tasks[{i}]", name, n_train=0, n_eval=config.data.n_eval, seed=config.data.seed)
              for i, name in enumerate(config.eval.retention_tasks)]
    return {"retention_texts": retention_text(n_chunks=config.eval.n_retention_chunks, seed=config.data.seed),
            "retention_tasks": tasks}


def train_config(config: Config) -> TrainConfig:
    """The training settings every method shares (the fair budget): ``config.train``, whose loop
    fields ``max_length``, ``seed`` and ``device`` the config filled from its other sections."""
    return config.train


class ConfigChangedError(CpiftError):
    """A run was resumed with a config other than its own. ``changes`` lists ``(key, old, new)``;
    ``methods_added`` tells that the only change adds methods (allowed with ``add_methods``)."""

    def __init__(self, path: Path, changes: list[tuple[str, Any, Any]], methods_added: bool) -> None:
        self.path, self.changes, self.methods_added = path, changes, methods_added
        shown = "; ".join(f"{key}: {json.dumps(old)} → {json.dumps(new)}" for key, old, new in changes)
        self.problem = f"{path} was created with another config ({shown}); a resume continues a run unchanged"
        self.remedy = "resume with the run's own config, or start a new run in another directory" + (
            "; add_methods=True adds the new methods to this run" if methods_added else "")
        super().__init__(f"{self.problem}; {self.remedy}")


def _as_read_now(stored: dict[str, Any]) -> dict[str, Any]:
    """A run's stored config as this cpift reads it: settings added since the run was made take
    their defaults, which keep what the run did (a stored config this version cannot read is
    compared as stored)."""
    try:
        return parse_config(stored).to_dict()
    except ConfigError:
        return stored


def open_run(out: str | Path, config: Config, *, resume: bool = False, add_methods: bool = False) -> RunDir:
    """A new run directory ``out`` for ``config``, or with ``resume`` the existing one.

    A resumed run must have been created with exactly ``config`` (every key compared), else
    :class:`ConfigChangedError` lists the differences. ``add_methods=True`` allows one change:
    ``run.methods`` grown by new methods (all earlier ones kept); the manifest's config then
    becomes ``config`` and its ``config_changes`` records the change.
    """
    if not resume:
        return RunDir.create(out, config.to_dict())
    run = RunDir.open(out)
    if (holder := run.locked_by()) is not None:  # the first thing to know about a run in use
        raise RunLockedError(run.path, holder)
    changes = config_changes(_as_read_now(run.config), config.to_dict())
    if not changes:
        return run
    old_methods = run.config.get("run", {}).get("methods", [])
    methods_added = ([key for key, _, _ in changes] == ["run.methods"]
                     and set(old_methods) < set(config.run.methods))
    if not (add_methods and methods_added):
        raise ConfigChangedError(run.path, changes, methods_added)
    run.change_config(config.to_dict(), changes)
    return run


def run_config(
    config: Config | str | Path, out: str | Path, *, resume: bool = False, add_methods: bool = False,
    progress: bool | None = None,
) -> RunDir:
    """Run every method of ``config`` into the run directory ``out``; returns the run. ``resume`` and
    ``add_methods``: see :func:`open_run`."""
    config = config if isinstance(config, Config) else load_config(config)
    tasks = build_tasks(config)
    retention = retention_suite(config)
    processes.start(cpu=resolve_device(config.run.device) == "cpu")
    main = processes.is_main()
    run = open_run(out, config, resume=resume, add_methods=add_methods) if main else None
    processes.barrier()  # the run directory exists before the followers open it
    run = run if main else RunDir.open(out).follower()
    with run.lock() if main else contextlib.nullcontext(), run.running() if main else contextlib.nullcontext():
        torch.set_num_threads(threads := cpu_threads(config.run.threads))
        run.log_event(event="threads", threads=threads, processes=processes.world_size())
        model, tokenizer = load_base(config)
        cache = EvalCache(run.path_for(EVAL_CACHE))
        options = {"max_new_tokens": config.eval.max_new_tokens, "batch_size": config.eval.batch_size,
                   "cache": cache, "progress": progress, **retention}
        primary = config.run.seed
        sequential = (config.sequential.first, config.sequential.second) if "sequential" in config.run.methods else None
        evaluations: list[Evaluation] = []

        def score(trained: torch.nn.Module, label: str, seed: int, view: RunDir) -> None:
            # The main process scores; the others wait for it at the next step that needs them all.
            if main:
                view.set_stage(f"eval/{label}")
                evaluations.append(evaluate_model(trained, tokenizer, label, list(tasks.values()), seed=seed,
                                                  **options))

        score(model, "base", primary, run)
        base = evaluations[0].scores if main else None
        base_scores = processes.from_main(dict(zip(base.task, base.score)) if main else None)
        for seed in config.run.all_seeds:
            seed_run = run.for_seed(seed, primary=seed == primary)
            seed_config = config.for_seed(seed)
            ctx = Context(seed_config, seed_run, tasks, model, tokenizer, train_config(seed_config), base_scores,
                          resume, progress)
            for method in config.run.methods:
                for label, trained in METHODS[method].run(ctx).items():
                    score(trained, label, seed, seed_run)
                if main:
                    write_metrics(run, pd.concat([e.scores for e in evaluations], ignore_index=True),
                                  pd.concat([e.items for e in evaluations], ignore_index=True), sequential)
                seed_run.log_event(event="method_done", method=method)
        processes.barrier()
    return run


def pack_run(source: str | os.PathLike[str], out: str | os.PathLike[str], *, overwrite: bool = False,
             max_p: float | None = None, seed_regions: bool = True) -> Path:
    """Copy the run ``source`` to ``out`` with only what the app and the report read.

    Left out: model weights, training checkpoints, and the training-time selection masks of the
    sparse methods and EPI (``methods/*/masks*``; their sizes and EPI's drift curve stay). What
    remains — config, events, logs, regions, similarity, groups, fusion report, metrics — is a few
    MB where the weights are gigabytes: the form in which runs are shared and shipped
    (``sample_runs/``). Core regions are re-saved in their compact form (deflated masks and top-p
    float16 magnitudes). Pages that need weights say so. A run in use by another process is
    refused; ``out`` appears complete or not at all.

    To fit a size (``sample_runs/``): ``max_p`` keeps the |Δ| magnitudes only down to the top
    ``max_p`` % (the app's p slider then reaches ``max_p``); ``seed_regions=False`` leaves out the
    further seeds' core regions, keeping their test–retest overlap with the primary seed's
    (``reliability.json``, :func:`cpift.explore.run_reliability`) — what the pages show of them.
    """
    run = RunDir.open(source)
    if run.locked_by() is not None:
        raise RunLockedError(run.path, run.locked_by())

    def kept(path: Path) -> bool:
        parts = path.relative_to(run.path).parts
        if parts[0] == SEEDS:  # a further seed's artifacts, laid out as the top level's
            parts = parts[2:]
        return not parts or not (path.name.startswith(".") or path.name in (WEIGHTS_FILE, LOCK) or parts[0] in
                                 (CHECKPOINTS, REGIONS) or (parts[0] == METHODS_DIR and path.name.startswith("masks")))

    from .explore import run_reliability  # explore reads runs through this module: imported here

    retest = None if seed_regions or run.exists(RELIABILITY) else run_reliability(run)

    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        for dirpath, dirnames, filenames in os.walk(run.path):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if kept(here / d))
            for name in filenames:
                if kept(here / name):
                    target = tmp / here.relative_to(run.path) / name
                    target.parent.mkdir(parents=True, exist_ok=True)  # only directories that keep a file
                    shutil.copy2(here / name, target)
        for root in [run.path, *(sorted((run.path / SEEDS).glob("seed-*")) if seed_regions else [])]:
            if (root / REGIONS / "manifest.json").is_file():
                regions = CoreRegions.load(root / REGIONS)
                keep = min(regions.max_p, regions.p, max_p or regions.p) if regions.max_p else False
                regions.save(tmp / root.relative_to(run.path) / REGIONS, magnitudes=keep, compress=True,
                             overwrite=True)
        if retest is not None:
            atomic_write_text(tmp / RELIABILITY, json.dumps(retest.to_dict(orient="records")))
    return Path(out)
