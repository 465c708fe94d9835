"""One place to get any task by name or spec.

:func:`get_task` resolves, in order:

1. a mapping → a dataset spec for :func:`~cpift.data.hub.load_task` (``n_train``, ``n_eval`` and
   ``seed`` given to :func:`get_task` fill in what the spec leaves out);
2. ``"retention_qa"`` → :func:`~cpift.data.retention.retention_task` (no training examples; the
   counts and seed do not apply);
3. an embedded task name (:data:`~cpift.data.embedded.EMBEDDED_TASKS`) → :func:`embedded_task`;
4. ``bigbench:<path>`` → that BIG-bench task (:func:`~cpift.data.bigbench.bigbench_task`, offline
   after a one-time download);
5. a hub preset name (:data:`HUB_PRESETS`: ``gsm8k``, ``codealpaca``, ``logiqa``, ``alpaca``,
   ``ultrachat``) → that preset spec, loaded from the Hugging Face hub (needs the network or
   the local ``datasets`` cache).

:func:`available_tasks` lists the names that work offline, and with ``include_hub=True`` the
presets too.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from cpift.data.bigbench import bigbench_task, is_bigbench_name
from cpift.data.embedded import EMBEDDED_TASKS, embedded_task
from cpift.data.hub import load_task
from cpift.data.retention import RETENTION_TASK, retention_task
from cpift.data.tasks import Task
from cpift.errors import ParameterError

__all__ = ["HUB_PRESETS", "available_tasks", "get_task"]

HUB_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "gsm8k": MappingProxyType({"source": "openai/gsm8k", "config": "main", "format": "gsm8k",
                               "eval_split": "test"}),
    # No unit tests in CodeAlpaca: evaluated on the embedded code task (hidden tests, sandbox).
    "codealpaca": MappingProxyType({"source": "sahil2801/CodeAlpaca-20k", "format": "codealpaca",
                                    "eval_task": "code"}),
    "logiqa": MappingProxyType({"source": "lucasmccabe/logiqa", "format": "logiqa", "eval_split": "test"}),
    "alpaca": MappingProxyType({"source": "tatsu-lab/alpaca", "format": "alpaca"}),
    "ultrachat": MappingProxyType({"source": "HuggingFaceH4/ultrachat_200k", "format": "ultrachat",
                                   "split": "train_sft", "eval_split": "test_sft", "max_turns": 1}),
})
"""Specs (without ``name``, counts or seed) of the paper's datasets on the Hugging Face hub."""


def available_tasks(include_hub: bool = False) -> list[str]:
    """Task names :func:`get_task` resolves: the embedded suite and ``"retention_qa"`` (all
    offline), plus the hub presets when ``include_hub`` is true."""
    names = [*EMBEDDED_TASKS, RETENTION_TASK]
    return names + list(HUB_PRESETS) if include_hub else names


def get_task(name_or_spec: str | Mapping[str, Any], n_train: int = 64, n_eval: int = 32, seed: int = 0) -> Task:
    """The task a name or spec denotes (see the module docstring for the resolution order).

    Raises:
        ParameterError: an unknown name (the message lists the known ones), a bad count, seed or
            spec.
        CpiftError: a dataset that cannot be loaded (see :func:`~cpift.data.hub.load_task`).
    """
    if isinstance(name_or_spec, Mapping):
        return load_task({"n_train": n_train, "n_eval": n_eval, "seed": seed, **name_or_spec})
    if not isinstance(name_or_spec, str):
        raise ParameterError(f"a task is a name or a spec mapping, got {type(name_or_spec).__name__}")
    name = name_or_spec.strip()
    if name == RETENTION_TASK:
        return retention_task()
    if name in EMBEDDED_TASKS:
        return embedded_task(name, n_train=n_train, n_eval=n_eval, seed=seed)
    if is_bigbench_name(name):
        return bigbench_task(name, n_train=n_train, n_eval=n_eval, seed=seed)
    if name in HUB_PRESETS:
        return load_task({"name": name, "n_train": n_train, "n_eval": n_eval, "seed": seed, **HUB_PRESETS[name]})
    raise ParameterError(
        f"unknown task {name_or_spec!r}; known: {', '.join(available_tasks(include_hub=True))}, "
        f"bigbench:<path> (a BIG-bench task), or a dataset spec mapping (see cpift.data.hub)"
    )
