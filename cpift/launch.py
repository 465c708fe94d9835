"""Starting a run as a separate process, watching it and stopping it: the app's Training page.

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
paths are absolute); and ``{"pid", "command", "started"}`` of the last launch, which lets a
reader tell a process that is still importing torch (``"starting"``) from one that died.

:func:`run_progress` summarises a run from its manifest, ``events.jsonl`` and log: status
(``"running"``/``"starting"``/``"done"``/``"failed"``/``"stopped"``, or ``"died"`` for a run
whose process ended without recording an outcome), stage, step/steps, the loss curve, ETA,
tokens/s, the error and the log's tail. It only reads: a page may poll it every second on a run it
merely views. :func:`stop_run` ends the run's process group: SIGTERM (which ``cpift`` turns into
a clean stop, status ``"stopped"``), then SIGKILL after a grace period.

:func:`estimate_cpu_seconds` predicts a run's CPU time from its config before launch; see its
docstring for the measured costs it rests on. Training uses the GPU when ``torch.cuda`` has one
(``run.device = "auto"``), see :func:`launch_device`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import tomllib

from .config import Config, ConfigError, load_config, parse_config
from .errors import CpiftError, ParameterError
from .runs import LAUNCH_CONFIG, LAUNCH_LOG, LAUNCH_RECORD, RunDir, RunLockedError

__all__ = [
    "CpuEstimate",
    "Launch",
    "Progress",
    "estimate_cpu_seconds",
    "launch_device",
    "planned_work",
    "read_config",
    "run_progress",
    "start_run",
    "stop_run",
]


STOP_GRACE_S = 20.0
"""Seconds :func:`stop_run` waits after SIGTERM before SIGKILL: a clean stop finishes the current
optimizer step or generation batch first (a few seconds for SmolLM2-135M on CPU)."""

LOG_TAIL_LINES = 40

# Processes this Python process started, by PID, so that their exit is reaped (no zombies in a
# long-lived Streamlit server) and stop_run can wait on them directly.
_CHILDREN: dict[int, subprocess.Popen] = {}


# -- config ----------------------------------------------------------------------------------------


def read_config(config: Config | str | os.PathLike[str]) -> Config:
    """A validated :class:`Config` from a ``Config``, a TOML file path, or TOML text.

    A :class:`~pathlib.Path`, or a one-line string naming an existing file, is read as a file;
    any other string is TOML text (relative local paths in it are looked up from the current
    directory).

    Raises:
        ConfigError: invalid TOML or an invalid value, naming the key (and the file).
    """
    if isinstance(config, Config):
        return config
    if isinstance(config, os.PathLike) or ("\n" not in config and Path(config).expanduser().is_file()):
        return load_config(config)
    if "\n" not in config and config.strip().endswith(".toml"):
        return load_config(config)  # a path that does not exist: load_config says so, naming it
    try:
        data = tomllib.loads(config)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(None, f"invalid TOML: {exc}") from exc
    return parse_config(data)


def launch_device(config: Config) -> str:
    """The device the run will train on here: ``"cuda"`` when ``torch.cuda.is_available()`` and
    ``run.device`` is ``"auto"`` (or ``"cuda"``), ``"mps"`` likewise, else ``"cpu"``.

    Raises:
        ParameterError: ``run.device`` names a device this machine does not have.
    """
    from .train import resolve_device

    return resolve_device(config.run.device)


# -- what a run will do, and what it costs on a CPU ---------------------------------------------------


def planned_work(config: Config) -> tuple[dict[str, int], dict[str, int]]:
    """Optimizer steps and scored models per method of ``config``, from each method's declared
    :class:`~cpift.methods.registry.Plan`, and the base model (under ``"base"``: 0 steps, scored once)."""
    from .methods import METHODS

    plans = {method: METHODS[method].plan(config) for method in config.run.methods}
    return ({"base": 0, **{m: p.steps for m, p in plans.items()}},
            {"base": 1, **{m: p.models for m, p in plans.items()}})


@dataclass(frozen=True)
class CpuEstimate:
    """A run's predicted CPU time (seconds), by part; ``total_s`` is their sum."""

    steps: int
    models: int
    train_s: float
    eval_s: float
    overhead_s: float
    basis: str

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_s + self.overhead_s


