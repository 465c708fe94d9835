"""BIG-bench tasks from a hand-made archive in the sdist's layout (the real one is fetched only by
users; one test reads it when this machine's cache has it)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from cpift.data import bigbench, get_task
from cpift.errors import CpiftError, ParameterError
from cpift.models import cache_dir

MULTIPLE_CHOICE = {
    "name": "three_objects", "description": "Order three objects.", "keywords": ["logical reasoning"],
    "preferred_score": "multiple_choice_grade", "task_prefix": "Order them.\n\n", "example_input_prefix": "",
    "example_output_prefix": " ", "append_choices_to_input": False,
    "examples": [{"input": f"Shelf {i}: the red book is left of the blue book.",
                  "target_scores": {"The red book is the leftmost.": 1, "The blue book is the leftmost.": 0}}
                 for i in range(40)],
}
GENERATION = {
    "name": "2_digit_multiplication", "keywords": ["arithmetic"], "preferred_score": "exact_str_match",
    "examples": [{"input": f"What is {i} times 3?", "target": str(3 * i),
                  "target_scores": {str(3 * i): 1.0, "banana": 0.0}} for i in range(10, 30)],
}
PARENT = {"name": "arithmetic", "keywords": ["arithmetic"], "subtasks": [{"name": "2_digit_multiplication"}]}


def _archive(path: Path, tasks: dict[str, dict]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for task_path, content in tasks.items():
            data = json.dumps(content).encode()
            member = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task_path}/task.json")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


@pytest.fixture()
def cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache holding a small sdist as if fetched."""
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache"))
    root = bigbench.cache_root()
    root.mkdir(parents=True)
    _archive(root / bigbench.SDIST_FILE, {"logical_deduction/three_objects": MULTIPLE_CHOICE,
                                          "arithmetic/2_digit_multiplication": GENERATION, "arithmetic": PARENT})
    monkeypatch.setattr(bigbench, "SDIST_SHA256", bigbench._sha256(root / bigbench.SDIST_FILE))
    return root


def test_multiple_choice_task(cached: Path) -> None:
    task = get_task("bigbench:logical_deduction/three_objects", n_train=10, n_eval=20, seed=1)
    assert (task.name, task.metric, task.family) == ("bigbench:logical_deduction/three_objects", "accuracy",
                                                     "logical reasoning")
    assert len(task.train) == 10 and len(task.eval) == 20
    assert not {e.meta["index"] for e in task.train} & {e.meta["index"] for e in task.eval}
    example = task.eval[0]
    assert example.options == ("The red book is the leftmost.", "The blue book is the leftmost.")
    assert example.correct == (0,) and example.target == ("The red book is the leftmost.",)
    assert example.prompt[0]["content"].startswith("Order them.\n\nShelf ")  # header prefixes, choices not appended
    assert example.answer == "The red book is the leftmost."  # training teaches the correct option's text
    assert task.score(example, "the red book is the leftmost") == 1.0 and task.score(example, "blue") == 0.0
    # a pure function of the seed; another seed, another split
    assert get_task("bigbench:logical_deduction/three_objects", n_train=10, n_eval=20, seed=1).eval == task.eval
    assert get_task("bigbench:logical_deduction/three_objects", n_train=10, n_eval=20, seed=2).eval != task.eval
    assert (cached / "tasks" / "logical_deduction" / "three_objects.json.gz").is_file()  # extracted once


def test_generation_task_and_default_rendering(cached: Path) -> None:
    task = get_task("bigbench:arithmetic/2_digit_multiplication", n_train=4, n_eval=4)
    example = task.eval[0]
    assert task.metric == "exact_match" and example.options == ()
    assert example.prompt[0]["content"].startswith("Q: What is ") and example.prompt[0]["content"].endswith("\nA:")
    assert task.score(example, example.target[0]) == 1.0 and task.score(example, "banana") == 0.0


def test_n_eval_is_capped_by_the_task(cached: Path, caplog: pytest.LogCaptureFixture) -> None:
    task = get_task("bigbench:arithmetic/2_digit_multiplication", n_train=64, n_eval=200)
    assert len(task.eval) == 10 and len(task.train) == 10
    assert "capped at 10" in caplog.text


def test_unknown_and_unusable_tasks(cached: Path) -> None:
    with pytest.raises(ParameterError, match=r"unknown BIG-bench task 'bigbench:logical_deduction/nine'.*three_objects"):
        get_task("bigbench:logical_deduction/nine")
    with pytest.raises(ParameterError, match=r"no example.*subtasks: bigbench:arithmetic/2_digit_multiplication"):
        get_task("bigbench:arithmetic")


def test_a_failed_or_altered_download_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache"))

    def offline(command, **_kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(CpiftError, match=r"could not download bigbench==1.0.0 with pip.*copy bigbench-1.0.0.tar.gz"):
        get_task("bigbench:logical_deduction/three_objects")

    def altered(command, **_kwargs):
        _archive(Path(command[command.index("-d") + 1]) / bigbench.SDIST_FILE, {"x": GENERATION})
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", altered)
    with pytest.raises(CpiftError, match="another SHA-256"):
        bigbench.fetch(progress=False)
    assert not (bigbench.cache_root() / bigbench.SDIST_FILE).exists()


@pytest.mark.skipif(not (cache_dir() / "bigbench-1.0.0" / bigbench.SDIST_FILE).is_file(),
                    reason="the real BIG-bench sdist is not in this machine's cache (cpift fetches it on first use)")
def test_the_real_benchmark() -> None:
    assert len(bigbench.task_paths()) == 1041
    task = get_task("bigbench:logical_deduction/three_objects", n_train=20, n_eval=200)
    assert len(task.eval) == 200 and all(len(e.options) == 3 for e in task.eval)


def test_bigbench_tasks_train_and_serve_as_retention_tasks_in_a_run(cached: Path, tmp_path: Path) -> None:
    from cpift.config import ConfigError, load_config
    from cpift.pipeline import run_config

    root = Path(__file__).resolve().parents[1]
    overrides = ['data.tasks=["math", "bigbench:logical_deduction/three_objects"]', 'run.methods=["multitask"]',
                 'sequential.second="bigbench:logical_deduction/three_objects"',
                 'eval.retention_tasks=["bigbench:arithmetic/2_digit_multiplication"]', "train.steps=2",
                 "data.n_eval=4"]
    with pytest.raises(ConfigError, match=r"eval\.retention_tasks\[0\].*is trained on"):
        load_config(root / "configs/tiny.toml", [*overrides[:3], 'eval.retention_tasks=["math"]'])
    run = run_config(load_config(root / "configs/tiny.toml", overrides), tmp_path / "run", progress=False)
    scores = run.path / "metrics.csv"
    text = scores.read_text()
    assert "bigbench:logical_deduction/three_objects" in text and "bigbench:arithmetic/2_digit_multiplication" in text
    assert (run.path / "methods" / "multitask" / "final").is_dir()


def test_an_sdist_copied_in_by_hand_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache"))
    root = bigbench.cache_root()
    root.mkdir(parents=True)
    _archive(root / bigbench.SDIST_FILE, {"x": GENERATION})
    with pytest.raises(CpiftError, match=r"bigbench-1.0.0.tar.gz has another SHA-256 .*delete it"):
        bigbench.fetch(progress=False)
    assert not (root / "index.json").exists()
