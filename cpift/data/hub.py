"""The paper's real datasets (and any other), from the Hugging Face hub or local files, as tasks.

:func:`load_task` turns a *spec* (a mapping, e.g. a block of a run's config) into a
:class:`~cpift.data.tasks.Task`. The data come from ``datasets.load_dataset(source, config,
split=…)`` for a hub id, or from a local file with the hub's columns: ``.jsonl``, ``.json`` (an
array of records, ``{"data": [...]}``, or JSON Lines), ``.parquet`` or ``.csv`` (local files are
read directly, without the ``datasets`` cache). A local *directory* holds one file per split,
named after it (``train.jsonl``, ``test.parquet``, …).

===============  ==========================================  ========  =====================================
``format``       columns                                     family    metric (scorer)
===============  ==========================================  ========  =====================================
``gsm8k``        ``question``, ``answer`` ("… #### 72")       math      ``exact_match`` on the final number
``codealpaca``   ``instruction``, ``input``\\*, ``output``     code      ``none`` — see below
``logiqa``       ``context``, ``query``, ``options``,         logic     ``accuracy`` of the chosen letter
                 ``correct_option`` (0-based index or letter)
``alpaca``       ``instruction``, ``input``\\*, ``output``     chat      ``none`` (trained only)
``ultrachat``    ``messages`` (list of {role, content}) or   chat      ``none`` (trained only)
                 ``data`` (list of turns, user first)
``custom``       ``columns``: {prompt, answer, target\\*,      custom    ``scorer`` key (see below)
                 system\\*} → your column names
===============  ==========================================  ========  =====================================

(\\* optional.) Conversions: GSM8K answers keep their reasoning, lose the ``<<48/2=24>>``
calculator annotations, and end with "The answer is N." like the embedded ``math`` task; LogiQA
becomes "context, question, A. … D. …" answered "Answer: C" like the embedded ``logic`` task;
Alpaca prompts are the instruction, then a blank line and the input when there is one; UltraChat
conversations keep every turn (``max_turns`` keeps the first N user/assistant exchanges) and end at
the last assistant turn.

**Metrics of free-form data.** CodeAlpaca has no unit tests, and Alpaca / UltraChat answers have
no single right answer; a similarity score (BLEU, ROUGE) is not automatic *correctness*, so these
tasks get ``metric="none"`` and the :func:`~cpift.data.scoring.unscored` scorer (NaN): they are
trained on and never scored. To evaluate such a task anyway, set ``eval_task`` to an embedded task
name: the task then keeps its own training data but takes that embedded task's evaluation
examples, scorer and metric — the natural choice for CodeAlpaca is ``eval_task: code`` (one-line
functions checked by hidden unit tests in the sandbox, ``pass@1``).

Spec keys (unknown keys are refused, so typos surface):

* ``name`` (required) — the task's name;
* ``source`` (required) — a hub id (``"openai/gsm8k"``) or a local file or directory;
* ``format`` (required) — one of :data:`FORMATS`;
* ``config`` — the hub dataset's configuration (``"main"`` for GSM8K);
* ``split`` / ``train_split`` (aliases; default ``"train"``) and ``eval_split`` — the splits to
  take training and evaluation examples from. Without ``eval_split`` (and ``eval_source``), the
  evaluation examples are carved out of the training split;
* ``eval_source`` — another hub id / file for the evaluation examples (with ``eval_split``,
  default ``"train"`` for a file, ``"test"`` for a hub id);
* ``n_train`` (default 64; ``None`` = every usable row), ``n_eval`` (default 32), ``seed``
  (default 0) — a seeded sample of rows; the evaluation set is drawn first, so it does not depend
  on ``n_train``, and no training prompt equals an evaluation prompt;
* ``columns`` (``custom`` only), ``scorer`` (``custom`` only: ``"final_number"``, ``"choice"``,
  ``"contains"``, ``"exact"`` or ``"none"``; default ``"exact"`` with a ``target`` column, else
  ``"none"``), ``family`` and ``description`` (override the defaults), ``system`` (a system
  message put before every example), ``max_turns`` (``ultrachat``), ``eval_task`` (above).

When the evaluation set is carved from the training split and that split holds fewer than
``n_train + n_eval`` rows, the evaluation set is capped at half the rows (a warning says so).
Rows that cannot be converted (an empty answer, no "####" in a GSM8K answer, a LogiQA option index
out of range) are skipped with a warning; a missing *column* is an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cpift.data import scoring
from cpift.data.embedded import derive_rng, embedded_task
from cpift.data.spec import CUSTOM_ROLES, DatasetSpec
from cpift.data.tasks import Example, Message, Scorer, Task
from cpift.errors import CpiftError, ParameterError
from cpift.settings import config_error
from cpift.sources import looks_like_path

__all__ = ["CUSTOM_SCORERS", "DATA_SUFFIXES", "FORMATS", "SPEC_KEYS", "load_task", "read_rows"]

_log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("gsm8k", "codealpaca", "logiqa", "alpaca", "ultrachat", "custom")
"""Dataset schemas :func:`load_task` understands."""

SPEC_KEYS: frozenset[str] = frozenset(DatasetSpec.model_fields)
"""Keys a spec may hold."""

DATA_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet", ".csv")
"""Local file types :func:`read_rows` reads."""

CUSTOM_SCORERS: dict[str, tuple[Scorer, str]] = {
    "final_number": (scoring.number_match, "exact_match"),
    "choice": (scoring.letter_match, "accuracy"),
    "contains": (scoring.contains_any, "accuracy"),
    "exact": (scoring.text_match, "exact_match"),
    "none": (scoring.unscored, scoring.NO_METRIC),
}
"""``scorer`` names of a ``custom`` spec → (scorer, metric)."""

_LETTERS = "ABCDEFGHIJ"


# ==============================================================================================
# Reading rows
# ==============================================================================================


def read_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a local ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file, as dicts.

    Raises:
        CpiftError: the file is missing, of an unknown type, unreadable or not a list of records
            (the message names the file, and the line for JSON Lines).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CpiftError(f"dataset file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            rows = _read_json(path)
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets and pandas
                raise CpiftError(f"reading {str(path)!r} needs pyarrow: {exc}") from exc
            rows = pq.read_table(path).to_pylist()
        elif suffix == ".csv":
            import pandas as pd

            rows = pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
        else:
            raise CpiftError(f"dataset file {str(path)!r} has an unknown type; use one of {', '.join(DATA_SUFFIXES)}")
    except CpiftError:
        raise
    except Exception as exc:
        raise CpiftError(f"cannot read dataset file {str(path)!r}: {exc}") from exc
    if not all(isinstance(row, dict) for row in rows):
        raise CpiftError(f"dataset file {str(path)!r} must hold records (JSON objects), one per row")
    return rows


def _read_json(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError:
            data = None  # maybe JSON Lines in a .json file, as datasets accepts
        else:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                return data["data"]
            if isinstance(data, list):
                return data
            if isinstance(data, dict):
                return [data]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise CpiftError(f"dataset file {str(path)!r}, line {number}: not valid JSON ({exc})") from None
    return rows


@dataclass
class _Table:
    """Rows of one split, indexable without converting all of them (hub splits can be large)."""

    label: str  # names the file or hub split in messages
    columns: frozenset[str]
    length: int
    get: Callable[[int], dict[str, Any]]


def _looks_local(source: str) -> bool:
    """Whether a spec's source is a local file or directory rather than a hub id ``org/name``."""
    return Path(source).expanduser().exists() or looks_like_path(source)


