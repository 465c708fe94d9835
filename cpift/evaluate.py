"""Scoring models: batched greedy generation on tasks, retention on held-out text, summaries.

- :func:`generate` renders each prompt with the tokenizer's chat template (as training does:
  :func:`cpift.data.chat.render_chat`), left-pads a batch and decodes greedily with a cap on new
  tokens.
- :func:`score_task` generates for a task's evaluation examples and applies the task's scorer.
- :func:`retention` measures next-token accuracy and perplexity on text never trained on — what
  forgetting is measured on, with the zero-shot retention questions
  (:func:`cpift.data.retention_task`) scored like a task.
- :class:`EvalCache` keeps results keyed by the model's weights fingerprint and the evaluation's
  inputs, so an unchanged model is never scored twice on the same task.
- :func:`summarize` turns a tidy score table into the reported views: per-task scores, the
  normalised average, the seesaw (change per task against the base model), retention, and the
  forgetting metrics of :func:`forgetting`.

Normalised average (a choice the paper leaves open): every task metric lies in [0, 1]; the
normalised average is the mean over tasks of 10 × score, a 0–10 scale like the paper's tables.
The seesaw view is score − base score per task.

Forgetting (the GaLLoP paper's metrics), against the untuned base ("vanilla") model, over the
retention tasks: every retention score that is an accuracy — next-token accuracy on the held-out
prose and the zero-shot questions' accuracy (perplexity is not an accuracy and takes no part).
Forget Ratio of a task = max(0, (Acc_vanilla − Acc) / Acc_vanilla), 0 meaning no forgetting; the
mean is over the retention tasks. Collapse Rate = the share of retention tasks whose accuracy fell
to about 0, where "about 0" is a choice the paper leaves open: here an accuracy at most
:data:`COLLAPSE_THRESHOLD` (5 %) *of the vanilla accuracy*, i.e. a forget ratio ≥ 0.95. A relative
threshold treats retention tasks with different vanilla levels alike (the prose's next-token
accuracy is far below the questions' accuracy, which starts near 1). A retention task the base
scores 0 on has nothing to forget and is left out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_text
from .data.chat import render_chat
from .data.tasks import Example, Message, Task
from .errors import ParameterError

SCORE_COLUMNS = ("model", "task", "metric", "score", "n")
RETENTION = "retention"
"""The ``task`` of every retention row; its ``metric`` names the retention task or measure."""
RETENTION_LOSSES = ("perplexity",)
"""Retention metrics that are not accuracies (lower is better): left out of the forgetting metrics."""
COLLAPSE_THRESHOLD = 0.05
"""A retention task has collapsed when its accuracy is at most this fraction of the vanilla accuracy."""


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool | None = None,
) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding; special tokens dropped."""
    device = next(model.parameters()).device
    texts = [render_chat(tokenizer, prompt, generation_prompt=True) for prompt in prompts]
    completions: list[str] = []
    was_training = model.training
    model.eval()
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", disable=None if progress is None else not progress):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                          padding_side="left", add_special_tokens=False).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return completions


@dataclass(frozen=True)
class TaskScore:
    """A model's score on one task: the mean of per-example scores, and the completions."""

    task: str
    metric: str
    score: float
    n: int
    completions: tuple[str, ...]


def score_task(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool | None = None,
) -> TaskScore:
    """Generate for every evaluation example of ``task`` and score it with the task's scorer."""
    examples: Sequence[Example] = task.eval
    completions = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)
    scores = [float(task.score(e, c)) for e, c in zip(examples, completions)]
    return TaskScore(task.name, task.metric, float(np.mean(scores)) if scores else float("nan"), len(scores),
                     tuple(completions))


