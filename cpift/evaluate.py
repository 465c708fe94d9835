"""Scoring models item by item: batched greedy generation, multiple choice by log-likelihood,
retention on held-out text.

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
- :func:`evaluate_model` scores one model on a run's tasks and retention suite: every item, and
  the scores they average to. :mod:`cpift.scores` turns them into the reported numbers.
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
from .runs import ITEM_COLUMNS

SCORE_COLUMNS = ("model", "seed", "task", "metric", "score", "n")
"""The columns of :attr:`Evaluation.scores` (``n``: items, or tokens for the retention prose)."""
RETENTION = "retention"
"""The ``task`` of every retention row; its ``metric`` names the retention task or measure."""


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
    """Next-token accuracy and perplexity on ``texts``, weighted by token (no chat template), and
    per text its correct predictions (``chunk_correct``) and scored tokens (``chunk_tokens``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, correct, tokens = 0.0, [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True,
                          truncation=True, max_length=max_length).to(device)
        logits = model(**batch).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        valid = batch["attention_mask"][:, 1:].bool()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total_loss += float(loss[valid].sum())
        correct += ((logits.argmax(-1) == targets) & valid).sum(1).tolist()
        tokens += valid.sum(1).tolist()
    model.train(was_training)
    count = sum(tokens)
    if not count:
        return {"next_token_accuracy": float("nan"), "perplexity": float("nan"), "tokens": 0,
                "chunk_correct": correct, "chunk_tokens": tokens}
    return {"next_token_accuracy": sum(correct) / count, "perplexity": math.exp(total_loss / count), "tokens": count,
            "chunk_correct": correct, "chunk_tokens": tokens}


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


@dataclass(frozen=True)
class Evaluation:
    """One model's evaluation: ``items`` (one row per scored item, the columns of
    :data:`cpift.runs.ITEM_COLUMNS`) and ``scores`` (one row per score, :data:`SCORE_COLUMNS`:
    the items' means, plus the retention prose's perplexity, which is no item score)."""

    items: pd.DataFrame
    scores: pd.DataFrame


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    label: str,
    tasks: Sequence[Task],
    *,
    seed: int = 0,
    retention_texts: Sequence[str] = (),
    retention_tasks: Sequence[Task] = (),
    max_new_tokens: int = 32,
    batch_size: int = 8,
    cache: EvalCache | None = None,
    progress: bool | None = None,
) -> Evaluation:
    """Score one model on every task (and the retention suite), item by item.

    ``label`` names the model and ``seed`` the run seed that trained it. Each retention task
    (never trained on, e.g. the zero-shot questions) is scored like a task under the task
    ``retention``, its name as the metric; the retention texts give ``retention``/
    ``next_token_accuracy`` (one item per text, weighted by its tokens) and the score
    ``retention``/``perplexity``.
    """
    model_key = fingerprint(model) if cache is not None else ""
    items, scores = [], []

    def add(task: str, metric: str, item_scores: Sequence[float], predictions: Sequence[str],
            weights: Sequence[float] | None = None) -> None:
        n = len(item_scores)
        weights = [1.0] * n if weights is None else list(map(float, weights))
        items.append(pd.DataFrame({"model": label, "seed": seed, "task": task, "metric": metric, "item": range(n),
                                   "score": list(map(float, item_scores)), "weight": weights,
                                   "prediction": list(map(str, predictions))}))
        mean = float(np.average(item_scores, weights=weights)) if n and sum(weights) else float("nan")
        scores.append({"model": label, "seed": seed, "task": task, "metric": metric, "score": mean,
                       "n": int(sum(weights)) if task == RETENTION and metric == "next_token_accuracy" else n})

    # (task, row task, row metric): a retention task's row is filed under "retention", by name.
    jobs = [(task, task.name, None) for task in tasks] + [(task, RETENTION, task.name) for task in retention_tasks]
    for task, row_task, row_metric in jobs:
        key = f"{model_key}:{task_fingerprint(task, max_new_tokens=max_new_tokens)}"
        result = cache.get(key) if cache is not None else None
        if result is None:
            result = asdict(score_task(model, tokenizer, task, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, progress=progress))
            if cache is not None:
                cache.put(key, result)
        add(row_task, row_metric or result["metric"], result["scores"], result["predictions"])
    if retention_texts:
        text_key = hashlib.blake2b("\n\0".join(retention_texts).encode(), digest_size=16).hexdigest()
        key = f"{model_key}:retention-chunks:{text_key}"  # entries before per-chunk counts are not reused
        result = cache.get(key) if cache is not None else None
        if result is None:
            result = retention(model, tokenizer, retention_texts, batch_size=batch_size)
            if cache is not None:
                cache.put(key, result)
        accuracy = [c / t if t else 0.0 for c, t in zip(result["chunk_correct"], result["chunk_tokens"])]
        add(RETENTION, "next_token_accuracy", accuracy, [""] * len(accuracy), result["chunk_tokens"])
        scores.append({"model": label, "seed": seed, "task": RETENTION, "metric": "perplexity",
                       "score": result["perplexity"], "n": result["tokens"]})
    return Evaluation(pd.concat(items, ignore_index=True) if items else pd.DataFrame(columns=list(ITEM_COLUMNS)),
                      pd.DataFrame(scores, columns=list(SCORE_COLUMNS)))