def _table_from_rows(rows: list[dict[str, Any]], label: str) -> _Table:
    columns = frozenset().union(*(row.keys() for row in rows)) if rows else frozenset()
    return _Table(label, columns, len(rows), rows.__getitem__)


def _open(source: str, split: str, config: str | None, key: str, split_key: str, split_given: bool) -> _Table:
    if _looks_local(source):
        path = Path(source).expanduser()
        if path.is_dir():
            for suffix in DATA_SUFFIXES:
                candidate = path / f"{split}{suffix}"
                if candidate.is_file():
                    return _table_from_rows(read_rows(candidate), f"file {str(candidate)!r}")
            present = sorted(p.name for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)
            raise CpiftError(
                f"dataset directory {str(path)!r} (spec key {key!r}) has no file for split {split!r} "
                f"(spec key {split_key!r}); expected {split}.jsonl / .json / .parquet / .csv, found "
                f"{', '.join(present) or 'no data files'}"
            )
        if not path.exists():
            raise CpiftError(
                f"dataset file {str(path)!r} (spec key {key!r}) does not exist (a hub dataset is named 'org/name')"
            )
        if split_given and split != "train":
            raise ParameterError(
                f"spec key {split_key!r} = {split!r}: the single file {str(path)!r} has no splits; "
                f"give a directory with one file per split, or another file as 'eval_source'"
            )
        return _table_from_rows(read_rows(path), f"file {str(path)!r}")
    try:
        import datasets
    except ImportError as exc:
        raise CpiftError(f"loading {source!r} from the hub needs the 'datasets' package: {exc}") from exc
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as exc:
        raise CpiftError(
            f"cannot load dataset {source!r} (spec key {key!r}), config {config!r}, split {split!r} "
            f"from the hub: {type(exc).__name__}: {exc}"
        ) from exc
    return _Table(f"hub dataset {source!r} split {split!r}", frozenset(ds.column_names), len(ds), ds.__getitem__)


