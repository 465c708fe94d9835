"""The run directory: manifest, lock (with a real second process), events, atomic artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cpift._version import __version__
from cpift.errors import CpiftError, FormatError, ParameterError
from cpift.runs import (
    EVENTS,
    FORMAT,
    FORMAT_VERSION,
    LOCK,
    MANIFEST,
    RunDir,
    RunLockedError,
    checkpoint_dir,
    method_final_dir,
    probe_dir,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"run": {"name": "t"}, "data": {"tasks": ["math", "code"]}}


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    return RunDir.create(tmp_path / "run", CONFIG)


# -- manifest ------------------------------------------------------------------------------------


def test_create_writes_manifest_and_open_reads_it(run: RunDir) -> None:
    manifest = json.loads((run.path / MANIFEST).read_text())
    assert manifest["format"] == FORMAT == "cpift.run"
    assert manifest["version"] == FORMAT_VERSION == 1
    assert manifest["cpift_version"] == __version__
    assert manifest["status"] == "running" and manifest["stage"] is None and manifest["error"] is None
    assert manifest["config"] == CONFIG
    assert manifest["created"].endswith("+00:00")
    assert (run.path / EVENTS).is_file()
    again = RunDir.open(run.path)
    assert again == run and again.config == CONFIG and again.status == "running"


def test_create_takes_a_config_object(tmp_path: Path) -> None:
    class Cfg:
        def to_dict(self) -> dict:
            return {"run": {"name": "x"}}

    assert RunDir.create(tmp_path / "r", Cfg()).config == {"run": {"name": "x"}}


def test_create_refuses_an_existing_run_but_takes_an_empty_dir(tmp_path: Path, run: RunDir) -> None:
    with pytest.raises(CpiftError, match="already exists"):
        RunDir.create(run.path, CONFIG)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert RunDir.create(empty, CONFIG).status == "running"


def test_create_with_unserialisable_config_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        RunDir.create(tmp_path / "r", {"x": object()})
    assert not (tmp_path / "r").exists()


def test_set_status_and_stage(run: RunDir) -> None:
    run.set_stage("probe")
    assert run.stage == "probe" and run.status == "running"
    run.set_status("failed", error="boom")
    assert run.status == "failed" and run.manifest["error"] == "boom" and run.stage == "probe"
    run.set_status("running", stage="fusion", note=3)
    manifest = RunDir.open(run.path).manifest
    assert manifest["status"] == "running" and manifest["error"] is None
    assert manifest["stage"] == "fusion" and manifest["note"] == 3
    with pytest.raises(ParameterError, match="status"):
        run.set_status("finished")
    with pytest.raises(ParameterError, match="config"):
        run.set_status("done", config={})


def test_running_context_sets_final_status(tmp_path: Path) -> None:
    done = RunDir.create(tmp_path / "a", CONFIG)
    with done.running():
        assert done.status == "running" and done.manifest["pid"] == os.getpid()
    assert done.status == "done"

    failed = RunDir.create(tmp_path / "b", CONFIG)
    with pytest.raises(ValueError), failed.running():
        raise ValueError("bad value")
    assert failed.status == "failed" and failed.manifest["error"] == "ValueError: bad value"

    stopped = RunDir.create(tmp_path / "c", CONFIG)
    with pytest.raises(KeyboardInterrupt), stopped.running():
        raise KeyboardInterrupt
    assert stopped.status == "stopped"


def _manifest_with(run: RunDir, **changes: object) -> None:
    manifest = json.loads((run.path / MANIFEST).read_text())
    manifest.update(changes)
    (run.path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r.path / MANIFEST).unlink(), "missing"),
        (lambda r: (r.path / MANIFEST).write_text('{"format": "cpift.run", "vers'), "unreadable"),
        (lambda r: (r.path / MANIFEST).write_text("[1, 2]"), "not a cpift run manifest"),
        (lambda r: _manifest_with(r, format="cpift.core_regions"), "not a cpift run manifest"),
        (lambda r: _manifest_with(r, version=2), "version 2"),
        (lambda r: _manifest_with(r, status="exploded"), "unknown run status"),
        (lambda r: _manifest_with(r, config=None), "no config"),
    ],
)
def test_bad_manifest_is_a_format_error_naming_the_file(run: RunDir, damage, message: str) -> None:
    damage(run)
    with pytest.raises(FormatError, match=message) as info:
        RunDir.open(run.path)
    assert str(run.path / MANIFEST) in str(info.value)


def test_open_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CpiftError, match="does not exist"):
        RunDir.open(tmp_path / "nope")


# -- lock ----------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys, time
    from cpift.runs import RunDir
    run = RunDir.open(sys.argv[1])
    with run.lock():
        print("locked", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture
def holder(run: RunDir):
    """A second process holding the run's lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run.path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "locked", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def test_lock_held_by_another_process(run: RunDir, holder: subprocess.Popen) -> None:
    assert (run.path / LOCK).read_text().strip() == str(holder.pid)
    assert run.locked_by() == holder.pid
    with pytest.raises(CpiftError) as info, run.lock():
        pass
    assert str(info.value) == f"run directory is locked by PID {holder.pid}"
    assert isinstance(info.value, RunLockedError) and info.value.pid == holder.pid
    # a second RunDir object in this process is refused the same way
    with pytest.raises(RunLockedError), RunDir.open(run.path).lock():
        pass


