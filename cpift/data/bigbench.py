"""BIG-bench tasks offline, from the benchmark's source distribution on PyPI.

The sdist ``bigbench==1.0.0`` (358 MB, Apache-2.0) carries the whole benchmark as data:
``bigbench/benchmark_tasks/<path>/task.json``, 1,041 task files. The package itself is never
installed (its dependencies are heavy); :func:`fetch` downloads the sdist once with pip (so a
configured index or mirror is honoured), checks its SHA-256 and keeps it in
``$CPIFT_CACHE/bigbench-1.0.0/``. Task files are extracted lazily: :func:`task_json` reads
``tasks/<path>.json.gz`` there, and extracts every missing task asked for in one pass over the
archive (about 5 s). Later fresh clones on the same machine reuse the cache.

A task is named ``bigbench:<path>`` (``bigbench:logical_deduction/three_objects``). Its examples
have an ``input`` and either ``target_scores`` (multiple choice: option text → score) or a
``target`` (free text). cpift follows the task's ``preferred_score``: a multiple-choice example
(``preferred_score`` ``multiple_choice_grade``, or no ``target``) keeps its options and is scored by
log-likelihood (the correct options are those of the highest score; a generated answer, should a
caller generate, matches when it equals a correct option); any other is a generation example scored
by exact match of its ``target`` (or any of its targets), :func:`~cpift.data.scoring.text_match`. Training on an example
teaches the correct option's text, or the target, as the assistant's answer.

The prompt is rendered as BIG-bench renders a zero-shot query, with its task-header prefixes and
its defaults: ``task_prefix`` + ``example_input_prefix`` (``"\\nQ: "``) + input [+ the choices,
each after ``choice_prefix`` (``"\\n  choice: "``), when ``append_choices_to_input`` (default
true)] + ``example_output_prefix`` (``"\\nA: "``), stripped; it is the user turn of a chat example.

Training and evaluation examples are disjoint and a pure function of the seed: the examples are
shuffled by ``seed``, the first ``n_eval`` are the evaluation set, the next ``n_train`` the
training set; a task with fewer examples caps ``n_eval`` at half of them (a warning says so).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..errors import CpiftError, ParameterError
from .embedded import derive_rng
from .scoring import text_match
from .tasks import Example, Task

__all__ = ["PREFIX", "SDIST", "SDIST_SHA256", "bigbench_task", "cache_root", "fetch", "is_bigbench_name",
           "task_json", "task_paths"]

_log = logging.getLogger(__name__)

PREFIX = "bigbench:"
SDIST = "bigbench==1.0.0"
SDIST_FILE = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
_MEMBER_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_INDEX = "index.json"
# BIG-bench's own defaults for a JSON task's rendering (bigbench/api/json_task.py)
_DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
             "choice_prefix": "\n  choice: ", "append_choices_to_input": True}


def is_bigbench_name(name: object) -> bool:
    """Whether ``name`` names a BIG-bench task (``bigbench:<path>``)."""
    return isinstance(name, str) and name.startswith(PREFIX) and len(name) > len(PREFIX)


def cache_root() -> Path:
    """Where the sdist, its index and the extracted tasks are kept (``$CPIFT_CACHE/bigbench-1.0.0``)."""
    from ..models import cache_dir

    return cache_dir() / "bigbench-1.0.0"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(*, progress: bool = True) -> Path:
    """The cached sdist, downloaded (and its index of task paths built) on first use.

    Raises:
        CpiftError: pip could not download it (no network, no index), or its checksum differs.
    """
    root = cache_root()
    sdist = root / SDIST_FILE
    if sdist.is_file() and (root / _INDEX).is_file():
        return sdist
    root.mkdir(parents=True, exist_ok=True)
    if not sdist.is_file():
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            if progress:
                print(f"cpift: fetching the BIG-bench tasks ({SDIST}, 358 MB, once) into {root}", file=sys.stderr)
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                       "--no-build-isolation", "--disable-pip-version-check", "-d", tmp, SDIST]
            done = subprocess.run(command, stdout=None if progress else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            downloaded = Path(tmp) / SDIST_FILE
            if done.returncode or not downloaded.is_file():
                tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
                raise CpiftError(f"could not download {SDIST} with pip ({tail[0]}); the BIG-bench tasks need it "
                                 f"once: where this machine's package index lacks it, copy {SDIST_FILE} (SHA-256 "
                                 f"{SDIST_SHA256}) from a machine that has it into {root}")
            if _sha256(downloaded) != SDIST_SHA256:
                raise CpiftError(f"{SDIST}: the downloaded {SDIST_FILE} has another SHA-256 than {SDIST_SHA256}")
            os.replace(downloaded, sdist)
    elif _sha256(sdist) != SDIST_SHA256:  # copied in by hand: checked as a download is
        raise CpiftError(f"{sdist} has another SHA-256 than {SDIST}'s {SDIST_SHA256}: delete it and fetch again")
    paths = sorted(_paths_in(sdist))
    atomic_write_bytes(root / _INDEX, json.dumps({"sha256": SDIST_SHA256, "tasks": paths}).encode())
    return sdist


def _paths_in(sdist: Path) -> Iterable[str]:
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            if member.isfile() and member.name.startswith(_MEMBER_PREFIX) and member.name.endswith("/task.json"):
                yield member.name[len(_MEMBER_PREFIX):-len("/task.json")]


def task_paths() -> list[str]:
    """Every task path in the benchmark (``logical_deduction/three_objects``, …); fetches once."""
    fetch()
    return json.loads((cache_root() / _INDEX).read_text())["tasks"]


def _extracted(path: str) -> Path:
    return cache_root() / "tasks" / f"{path}.json.gz"


def task_json(paths: str | Sequence[str]) -> dict[str, dict[str, Any]]:
    """The parsed ``task.json`` of each of ``paths`` (``logical_deduction/three_objects``), by path;
    the missing ones are extracted from the sdist in one pass.

    Raises:
        ParameterError: a path that is not a task of the benchmark (with the closest ones).
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    missing = [p for p in paths if not _extracted(p).is_file()]
    if missing:
        known = set(task_paths())
        for path in missing:
            if path not in known:
                near = sorted(k for k in known if k.split("/")[0] == path.split("/")[0]) or sorted(known)[:8]
                raise ParameterError(f"unknown BIG-bench task {PREFIX + path!r}; e.g. "
                                     + ", ".join(PREFIX + k for k in near[:8]))
        wanted = {_MEMBER_PREFIX + p + "/task.json": p for p in missing}
        with tarfile.open(fetch(), "r:gz") as archive:
            for member in archive:
                path = wanted.get(member.name)
                if path is not None:
                    data = archive.extractfile(member).read()
                    atomic_write_bytes(_extracted(path), gzip.compress(data, mtime=0))
    return {p: json.loads(gzip.decompress(_extracted(p).read_bytes())) for p in paths}