# Measured on the project's 2-core x86_64 CPU machine with SmolLM2-135M-Instruct in float32 (the
# numbers in configs/quick.toml's header): one AdamW step at batch 4 × 128 tokens ≈ 8 s; greedy
# generation of 32 new tokens for a batch of 8 prompts ≈ 7 s; a forward pass over 32 × 128
# tokens ≈ 17 s; loading the model, core regions and fusion together ≈ 60 s.
_STEP_S, _STEP_TOKENS = 8.0, 4 * 128
_GENERATE_S, _GENERATE_TOKENS = 7.0, 8 * 32
_FORWARD_S, _FORWARD_TOKENS = 17.0, 32 * 128
_OVERHEAD_S = 60.0
_RETENTION_CHUNK_TOKENS = 110  # cpift.data.retention_text's 512-character chunks, in SmolLM2 tokens


def estimate_cpu_seconds(config: Config) -> CpuEstimate | None:
    """Predicted CPU time of a run of ``config`` on a 2-core machine, or ``None`` for a model
    whose costs were not measured (only the embedded SmolLM2-135M's are).

    The costs (measured on the project's 2-core x86_64 machine, float32, see configs/quick.toml):
    an optimizer step of 4 × 128 tokens ≈ 8 s, generating 32 tokens for 8 prompts ≈ 7 s, a
    forward pass over 32 × 128 tokens ≈ 17 s, and ≈ 60 s of loading, core regions and fusion.
    Each scales linearly with its tokens: a step with ``batch_size × grad_accum × max_length``,
    a generation batch with ``eval.batch_size × max_new_tokens``, retention with its prose chunks
    (≈ 110 tokens each) and its zero-shot questions (generated in batches like a task). For
    ``configs/quick.toml`` this predicts 17.5 min; the measured run took 19 min. Steps and scored models come from :func:`planned_work`; each scored
    model generates ``⌈n_eval / eval.batch_size⌉`` batches per task.
    """
    from .models import is_embedded_name

    if not is_embedded_name(config.model.name):
        return None
    plan_steps, plan_models = planned_work(config)
    steps, models = sum(plan_steps.values()), sum(plan_models.values())
    t, e = config.train, config.eval
    step_s = _STEP_S * t.batch_size * t.grad_accum * config.data.max_length / _STEP_TOKENS
    batches = len(config.data.tasks) * math.ceil(config.data.n_eval / e.batch_size)
    generate_s = batches * _GENERATE_S * e.batch_size * e.max_new_tokens / _GENERATE_TOKENS
    # Retention: a forward pass over the prose chunks, and the zero-shot questions generated like a task.
    from .data import retention_task

    questions = len(retention_task().eval)
    retention_s = (_FORWARD_S * e.n_retention_chunks * _RETENTION_CHUNK_TOKENS / _FORWARD_TOKENS
                   + math.ceil(questions / e.batch_size) * _GENERATE_S * e.batch_size * e.max_new_tokens
                   / _GENERATE_TOKENS if e.retention else 0.0)
    return CpuEstimate(
        steps=steps, models=models, train_s=steps * step_s, eval_s=models * (generate_s + retention_s),
        overhead_s=_OVERHEAD_S,
        basis=(f"{steps} optimizer steps × {step_s:.1f} s and {models} scored models × "
               f"{generate_s + retention_s:.0f} s, from costs measured on a 2-core CPU"),
    )


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
    from .pipeline import build_tasks, open_run, train_config

    if resume:
        run = RunDir.open(out_dir)
        _check_not_running(run)
        config = parse_config(run.config) if config is None else config
    elif config is None:
        raise ParameterError("start_run needs a config to start a new run")
    config = read_config(config)
    build_tasks(config)
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
    pid = run.locked_by() or _launcher_alive(run)
    if pid is not None:
        raise RunLockedError(run.path, pid)


def _launch_record(run: RunDir) -> dict[str, Any]:
    record = run.read_json(LAUNCH_RECORD, default={})
    return record if isinstance(record, dict) else {}


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not; a child of ours is reaped here)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc here: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state != "Z"