@torch.no_grad()
def retention(
    model: torch.nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 8
) -> dict[str, float]:
    """Next-token accuracy and perplexity on ``texts``, weighted by token (no chat template)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                          truncation=True, max_length=max_length).to(device)
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        valid = batch["attention_mask"][:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total_loss += float(loss[valid].sum())
        correct += int((logits.argmax(-1) == targets)[valid].sum())
        count += int(valid.sum())
    model.train(was_training)
    if not count:
        return {"next_token_accuracy": float("nan"), "perplexity": float("nan"), "tokens": 0}
    return {"next_token_accuracy": correct / count, "perplexity": math.exp(total_loss / count), "tokens": count}


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape, dtype and bytes: equal exactly for equal weights."""
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        data = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def task_fingerprint(task: Task, **settings: object) -> str:
    """A hash of a task's evaluation prompts and targets plus the generation settings."""
    payload = [[list(e.prompt), repr(e.target)] for e in task.eval]
    text = json.dumps({"task": task.name, "metric": task.metric, "eval": payload, "settings": settings},
                      sort_keys=True, default=repr)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class EvalCache:
    """Evaluation results on disk, keyed by model fingerprint and evaluation inputs.

    One JSON file, rewritten atomically on every addition, so a killed run keeps what it scored.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, key: str) -> dict | None:
        """The cached result for ``key``, if any."""
        return self._entries.get(key)

    def put(self, key: str, value: dict) -> None:
        """Store a result and write the cache file."""
        self._entries[key] = value
        atomic_write_text(self.path, json.dumps(self._entries, indent=1))


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    label: str,
    tasks: Sequence[Task],
    *,
    retention_texts: Sequence[str] = (),
    retention_tasks: Sequence[Task] = (),
    max_new_tokens: int = 32,
    batch_size: int = 8,
    cache: EvalCache | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Score one model on every task (and the retention suite); a tidy table, one row per score.

    Columns: ``model`` (``label``), ``task``, ``metric``, ``score``, ``n``. Each retention task
    (never trained on, e.g. the zero-shot questions) is scored like a task and gives the row
    ``retention``/its name; the retention texts add ``retention``/``next_token_accuracy`` and
    ``retention``/``perplexity``.
    """
    model_key = fingerprint(model) if cache is not None else ""
    rows = []
    # (task, row task, row metric): a retention task's row is filed under "retention", by name.
    jobs = [(task, task.name, None) for task in tasks] + [(task, RETENTION, task.name) for task in retention_tasks]
    for task, row_task, row_metric in jobs:
        key = f"{model_key}:{task_fingerprint(task, max_new_tokens=max_new_tokens)}"
        cached = cache.get(key) if cache is not None else None
        if cached is None:
            result = asdict(score_task(model, tokenizer, task, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, progress=progress))
            if cache is not None:
                cache.put(key, result)
            cached = result
        rows.append({"model": label, "task": row_task, "metric": row_metric or cached["metric"],
                     "score": cached["score"], "n": cached["n"]})
    if retention_texts:
        text_key = hashlib.blake2b("\n\0".join(retention_texts).encode(), digest_size=16).hexdigest()
        key = f"{model_key}:retention:{text_key}"
        result = cache.get(key) if cache is not None else None
        if result is None:
            result = retention(model, tokenizer, retention_texts, batch_size=batch_size)
            if cache is not None:
                cache.put(key, result)
        for metric in ("next_token_accuracy", "perplexity"):
            rows.append({"model": label, "task": RETENTION, "metric": metric, "score": result[metric],
                         "n": result["tokens"]})
    return pd.DataFrame(rows, columns=list(SCORE_COLUMNS))


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


def summarize(scores: pd.DataFrame, base: str = "base") -> dict:
    """The reported views of a tidy score table (as :func:`evaluate_model` returns, concatenated).

    Returns a JSON-able dict: ``scores`` (model → task → score), ``normalised_average``
    (model → mean of 10 × score over the trained tasks, retention excluded), ``seesaw``
    (model → task → score − the ``base`` model's score), ``retention`` (model → metric → value)
    and, when the ``base`` model has retention accuracies, ``forgetting`` (:func:`forgetting`:
    model → forget ratio per retention task, their mean, collapse rate) with the
    ``collapse_threshold`` it used.
    """
    tasks = scores[scores.task != RETENTION]
    table = tasks.pivot_table(index="model", columns="task", values="score", sort=False)
    summary: dict = {"scores": {m: row.dropna().to_dict() for m, row in table.iterrows()}}
    summary["normalised_average"] = (10 * table).mean(axis=1).to_dict()
    if base in table.index:
        summary["seesaw"] = {m: (row - table.loc[base]).dropna().to_dict() for m, row in table.iterrows()}
    kept = scores[scores.task == RETENTION]
    summary["retention"] = {m: dict(zip(g.metric, g.score)) for m, g in kept.groupby("model", sort=False)}
    accuracy = kept[~kept.metric.isin(RETENTION_LOSSES)].pivot_table(
        index="model", columns="metric", values="score", sort=False)
    if base in accuracy.index:
        summary["forgetting"] = forgetting(accuracy, base, COLLAPSE_THRESHOLD)
        summary["collapse_threshold"] = COLLAPSE_THRESHOLD
    return summary