# ==============================================================================================
# Converting rows
# ==============================================================================================

Converted = tuple[tuple[Message, ...], Any]


class _Skip(Exception):
    """A row that cannot become an example (the message says why)."""


def _text(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    return value.strip()


def _required(row: Mapping[str, Any], column: str) -> str:
    text = _text(row, column)
    if not text:
        raise _Skip(f"empty {column!r}")
    return text


def _chat(prompt: str, answer: str) -> tuple[Message, ...]:
    return ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})


def _instruction_prompt(row: Mapping[str, Any]) -> str:
    instruction, extra = _required(row, "instruction"), _text(row, "input")
    return f"{instruction}\n\n{extra}" if extra else instruction


def _convert_alpaca(row: Mapping[str, Any], spec: Mapping[str, Any]) -> Converted:
    return _chat(_instruction_prompt(row), _required(row, "output")), None


def _convert_gsm8k(row: Mapping[str, Any], spec: Mapping[str, Any]) -> Converted:
    question, answer = _required(row, "question"), _required(row, "answer")
    if "####" not in answer:
        raise _Skip("no '####' before the final answer")
    body, final = answer.rsplit("####", 1)
    number = scoring.final_number(final)
    if number is None:
        raise _Skip(f"no number after '####' ({final.strip()!r})")
    shown = str(int(number)) if number.is_integer() else str(number)
    body = re.sub(r"<<[^<>]*>>", "", body).strip()
    text = f"{body}\nThe answer is {shown}." if body else f"The answer is {shown}."
    return _chat(question, text), shown


def _convert_logiqa(row: Mapping[str, Any], spec: Mapping[str, Any]) -> Converted:
    context, query = _text(row, "context"), _required(row, "query")
    options = row.get("options")
    if not isinstance(options, Sequence) or isinstance(options, str) or not 2 <= len(options) <= len(_LETTERS):
        raise _Skip(f"'options' must be a list of 2 to {len(_LETTERS)} strings")
    correct = row.get("correct_option")
    if isinstance(correct, str) and correct.strip().upper() in _LETTERS[: len(options)] and not correct.strip().isdigit():
        index = _LETTERS.index(correct.strip().upper())
    else:
        try:
            index = int(correct)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _Skip(f"'correct_option' {correct!r} is not an index or a letter") from None
        if not 0 <= index < len(options):
            raise _Skip(f"'correct_option' {index} is out of range for {len(options)} options")
    lines = "\n".join(f"{_LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options))
    prompt = f"{context}\n{query}\n{lines}" if context else f"{query}\n{lines}"
    letter = _LETTERS[index]
    return _chat(prompt, f"Answer: {letter}"), letter


_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
          "system": "system"}