def _launcher_alive(run: RunDir) -> int | None:
    """The PID of the last launch's process if it still runs (a reused PID must name the run)."""
    pid = _launch_record(run).get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return pid  # no /proc: trust the record
    return pid if os.fsencode(str(run.path)) in cmdline else None


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a live (non-zombie) member."""
    # Our own child is alive until waitpid says it exited: a leader whose main thread ended while
    # other threads finish reads as a zombie in /proc, but its group is not gone yet. Reaping it
    # here also keeps an exited group from lingering as a zombie.
    if _alive(pgid) and pgid in _CHILDREN:
        return True
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    live = False
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited while we looked
            live = live or (int(fields[2]) == pgid and fields[0] != "Z")
    if not live:
        _alive(pgid)  # the leader may have exited during the scan: reap it, so the group is gone
    return live


def _wait_group(pgid: int, seconds: float) -> bool:
    """Wait until process group ``pgid`` is gone; whether it went within ``seconds``."""
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
    pid = run.locked_by() or _launcher_alive(run)
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


# -- progress --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """What :func:`run_progress` read from a run directory.

    ``status`` is the manifest's, refined by who holds the run: ``"starting"`` (launched, not yet
    locked), ``"running"`` (a process holds the lock), ``"died"`` (the manifest says running but
    no process works on it: it can be resumed). ``losses`` has one row per optimizer step (the
    latest attempt of each ``stage``/``step`` after a resume) with columns ``time``, ``stage``,
    ``step``, ``steps``, ``loss``, ``lr``, ``tokens_per_s``, ``eta_s`` and ``n`` (steps done in
    the whole run up to that row). ``eta_s`` is the current stage's remaining time as the trainer
    reported it; ``run_eta_s`` the remaining optimizer steps of the whole run (:func:`planned_work`)
    at the median measured time per step (training only; scoring comes on top).
    """

    path: Path
    status: str
    pid: int | None
    stage: str | None
    error: str | None
    created: str | None
    updated: str | None
    methods: tuple[str, ...]
    methods_done: tuple[str, ...]
    training_stage: str | None
    step: int | None
    steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    steps_done: int
    steps_planned: int | None
    run_eta_s: float | None
    losses: pd.DataFrame
    log_tail: str

    @property
    def active(self) -> bool:
        """Whether a process is working on the run now."""
        return self.status in ("starting", "running")

    @property
    def fraction(self) -> float | None:
        """Optimizer steps done over those planned, in [0, 1] (``None`` when unknown)."""
        if not self.steps_planned:
            return None
        return min(1.0, self.steps_done / self.steps_planned)


_LOSS_COLUMNS = ("time", "stage", "step", "steps", "loss", "lr", "tokens_per_s", "eta_s")


def run_progress(run_dir: str | os.PathLike[str]) -> Progress:
    """A run's progress from its manifest, ``events.jsonl`` and ``logs/launch.log``; reads only.

    Raises:
        CpiftError: ``run_dir`` does not exist.
        FormatError: the manifest or the events are corrupt or of another version (names the file).
    """
    run = RunDir.open(run_dir)
    manifest = run.manifest
    status = manifest["status"]
    pid = run.locked_by()
    if pid is not None:
        status = "running"
    else:
        pid = _launcher_alive(run)
        if pid is not None:
            status = "starting"
        elif status == "running":
            status = "died"

    steps = [e for e in run.events("step") if {"stage", "step"} <= e.keys()]
    losses = pd.DataFrame([{k: e.get(k) for k in _LOSS_COLUMNS} for e in steps], columns=list(_LOSS_COLUMNS))
    losses = losses.drop_duplicates(["stage", "step"], keep="last").reset_index(drop=True)
    losses["n"] = range(1, len(losses) + 1)
    last = steps[-1] if steps else {}

    config = manifest["config"]
    methods = tuple(config.get("run", {}).get("methods", ()))
    try:
        planned = sum(planned_work(parse_config(config))[0].values())
    except CpiftError:  # a config this version cannot read (written by another version)
        planned = None
    run_eta = None
    if status in ("starting", "running") and planned is not None:
        per_step = _seconds_per_step(losses)
        if per_step is not None:
            run_eta = max(0, planned - len(losses)) * per_step

    return Progress(
        path=run.path, status=status, pid=pid, stage=manifest.get("stage"), error=manifest.get("error"),
        created=manifest.get("created"), updated=manifest.get("updated"), methods=methods,
        methods_done=tuple(e.get("method") for e in run.events("method_done")),
        training_stage=last.get("stage"), step=last.get("step"), steps=last.get("steps"), loss=last.get("loss"),
        tokens_per_s=last.get("tokens_per_s"), eta_s=last.get("eta_s") if status == "running" else None,
        steps_done=len(losses), steps_planned=planned, run_eta_s=run_eta, losses=losses,
        log_tail=_log_tail(run.path / LAUNCH_LOG),
    )


def _seconds_per_step(losses: pd.DataFrame) -> float | None:
    """The median time between consecutive steps of the same stage (evaluation gaps excluded)."""
    if len(losses) < 2:
        return None
    gaps = losses["time"].diff()[losses["stage"].eq(losses["stage"].shift())]
    gaps = gaps[gaps > 0]
    return float(gaps.median()) if len(gaps) else None


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 65536) -> str:
    """The last ``lines`` lines of a log, progress-bar redraws (``\\r``) reduced to their last state."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", "replace")
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(line for line in kept[-lines:])
