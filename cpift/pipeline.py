"""A config file in, a run directory out: every configured method trained, scored and compared.

``run_config`` validates everything that can be checked before training (the config's keys and
ranges, task names, non-empty datasets, the model), then, holding the run directory's lock:
scores the base model, runs each method (:data:`cpift.methods.METHODS`), scores its models, and
writes ``metrics.json`` (the summary views) and ``metrics.csv`` (the tidy table) after every
method, so a stopped run keeps what it finished. ``resume=True`` continues a stopped run: finished
artifacts are reused and an interrupted training stage continues from its last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from .config import Config, ConfigError, load_config
from .data import get_task, retention_text
from .data.tasks import Task
from .evaluate import EvalCache, evaluate_model, summarize
from .methods import METHODS, Context
from .models import load_model, tiny_llama, tiny_tokenizer
from .runs import METRICS_CSV, METRICS_JSON, RunDir
from .train import TrainConfig

EVAL_CACHE = "eval_cache.json"


def build_tasks(config: Config) -> dict[str, Task]:
    """The config's tasks, each checked to exist and to have training and evaluation data."""
    tasks: dict[str, Task] = {}
    for key, spec in config.data.task_specs():
        try:
            task = get_task(spec, n_train=config.data.n_train, n_eval=config.data.n_eval, seed=config.data.seed)
        except Exception as exc:  # unknown names and unreadable datasets, reported against the key
            raise ConfigError(f"{key}: {exc}") from exc
        if not task.train or not task.eval:
            raise ConfigError(f"{key}: task {task.name!r} has an empty training or evaluation set")
        tasks[task.name] = task
    return tasks


def load_base(config: Config) -> tuple[torch.nn.Module, object]:
    """The base model and tokenizer named by ``model.name`` (``"tiny"``: the tiny random test model)."""
    if config.model.name == "tiny":
        return tiny_llama(seed=config.run.seed), tiny_tokenizer()
    dtype = torch.float32 if config.model.dtype in ("auto", "float32") else getattr(torch, config.model.dtype)
    return load_model(config.model.name, dtype=dtype)


def train_config(config: Config) -> TrainConfig:
    """The training settings every method shares (the fair budget)."""
    t = config.train
    return TrainConfig(lr=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, steps=t.steps,
                       batch_size=t.batch_size, grad_accum=t.grad_accum, max_length=config.data.max_length,
                       max_grad_norm=t.max_grad_norm or None, checkpoint_every=t.checkpoint_every, seed=config.run.seed,
                       device=config.run.device)


def run_config(
    config: Config | str | Path, out: str | Path, *, resume: bool = False, progress: bool | None = None
) -> RunDir:
    """Run every method of ``config`` into the run directory ``out``; returns the run."""
    config = config if isinstance(config, Config) else load_config(config)
    tasks = build_tasks(config)
    settings = train_config(config)  # validated, like everything else, before the run exists
    run = RunDir.open(out) if resume else RunDir.create(out, config.to_dict())
    with run.lock(), run.running():
        model, tokenizer = load_base(config)
        cache = EvalCache(run.path_for(EVAL_CACHE))
        texts = retention_text(n_chunks=config.eval.n_retention_chunks, seed=config.data.seed) \
            if config.eval.retention else []
        options = {"max_new_tokens": config.eval.max_new_tokens, "batch_size": config.eval.batch_size,
                   "cache": cache, "progress": progress}
        run.set_stage("eval/base")
        scores = [evaluate_model(model, tokenizer, "base", list(tasks.values()), retention_texts=texts, **options)]
        base_scores = dict(zip(scores[0].task, scores[0].score))
        ctx = Context(config, run, tasks, model, tokenizer, settings, base_scores, resume, progress)
        for method in config.run.methods:
            for label, trained in METHODS[method](ctx).items():
                run.set_stage(f"eval/{label}")
                scores.append(evaluate_model(trained, tokenizer, label, list(tasks.values()),
                                             retention_texts=texts, **options))
            write_metrics(run, pd.concat(scores, ignore_index=True))
            run.log_event(event="method_done", method=method)
    return run


def write_metrics(run: RunDir, scores: pd.DataFrame) -> None:
    """Write ``metrics.csv`` (tidy scores) and ``metrics.json`` (the summary views)."""
    run.write_json(METRICS_JSON, summarize(scores))
    run.write_text(METRICS_CSV, scores.to_csv(index=False))


def compare(run_dirs: list[str | Path]) -> pd.DataFrame:
    """Models × tasks scores of one or more runs (rows ``run/model``), plus the normalised average."""
    frames = []
    for path in run_dirs:
        run = RunDir.open(path)
        scores = pd.read_csv(run.path / METRICS_CSV)
        table = scores[scores.task != "retention"].pivot_table(index="model", columns="task", values="score",
                                                               sort=False)
        table["normalised_average"] = pd.Series(summarize(scores)["normalised_average"])
        retention = scores[(scores.task == "retention") & (scores.metric == "next_token_accuracy")]
        table["retention_acc"] = retention.set_index("model")["score"]
        table.index = [f"{Path(path).name}/{m}" if len(run_dirs) > 1 else m for m in table.index]
        frames.append(table)
    return pd.concat(frames)