def _convert_ultrachat(row: Mapping[str, Any], spec: Mapping[str, Any]) -> Converted:
    turns: list[Message] = []
    if row.get("messages") is not None:
        for turn in row["messages"]:
            if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str):
                raise _Skip("a 'messages' entry is not {role, content}")
            role = _ROLES.get(str(turn.get("role", "")).lower())
            if role is None:
                raise _Skip(f"unknown role {turn.get('role')!r}")
            turns.append({"role": role, "content": turn["content"].strip()})
    elif row.get("data") is not None:
        if isinstance(row["data"], str) or not isinstance(row["data"], Sequence):
            raise _Skip("'data' is not a list of turns")
        for i, content in enumerate(row["data"]):
            turns.append({"role": "user" if i % 2 == 0 else "assistant", "content": str(content).strip()})
    else:
        raise _Skip("neither 'messages' nor 'data' is set")
    if any(not t["content"] for t in turns):
        raise _Skip("an empty turn")
    max_turns = spec.get("max_turns")
    if max_turns is not None:
        kept, exchanges = [], 0
        for turn in turns:
            if turn["role"] == "user":
                if exchanges == max_turns:
                    break
                exchanges += 1
            kept.append(turn)
        turns = kept
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    if not any(t["role"] == "user" for t in turns) or not turns:
        raise _Skip("no user turn answered by the assistant")
    return tuple(turns), None


def _convert_custom(row: Mapping[str, Any], spec: Mapping[str, Any]) -> Converted:
    columns = spec["columns"]
    prompt, answer = _required(row, columns["prompt"]), _required(row, columns["answer"])
    messages: tuple[Message, ...] = _chat(prompt, answer)
    if columns.get("system") and _text(row, columns["system"]):
        messages = ({"role": "system", "content": _text(row, columns["system"])}, *messages)
    target = row.get(columns["target"]) if columns.get("target") else None
    return messages, target


@dataclass(frozen=True)
class _Format:
    columns: tuple[str, ...]  # required columns
    convert: Callable[[Mapping[str, Any], Mapping[str, Any]], Converted]
    family: str
    score: Scorer
    metric: str
    description: str


_FORMATS: dict[str, _Format] = {
    "gsm8k": _Format(("question", "answer"), _convert_gsm8k, "math", scoring.number_match, "exact_match",
                     "GSM8K grade-school math; exact match of the final number."),
    "codealpaca": _Format(("instruction", "output"), _convert_alpaca, "code", scoring.unscored, scoring.NO_METRIC,
                          "CodeAlpaca instructions; no unit tests, so trained only (metric 'none') unless "
                          "'eval_task' names an embedded task to evaluate with."),
    "logiqa": _Format(("context", "query", "options", "correct_option"), _convert_logiqa, "logic",
                      scoring.letter_match, "accuracy", "LogiQA multiple choice; accuracy of the chosen letter."),
    "alpaca": _Format(("instruction", "output"), _convert_alpaca, "chat", scoring.unscored, scoring.NO_METRIC,
                      "Alpaca instructions; free-form answers, trained only (metric 'none')."),
    "ultrachat": _Format((), _convert_ultrachat, "chat", scoring.unscored, scoring.NO_METRIC,
                         "UltraChat conversations; free-form answers, trained only (metric 'none')."),
    "custom": _Format((), _convert_custom, "custom", scoring.unscored, scoring.NO_METRIC, "Custom dataset."),
}


