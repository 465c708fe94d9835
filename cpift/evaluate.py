"""Scoring models: batched greedy generation on tasks, retention on held-out text, summaries.

- :func:`generate` renders each prompt with the tokenizer's chat template (as training does:
  :func:`cpift.data.chat.render_chat`), batches prompts by length with left padding and decodes
  greedily up to EOS, a stop string or a cap on new tokens.
- :func:`choice_logprobs` scores multiple-choice options by log-likelihood, as
  lm-evaluation-harness does: each prompt computed once, the LM head only where it is needed.
- :func:`score_task` scores a task's evaluation examples — multiple choice by log-likelihood
  (``acc``, ``acc_norm``), anything else by generation and the task's scorer — keeping per-item
  scores and predictions.
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

import functools
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
    stop: Sequence[str] = (),
    progress: bool | None = None,
) -> list[str]:
    """Greedy completions of chat prompts, in the prompts' order; special tokens dropped.

    Prompts are batched by length (longest first, so a batch pads little and the memory peak comes
    first) with left padding; a row stops at EOS or at any of the ``stop`` strings (HF's stopping
    criteria; the stop string stays in the completion).
    """
    device = next(model.parameters()).device
    texts = [render_chat(tokenizer, prompt, generation_prompt=True) for prompt in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    completions: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    stopping = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="generate", unit="batch", disable=None if progress is None else not progress):
        rows = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **stopping)
        decoded = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(rows, decoded):
            completions[i] = text
    model.train(was_training)
    return completions


def _packed_row(prompt: list[int], options: list[list[int]]) -> tuple[list[int], list[int], torch.Tensor, list[int]]:
    """One sequence holding a prompt once and then each option, for :func:`choice_logprobs`.

    Returns the token ids, their position ids (every option continues the prompt's positions),
    the allowed-attention matrix (causal within the prompt and within each option; an option sees
    the prompt and itself, never another option) and, for every option token in order, the index
    of the position whose output predicts it (the prompt's last token for an option's first).
    """
    p = len(prompt)
    ids, positions, predictors = list(prompt), list(range(p)), []
    length = p + sum(len(o) for o in options)
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    start = p
    for option in options:
        n = len(option)
        allowed[start : start + n, :p] = True
        allowed[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        ids += option
        positions += range(p, p + n)
        predictors += [p - 1, *range(start, start + n - 1)]
        start += n
    return ids, positions, allowed, predictors


@torch.no_grad()
def choice_logprobs(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Message]],
    options: Sequence[Sequence[str]],
    *,
    batch_size: int = 8,
    progress: bool | None = None,
) -> list[list[float]]:
    """For each chat prompt, the log-probability of each of its options as the assistant's reply:
    the sum of the log-probabilities of the option's tokens given the rendered prompt, as
    lm-evaluation-harness scores multiple choice.

    One forward pass per batch of prompts, each prompt computed once: a prompt and all its options
    are packed into one sequence whose attention mask lets every option see the prompt and itself
    only (position ids restart after the prompt for each option), and the LM head runs only at the
    positions that predict an option token. Models whose forward does more to the logits than the
    output embedding (e.g. logit soft-capping) are not covered by that shortcut.
    """
    if len(prompts) != len(options):
        raise ParameterError(f"{len(prompts)} prompts but {len(options)} option lists")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    encode = functools.partial(tokenizer.encode, add_special_tokens=False)
    items = []
    for i, (prompt, choices) in enumerate(zip(prompts, options)):
        tokens = [encode(str(choice)) for choice in choices]
        if not tokens or not all(tokens):
            raise ParameterError(f"item {i}: every option must be a non-empty text, got {list(choices)!r}")
        items.append((encode(render_chat(tokenizer, prompt, generation_prompt=True)), tokens))
    order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + sum(map(len, items[i][1]))))
    body, head = model.base_model, model.get_output_embeddings()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[list[float]] = [[] for _ in items]
    was_training = model.training
    model.eval()
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="choices", unit="batch", disable=None if progress is None else not progress):
        rows = [(i, _packed_row(*items[i])) for i in order[start : start + batch_size]]
        width = max(len(ids) for _, (ids, _, _, _) in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding sees itself only
        for r, (_, (ids, positions, mask, _)) in enumerate(rows):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            position_ids[r, : len(ids)] = torch.tensor(positions)
            allowed[r, : len(ids), : len(ids)] = mask
        additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        hidden = body(input_ids=input_ids.to(device), attention_mask=additive[:, None].to(device),
                      position_ids=position_ids.to(device), use_cache=False).last_hidden_state
        row_index = torch.cat([torch.full((len(p),), r) for r, (_, (_, _, _, p)) in enumerate(rows)])
        predictor = torch.cat([torch.tensor(p) for _, (_, _, _, p) in rows])
        wanted = torch.cat([torch.tensor(sum(items[i][1], [])) for i, _ in rows])
        logits = head(hidden[row_index.to(device), predictor.to(device)]).float()
        token_logprobs = (logits.log_softmax(-1).gather(1, wanted.to(device)[:, None])[:, 0]).cpu()
        offset = 0
        for i, _ in rows:
            for option in items[i][1]:
                results[i].append(float(token_logprobs[offset : offset + len(option)].sum()))
                offset += len(option)
    model.train(was_training)
    return results


@dataclass(frozen=True)
class TaskScore:
    """A model's score on one task: per-item scores and predictions, and their mean.

    ``predictions`` are the completions (generation) or the chosen options (multiple choice);
    ``score_norm`` is, for multiple choice, the accuracy when each option's log-likelihood is
    divided by its length in characters (lm-evaluation-harness's ``acc_norm``), else ``None``.
    """

    task: str
    metric: str
    score: float
    n: int
    predictions: tuple[str, ...]
    scores: tuple[float, ...]
    score_norm: float | None = None


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def score_task(
    model: torch.nn.Module,
    tokenizer,
    task: Task,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool | None = None,
) -> TaskScore:
    """Score ``model`` on every evaluation example of ``task``: a multiple-choice task (every
    example has ``options``) by log-likelihood (:func:`choice_logprobs`; ``acc`` and ``acc_norm``),
    any other by greedy generation and the task's scorer."""
    examples: Sequence[Example] = task.eval
    if examples and all(e.options for e in examples):
        logprobs = choice_logprobs(model, tokenizer, [e.prompt for e in examples], [e.options for e in examples],
                                   batch_size=batch_size, progress=progress)
        chosen = [int(np.argmax(lp)) for lp in logprobs]
        chosen_norm = [int(np.argmax(np.array(lp) / [len(o) for o in e.options])) for lp, e in zip(logprobs, examples)]
        scores = [float(c in e.correct) for c, e in zip(chosen, examples)]
        norm = [float(c in e.correct) for c, e in zip(chosen_norm, examples)]
        return TaskScore(task.name, task.metric, _mean(scores), len(scores),
                         tuple(e.options[c] for c, e in zip(chosen, examples)), tuple(scores), _mean(norm))
    completions = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)
    scores = [float(task.score(e, c)) for e, c in zip(examples, completions)]
    return TaskScore(task.name, task.metric, _mean(scores), len(scores), tuple(completions), tuple(scores))


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
    payload = [[list(e.prompt), repr(e.target), list(e.options), list(e.correct)] for e in task.eval]
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
