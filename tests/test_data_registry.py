"""The task registry: names, presets and specs resolve to tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cpift.data
from cpift.data import EMBEDDED_TASKS, HUB_PRESETS, RETENTION_TASK, Task, available_tasks, get_task, registry
from cpift.errors import ParameterError

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"


def test_available_tasks() -> None:
    names = available_tasks()
    assert names == [*EMBEDDED_TASKS, RETENTION_TASK]
    assert available_tasks(include_hub=True) == names + ["gsm8k", "codealpaca", "logiqa", "alpaca", "ultrachat"]


@pytest.mark.parametrize("name", available_tasks())
def test_every_offline_name_resolves(name: str) -> None:
    task = get_task(name, n_train=4, n_eval=3, seed=1)
    assert isinstance(task, Task) and task.name == name
    if name != RETENTION_TASK:
        assert len(task.train) == 4 and len(task.eval) == 3
        assert task.eval == get_task(name, n_train=9, n_eval=3, seed=1).eval


def test_specs_take_the_call_defaults_unless_they_set_them() -> None:
    spec = {"name": "g", "source": str(FIXTURES / "gsm8k.jsonl"), "format": "gsm8k"}
    task = get_task(spec, n_train=2, n_eval=1, seed=4)
    assert (len(task.train), len(task.eval)) == (2, 1)
    task = get_task({**spec, "n_train": 3}, n_train=1, n_eval=2)
    assert (len(task.train), len(task.eval)) == (3, 2)


def test_presets_go_to_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(registry, "load_task", lambda spec: seen.append(dict(spec)) or "task")
    assert get_task("gsm8k", n_train=5, n_eval=6, seed=7) == "task"
    assert seen == [{"name": "gsm8k", "n_train": 5, "n_eval": 6, "seed": 7, **HUB_PRESETS["gsm8k"]}]
    assert HUB_PRESETS["codealpaca"]["eval_task"] == "code"
    for name, preset in HUB_PRESETS.items():
        assert preset["format"] == name and "name" not in preset


def test_unknown_names() -> None:
    with pytest.raises(ParameterError, match=r"unknown task 'chess'.*math.*retention_qa.*gsm8k"):
        get_task("chess")
    with pytest.raises(ParameterError, match="name or a spec"):
        get_task(3)  # type: ignore[arg-type]


def test_public_names() -> None:
    for name in cpift.data.__all__:
        assert hasattr(cpift.data, name), name