# ==============================================================================================
# The spec
# ==============================================================================================


@dataclass(frozen=True)
class _Plan:
    name: str
    source: str
    fmt: str
    config: str | None
    train_split: str
    split_key: str
    split_given: bool
    eval_source: str | None
    eval_split: str | None
    n_train: int | None
    n_eval: int
    seed: int
    eval_task: str | None


def _validate(raw: Mapping[str, Any]) -> tuple[_Plan, dict[str, Any]]:
    """The plan of a spec, and the spec as a checked plain dict (:class:`DatasetSpec`)."""
    if not isinstance(raw, Mapping):
        raise ParameterError(f"a task spec must be a mapping, got {type(raw).__name__}")
    try:
        checked = DatasetSpec.model_validate(dict(raw))
    except ValidationError as exc:
        error = config_error(exc, DatasetSpec)
        raise ParameterError(f"spec key {error.key!r}: {error.reason}" if error.key else error.reason) from None
    split_key = "train_split" if checked.train_split is not None else "split"
    eval_split = checked.eval_split
    if checked.eval_source is not None and eval_split is None:
        eval_split = "train" if _looks_local(checked.eval_source) else "test"
    plan = _Plan(
        name=checked.name, source=checked.source, fmt=checked.format, config=checked.config,
        train_split=getattr(checked, split_key) or "train", split_key=split_key,
        split_given=getattr(checked, split_key) is not None, eval_source=checked.eval_source, eval_split=eval_split,
        n_train=checked.n_train, n_eval=checked.n_eval, seed=checked.seed, eval_task=checked.eval_task,
    )
    return plan, checked.model_dump(exclude_none=True)


def _check_columns(table: _Table, fmt: str, spec: Mapping[str, Any], key: str) -> None:
    if table.length == 0:
        raise CpiftError(f"dataset {table.label} (spec key {key!r}) is empty")
    if fmt == "custom":
        columns = spec["columns"]
        needed = {(role, columns[role]) for role in CUSTOM_ROLES if columns.get(role)}
    elif fmt == "ultrachat":
        if not {"messages", "data"} & table.columns:
            raise CpiftError(f"dataset {table.label} (spec key {key!r}) has no column 'messages' or 'data' "
                             f"for format 'ultrachat'; its columns: {', '.join(sorted(table.columns))}")
        return
    else:
        needed = {(column, column) for column in _FORMATS[fmt].columns}
    for role, column in sorted(needed):
        if column not in table.columns:
            via = f" (columns.{role})" if fmt == "custom" else ""
            raise CpiftError(f"dataset {table.label} (spec key {key!r}) has no column {column!r}{via} needed by "
                             f"format {fmt!r}; its columns: {', '.join(sorted(table.columns)) or 'none'}")


def _examples(table: _Table, order: Sequence[int], spec: Mapping[str, Any], plan: _Plan, split: str,
              skipped: dict[str, int]) -> Iterator[Example]:
    convert = _FORMATS[plan.fmt].convert
    system = spec.get("system")
    for index in order:
        row = table.get(index)
        try:
            messages, target = convert(row, spec)
        except _Skip as why:
            reason = str(why)
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        if system:
            messages = ({"role": "system", "content": system}, *messages)
        yield Example(messages=tuple(messages), target=target,
                      meta={"task": plan.name, "source": plan.source, "split": split, "row": index})


def _prompt_key(example: Example) -> str:
    return json.dumps(example.prompt, sort_keys=True)


def _take(examples: Iterator[Example], n: int | None, exclude: set[str]) -> list[Example]:
    """Up to ``n`` (``None``: all) examples whose prompts are not in ``exclude`` (which grows);
    stops pulling from ``examples`` as soon as it has enough, so the rest stay for the next call."""
    out: list[Example] = []
    if n == 0:
        return out
    for example in examples:
        key = _prompt_key(example)
        if key in exclude:
            continue
        exclude.add(key)
        out.append(example)
        if n is not None and len(out) >= n:
            break
    return out