def _render(header: Mapping[str, Any], example: Mapping[str, Any], options: Sequence[str]) -> str:
    settings = {**_DEFAULTS, **{k: header[k] for k in _DEFAULTS if k in header}}
    text = settings["task_prefix"] + settings["example_input_prefix"] + str(example["input"])
    if options and settings["append_choices_to_input"]:
        text += "".join(settings["choice_prefix"] + option for option in options)
    return (text + settings["example_output_prefix"]).strip()


def _example(name: str, header: Mapping[str, Any], raw: Mapping[str, Any], index: int) -> Example | None:
    """One BIG-bench example as a chat example; ``None`` for one cpift cannot use (no answer)."""
    scores = raw.get("target_scores") or {}
    targets = raw.get("target")
    targets = [targets] if isinstance(targets, str) else [str(t) for t in targets or []]
    multiple_choice = bool(scores) and (header.get("preferred_score") == "multiple_choice_grade" or not targets)
    if multiple_choice:
        options = tuple(str(option) for option in scores)
        best = max(scores.values())
        correct = tuple(i for i, value in enumerate(scores.values()) if value == best)
        answer, target = options[correct[0]], tuple(options[i] for i in correct)
    elif targets:
        options, correct, answer, target = (), (), targets[0], tuple(targets)
    else:
        return None
    prompt = _render(header, raw, options)
    messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})
    return Example(messages=messages, target=target, options=options, correct=correct,
                   meta={"task": name, "index": index})


def bigbench_task(name: str, n_train: int = 64, n_eval: int = 32, seed: int = 0) -> Task:
    """The BIG-bench task ``name`` (``bigbench:<path>``) with disjoint, seeded training and
    evaluation examples (see the module docstring).

    Raises:
        ParameterError: not a BIG-bench name, an unknown task, or one with no usable example.
        CpiftError: the one-time download failed.
    """
    if not is_bigbench_name(name):
        raise ParameterError(f"a BIG-bench task is named {PREFIX}<path>, got {name!r}")
    path = name[len(PREFIX):]
    header = task_json(path)[path]
    examples = [e for i, raw in enumerate(header.get("examples", ())) if (e := _example(name, header, raw, i))]
    if not examples:
        subtasks = [PREFIX + path + "/" + s.get("name", "?") for s in header.get("subtasks", ())]
        hint = f"; it has subtasks: {', '.join(subtasks)}" if subtasks else ""
        raise ParameterError(f"BIG-bench task {name!r} has no example cpift can use{hint}")
    order = list(range(len(examples)))
    derive_rng(f"bigbench|{path}", seed).shuffle(order)
    if n_eval + n_train > len(examples) and n_eval > len(examples) // 2:
        _log.warning("BIG-bench task %s has %d examples: n_eval %d capped at %d", name, len(examples), n_eval,
                     len(examples) // 2)
        n_eval = len(examples) // 2
    shuffled = [examples[i] for i in order]
    multiple_choice = bool(examples[0].options)
    return Task(
        name=name,
        family=str(header.get("keywords", ["bigbench"])[0]),
        train=tuple(shuffled[n_eval:n_eval + n_train]),
        eval=tuple(shuffled[:n_eval]),
        score=text_match,
        metric="accuracy" if multiple_choice else "exact_match",
        description=str(header.get("description", "")),
    )
