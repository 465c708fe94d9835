"""Starting a run as a separate process, watching that process and stopping it: the app's Training page.

:func:`start_run` validates a config (a TOML file, TOML text or a :class:`~cpift.config.Config`),
creates the run directory and starts ``python -m cpift.cli run CONFIG --out DIR --resume`` in a
new session (``start_new_session=True``), so the run is its own process group and outlives the
Streamlit session — and the browser tab — that started it. Its stdout and stderr go to
``logs/launch.log`` in the run directory (a file, never a pipe: nobody has to drain it, and a
page opened later still reads it). The parent creates the directory itself so that the log
exists from the first byte; the child therefore always opens the run (``--resume``), which for a
new run simply finds nothing done yet.

Files this module writes in ``logs/`` (:data:`LAUNCH_LOG`, :data:`LAUNCH_CONFIG`,
:data:`LAUNCH_RECORD`): the log; the validated config as TOML (the child reads it; its local
paths are absolute); and ``{"pid", "command", "started"}`` of the last launch, which lets
:func:`launcher_alive` tell a process that is still importing torch from one that died.

:func:`stop_run` ends the run's process group: SIGTERM (which ``cpift`` turns into a clean stop,
status ``"stopped"``), then SIGKILL after a grace period. Processes are looked at through
``psutil``. A run's progress is read by :func:`cpift.explore.run_progress`, and its CPU time
predicted before launch by :func:`cpift.estimate.estimate_cpu_seconds`. Training uses the GPU when
``torch.cuda`` has one (``run.device = "auto"``), see :func:`launch_device`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .config import Config, parse_config, read_config
from .errors import ParameterError
from .runs import LAUNCH_CONFIG, LAUNCH_LOG, LAUNCH_RECORD, RunDir, RunLockedError

__all__ = ["Launch", "launch_device", "launcher_alive", "start_run", "stop_run"]


STOP_GRACE_S = 20.0
"""Seconds :func:`stop_run` waits after SIGTERM before SIGKILL: a clean stop finishes the current
optimizer step or generation batch first (a few seconds for SmolLM2-135M on CPU)."""

# Processes this Python process started, by PID, so that their exit is reaped (no zombies in a
# long-lived Streamlit server) and stop_run can wait on them directly.
_CHILDREN: dict[int, subprocess.Popen] = {}


def launch_device(config: Config) -> str:
    """The device the run will train on here: ``"cuda"`` when ``torch.cuda.is_available()`` and
    ``run.device`` is ``"auto"`` (or ``"cuda"``), ``"mps"`` likewise, else ``"cpu"``.

    Raises:
        ParameterError: ``run.device`` names a device this machine does not have.
    """
    from .train import resolve_device

    return resolve_device(config.run.device)


# -- starting and stopping -----------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """A started run: its directory, the process (the leader of its own process group), the log."""

    run_dir: Path
    pid: int
    log: Path
    command: tuple[str, ...]
    process: subprocess.Popen | None = field(default=None, compare=False, repr=False)


def start_run(
    config: Config | str | os.PathLike[str] | None, out_dir: str | os.PathLike[str], *, resume: bool = False
) -> Launch:
    """Start ``cpift run`` on ``config`` into ``out_dir`` as a separate process; returns at once.

    Everything that can be checked before training is checked here, so a bad config raises now
    rather than in the log: the config's keys and values, its tasks and data, its device. With
    ``resume=True``, ``out_dir`` must be an existing run; it continues with the run's own config
    (``config`` may be ``None``; if given it must equal the run's).

    Raises:
        ConfigError: the config is invalid (names the key).
        CpiftError: ``out_dir`` exists already (without ``resume``), or is not a run (with it).
        RunLockedError: a process is working on the run.
    """
    from .pipeline import build_tasks, open_run, retention_suite, train_config

    if resume:
        run = RunDir.open(out_dir)
        _check_not_running(run)
        config = parse_config(run.config) if config is None else config
    elif config is None:
        raise ParameterError("start_run needs a config to start a new run")
    config = read_config(config)
    build_tasks(config)
    retention_suite(config)
    train_config(config)
    launch_device(config)
    run = open_run(out_dir, config, resume=resume)  # a resume refuses a config other than the run's
    config_path = run.write_text(LAUNCH_CONFIG, config.to_toml())
    command = (sys.executable, "-m", "cpift.cli", "run", str(config_path), "--out", str(run.path), "--resume")
    log_path = run.path_for(LAUNCH_LOG)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"--- {_dt.datetime.now().isoformat(timespec='seconds')} {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=env, cwd=os.getcwd())
    _CHILDREN[process.pid] = process
    run.write_json(LAUNCH_RECORD, {"pid": process.pid, "command": list(command), "started": time.time()})
    return Launch(run.path, process.pid, log_path, command, process)


def _check_not_running(run: RunDir) -> None:
    pid = run.locked_by() or launcher_alive(run)
    if pid is not None:
        raise RunLockedError(run.path, pid)


def _launch_record(run: RunDir) -> dict[str, Any]:
    record = run.read_json(LAUNCH_RECORD, default={})
    return record if isinstance(record, dict) else {}


# -- processes -------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not; a child of ours is reaped here)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # also ZombieProcess, where a zombie's state cannot be read
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def launcher_alive(run: RunDir) -> int | None:
    """The PID of ``run``'s last launch (:func:`start_run`) if that process still runs, else ``None``.

    A PID the system has since given to another process does not count: the process's command
    line must name the run.
    """
    pid = _launch_record(run).get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.AccessDenied:
        return pid  # its command line cannot be read: trust the record
    except psutil.NoSuchProcess:
        return None  # it ended since
    return pid if str(run.path) in cmdline else None


def _in_group(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid  # psutil has no process group
    except ProcessLookupError:  # exited while we looked
        return False


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a live (non-zombie) member."""
    # Our own child is alive until waitpid says it exited: a leader whose main thread ended while
    # other threads finish reads as a zombie, but its group is not gone yet. Reaping it here also
    # keeps an exited group from lingering as a zombie.
    if _alive(pgid) and pgid in _CHILDREN:
        return True
    live = any(proc.info["status"] != psutil.STATUS_ZOMBIE and _in_group(proc.pid, pgid)
               for proc in psutil.process_iter(["status"]))
    if not live:
        _alive(pgid)  # the leader may have exited during the scan: reap it, so the group is gone
    return live


def _wait_group(pgid: int, seconds: float) -> bool:
    """Wait until process group ``pgid`` is gone; whether it went within ``seconds``."""
    # Polled rather than psutil.wait_procs: the group may gain members while we wait, and a zombie
    # whose parent is not us counts as gone here but would keep wait_procs waiting.
    deadline = time.monotonic() + seconds
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_run(run_dir: str | os.PathLike[str], *, grace_s: float = STOP_GRACE_S) -> bool:
    """End the process group working on ``run_dir``: SIGTERM, then SIGKILL after ``grace_s``.

    The PID comes from the run's lock (:meth:`RunDir.locked_by`), or from the launch record
    while a just-started process has not taken the lock yet. ``cpift`` answers SIGTERM by
    stopping cleanly (status ``"stopped"``); a run killed outright is marked ``"stopped"`` here.
    Returns whether there was a process to stop. The run can be continued with
    ``start_run(None, run_dir, resume=True)``.
    """
    run = RunDir.open(run_dir)
    pid = run.locked_by() or launcher_alive(run)
    if pid is None:
        return False
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    if pgid == os.getpgid(0):  # a run started in our own group (not by start_run): spare ourselves
        os.kill(pid, signal.SIGTERM)
        pgid = pid
    else:
        os.killpg(pgid, signal.SIGTERM)
    if not _wait_group(pgid, grace_s):
        with contextlib.suppress(ProcessLookupError):  # it ended between the check and the signal
            os.killpg(pgid, signal.SIGKILL)
        _wait_group(pgid, 10.0)
    if run.status == "running" and run.locked_by() is None:
        try:
            with run.lock():
                if run.status == "running":
                    run.set_status("stopped", error=f"killed by the user after {grace_s:g} s")
        except RunLockedError:
            pass  # another process took the run over in the meantime: its status is its own
    return True