def _warn_skipped(skipped: dict[str, int], label: str) -> None:
    if skipped:
        detail = "; ".join(f"{n} × {reason}" for reason, n in sorted(skipped.items()))
        _log.warning("skipped unusable rows of %s: %s", label, detail)


def load_task(spec: Mapping[str, Any]) -> Task:
    """A task from a dataset spec (the spec keys and formats are in the module docstring).

    Raises:
        ParameterError: a malformed spec (unknown key, wrong type, unknown format), naming the key.
        CpiftError: a missing or unreadable file, an empty dataset, a missing column, a dataset
            with no usable row, or a hub failure, naming the file or dataset and the spec key.
    """
    plan, spec = _validate(spec)
    fmt = _FORMATS[plan.fmt]
    rng = derive_rng(f"load_task|{plan.source}|{plan.config}|{plan.train_split}", plan.seed)

    train_table = _open(plan.source, plan.train_split, plan.config, "source", plan.split_key, plan.split_given)
    _check_columns(train_table, plan.fmt, spec, "source")
    train_order = list(range(train_table.length))
    rng.shuffle(train_order)
    seen: set[str] = set()
    skipped: dict[str, int] = {}
    train_rows = _examples(train_table, train_order, spec, plan, plan.train_split, skipped)

    eval_examples: list[Example] = []
    if plan.eval_task is None:
        if plan.eval_split is None:  # carve the evaluation set out of the training split
            n_eval = plan.n_eval
            if plan.n_train is None or train_table.length < plan.n_train + plan.n_eval:
                n_eval = min(n_eval, train_table.length // 2)
                if n_eval < plan.n_eval:
                    _log.warning("%s has %d rows: the evaluation set of task %r is capped at %d examples",
                                 train_table.label, train_table.length, plan.name, n_eval)
            eval_examples = _take(train_rows, n_eval, seen)
        else:
            eval_source = plan.eval_source or plan.source
            eval_key = "eval_source" if plan.eval_source else "source"
            eval_table = _open(eval_source, plan.eval_split, plan.config, eval_key, "eval_split", True)
            _check_columns(eval_table, plan.fmt, spec, eval_key)
            eval_order = list(range(eval_table.length))
            derive_rng(f"load_task|eval|{eval_source}|{plan.eval_split}", plan.seed).shuffle(eval_order)
            eval_skipped: dict[str, int] = {}
            eval_examples = _take(_examples(eval_table, eval_order, spec, plan, plan.eval_split, eval_skipped),
                                  plan.n_eval, seen)
            _warn_skipped(eval_skipped, eval_table.label)
    train_examples = _take(train_rows, plan.n_train, seen)
    _warn_skipped(skipped, train_table.label)
    if not train_examples and not eval_examples:
        raise CpiftError(f"dataset {train_table.label} (spec key 'source') has no usable row for format "
                         f"{plan.fmt!r}" + (f" (skipped: {', '.join(sorted(skipped))})" if skipped else ""))

    score, metric = fmt.score, fmt.metric
    if plan.fmt == "custom":
        default = "exact" if spec["columns"].get("target") else "none"
        score, metric = CUSTOM_SCORERS[spec.get("scorer", default)]
    description = spec.get("description") or fmt.description
    if plan.eval_task is not None:
        evaluator = embedded_task(plan.eval_task, n_train=0, n_eval=plan.n_eval, seed=plan.seed)
        eval_examples, score, metric = list(evaluator.eval), evaluator.score, evaluator.metric
        description += f" Evaluated on the embedded task {plan.eval_task!r} ({metric})."
    return Task(
        name=plan.name,
        family=spec.get("family") or fmt.family,
        train=tuple(train_examples),
        eval=tuple(eval_examples),
        score=score,
        metric=metric,
        description=description,
    )
