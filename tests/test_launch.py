"""Runs as separate processes: start, watch, stop (the whole process group), resume; the CPU estimate."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from cpift.config import ConfigError, load_config, read_config
from cpift.errors import CpiftError
from cpift.estimate import estimate_cpu_seconds, planned_work
from cpift.explore import run_progress
from cpift.launch import start_run, stop_run
from cpift.runs import LAUNCH_LOG, METRICS_JSON, RunDir, RunLockedError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = CONFIGS / "tiny.toml"


def wait_for(condition, what: str, seconds: float = 240.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_watch_stop_and_resume(tmp_path):
    out = tmp_path / "run"
    # a few methods (faster), gallop at two densities: two models
    config = load_config(TINY, ['run.methods=["cpift", "multitask", "gallop"]', "sparse.density=[5.0, 20.0]"])
    launch = start_run(config, out)
    assert os.getpgid(launch.pid) == launch.pid  # its own process group, apart from ours
    assert launch.log == out / LAUNCH_LOG

    running = wait_for(lambda: (p := run_progress(out)).steps_done >= 3 and p, "three optimizer steps")
    assert running.status == "running" and running.pid == launch.pid
    assert 1 <= running.step <= running.steps and running.loss > 0
    assert list(running.losses["n"]) == list(range(1, running.steps_done + 1))
    assert running.steps_planned == sum(planned_work(config)[0].values()) == 4 * 3 + 4 + 4 + 2 * 4
    with pytest.raises(RunLockedError, match=f"PID {launch.pid}"):
        start_run(None, out, resume=True)
    with pytest.raises(CpiftError, match="already exists"):
        start_run(str(TINY), out)

    assert stop_run(out) is True
    assert not group_exists(launch.pid)
    stopped = run_progress(out)
    assert stopped.status == "stopped" and not stopped.active
    assert "cpift: stopped" in stopped.log_tail
    assert stop_run(out) is False  # nothing left to stop
    done_before = stopped.steps_done

    again = start_run(None, out, resume=True)
    finished = wait_for(lambda: not (p := run_progress(out)).active and p, "the resumed run to end")
    assert finished.status == "done", finished.log_tail
    assert finished.steps_done == finished.steps_planned > done_before
    assert set(finished.methods_done) == set(finished.methods)
    assert RunDir.open(out).read_json(METRICS_JSON)["scores"]
    # "done" is recorded before the process prints its table and exits
    assert wait_for(lambda: not group_exists(again.pid), "the finished run's processes to exit")


def test_a_bad_config_fails_before_anything_starts(tmp_path):
    text = TINY.read_text().replace("steps = 4", "steps = -4")
    with pytest.raises(ConfigError, match="train.steps"):
        start_run(text, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ConfigError, match="does not exist"):
        start_run(str(tmp_path / "missing.toml"), tmp_path / "bad")
    with pytest.raises(CpiftError, match="does not exist"):
        start_run(None, tmp_path / "nothing", resume=True)


def test_read_config_takes_a_path_text_or_config():
    from_path = read_config(str(TINY))
    assert read_config(TINY) == from_path == read_config(from_path)
    assert read_config(TINY.read_text()) == from_path


def tree_state(path: Path) -> dict[str, tuple[int, str]]:
    return {str(f.relative_to(path)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(path.rglob("*")) if f.is_file()}


def test_progress_of_a_finished_run_reads_only(tiny_run):
    before = tree_state(tiny_run.path)
    progress = run_progress(tiny_run.path)
    assert tree_state(tiny_run.path) == before
    assert progress.status == "done" and progress.pid is None and progress.eta_s is None
    assert progress.steps_done == progress.steps_planned == len(progress.losses)
    assert progress.fraction == 1.0
    assert progress.log_tail == ""  # not started through start_run: no launch log


def test_progress_tells_a_died_and_a_failed_run(tmp_path):
    config = read_config(TINY).to_dict()
    died = RunDir.create(tmp_path / "died", config)  # status "running", nobody holds the lock
    assert run_progress(died.path).status == "died"
    failed = RunDir.create(tmp_path / "failed", config)
    failed.set_status("failed", error="CheckpointError: probes/math is corrupt")
    progress = run_progress(failed.path)
    assert progress.status == "failed" and progress.error == "CheckpointError: probes/math is corrupt"
    assert stop_run(failed.path) is False


def test_cpu_estimate_follows_the_measured_costs():
    methods = 'run.methods=["cpift", "multitask", "multistage", "sequential"]'
    quick = load_config(CONFIGS / "quick.toml", [methods])
    estimate = estimate_cpu_seconds(quick)
    # probes 3 × 10, cpift 10, multitask 10, multistage 10, sequential A once + B for 2 variants
    assert estimate.steps == 30 + 10 + 10 + 10 + 3 * 10 == 90
    assert estimate.models == 1 + 4 + 1 + 1 + 3
    assert estimate.train_s == pytest.approx(90 * 8.0)  # 8 s per step at batch 4 × 128
    # per model: one generation batch per task (8 prompts, 32 tokens, 7 s), 8 retention chunks,
    # and the 13 zero-shot retention questions in 2 generation batches
    assert estimate.eval_s == pytest.approx(10 * (3 * 7.0 + 17.0 * 8 * 110 / 4096 + 2 * 7.0))
    assert estimate.total_s == pytest.approx(estimate.train_s + estimate.eval_s + 60.0)
    doubled = estimate_cpu_seconds(load_config(CONFIGS / "quick.toml", [methods, "train.batch_size=8"]))
    assert doubled.train_s == pytest.approx(2 * estimate.train_s)
    assert estimate_cpu_seconds(load_config(TINY)) is None  # costs measured for the embedded model only