def test_lock_released_when_the_holder_is_killed(run: RunDir, holder: subprocess.Popen) -> None:
    holder.kill()
    holder.wait(timeout=30)
    assert run.locked_by() is None
    with run.lock():
        assert (run.path / LOCK).read_text().strip() == str(os.getpid())
        assert run.locked_by() == os.getpid()
    assert run.locked_by() is None


def test_lock_is_reentrant_and_released_on_exception(run: RunDir) -> None:
    with pytest.raises(RuntimeError), run.lock():
        with run.lock():
            assert run.locked_by() == os.getpid()
        assert run.locked_by() == os.getpid()
        raise RuntimeError
    assert run.locked_by() is None
    with run.lock():
        pass


def test_lock_removes_temps_of_dead_writers(run: RunDir) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run.path / "methods" / "cpift" / f".final.tmp-{dead.pid}-abc"
    stale.mkdir(parents=True)
    live = run.path / f".similarity.json.tmp-{os.getpid()}-xyz"
    live.write_text("{}")
    with run.lock():
        assert not stale.exists() and live.exists()


# -- events --------------------------------------------------------------------------------------


def test_events_round_trip(run: RunDir) -> None:
    first = run.log_event(event="train_step", step=1, loss=np.float32(2.5), tags={"a", "b"})
    run.log_event(event="stage", stage="fusion")
    run.log_event(event="train_step", step=2, loss=float("nan"), time=5.0)
    events = run.events()
    assert [e["event"] for e in events] == ["train_step", "stage", "train_step"]
    assert events[0] == {"time": first["time"], "event": "train_step", "step": 1, "loss": 2.5, "tags": ["a", "b"]}
    assert isinstance(events[1]["time"], float) and events[2]["time"] == 5.0
    assert np.isnan(events[2]["loss"])
    assert [e["step"] for e in run.events("train_step")] == [1, 2]


def test_truncated_last_line_is_skipped_then_cut(run: RunDir) -> None:
    run.log_event(event="a")
    run.log_event(event="b")
    with open(run.path / EVENTS, "ab") as fh:  # a writer killed mid-line
        fh.write(b'{"time": 1.0, "event": "c", "lo')
    assert [e["event"] for e in run.events()] == ["a", "b"]
    run.log_event(event="d")  # the partial line is cut off before appending
    assert [e["event"] for e in run.events()] == ["a", "b", "d"]
    assert (run.path / EVENTS).read_text().count("\n") == 3


def test_events_corrupt_middle_line_and_missing_file(run: RunDir) -> None:
    (run.path / EVENTS).write_text('{"event": "a"}\nnot json\n{"event": "b"}\n')
    with pytest.raises(FormatError, match="line 2") as info:
        run.events()
    assert str(run.path / EVENTS) in str(info.value)
    (run.path / EVENTS).unlink()
    assert run.events() == []
    run.log_event(event="x")
    assert [e["event"] for e in run.events()] == ["x"]


# -- files and artifacts -------------------------------------------------------------------------


def test_json_and_paths(run: RunDir) -> None:
    path = run.write_json("groups.json", {"groups": [["math"], ["code"]], "tau": np.float64(0.1)})
    assert path == run.path / "groups.json"
    assert run.read_json("groups.json") == {"groups": [["math"], ["code"]], "tau": 0.1}
    assert run.exists("groups.json") and not run.exists("similarity.json")
    assert run.read_json("similarity.json", default=None) is None
    with pytest.raises(FormatError, match="similarity.json"):
        run.read_json("similarity.json")
    (run.path / "bad.json").write_text("{")
    with pytest.raises(FormatError, match="bad.json"):
        run.read_json("bad.json")
    deep = run.path_for("logs/sub/pipeline.log")
    assert deep.parent.is_dir() and not deep.exists()
    run.write_text("metrics.csv", "a,b\n1,2\n")
    assert (run.path / "metrics.csv").read_text() == "a,b\n1,2\n"
    for bad in ("../escape.json", "/abs.json", "", "."):
        with pytest.raises(ParameterError):
            run.path_for(bad)


def test_artifact_dir_is_atomic(run: RunDir) -> None:
    target = method_final_dir("cpift")
    with pytest.raises(RuntimeError), run.artifact_dir(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")
    assert not run.exists(target)
    assert list((run.path / "methods" / "cpift").iterdir()) == []  # no temporary left behind
    with run.artifact_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not run.exists(target)
    assert (run.path / target / "config.json").read_text() == "{}"
    with pytest.raises(FileExistsError), run.artifact_dir(target):
        pass
    with run.artifact_dir(target, overwrite=True) as tmp:
        (tmp / "other").write_text("x")
    assert sorted(p.name for p in (run.path / target).iterdir()) == ["other"]


def test_path_helpers() -> None:
    assert probe_dir("math") == "probes/math"
    assert method_final_dir("multistage") == "methods/multistage/final"
    assert checkpoint_dir("probe-math", 10) == "checkpoints/probe-math/step-000010"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ParameterError):
            probe_dir(bad)
    with pytest.raises(ParameterError):
        checkpoint_dir("x", -1)
