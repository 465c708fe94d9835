"""The run directory: everything one run writes, in one layout that the app and the report read.

A run is a directory. The pipeline is its only writer (it holds :meth:`RunDir.lock` while it
works); the app and the report only read it, possibly while the run is still going. Every file is
written atomically (a temporary file or directory, then a rename, see :mod:`cpift.atomic`), so a
reader never sees half an artifact, and a run killed at any moment can be resumed: what
:meth:`RunDir.exists` reports done is complete.

Layout (paths relative to the run directory; the constant or function of this module that spells
each in brackets — writers and readers alike use them, nothing else spells a path)::

    manifest.json              [MANIFEST]      format "cpift.run", version, cpift version, created /
                                               updated times, status, current stage (and its seed),
                                               error, config, config_changes (methods added on a
                                               resume)
    run.lock                   [LOCK]          flock-ed by the process working on the run; its PID
    events.jsonl               [EVENTS]        one JSON object per line, each with "time" (Unix
                                               seconds) and by convention "event" naming its kind
    logs/launch.log            [LAUNCH_LOG]    a launched run's output (cpift.launch), its config
    logs/launch.toml           [LAUNCH_CONFIG] as the child read it, and the launch record (PID,
    logs/launch.json           [LAUNCH_RECORD] command, start time)
    eval_cache.json            [EVAL_CACHE]    scores by model fingerprint: nothing is scored twice
    probes/<task>/             [probe_dir]     the probe fine-tune of one task (a model dir; a
                                               BIG-bench task spelled by cpift.names.path_part)
    probes/<task>@<r>/         [probe_dir]     its r-th probe (r ≥ 2, probe.repeats): another data order
    regions/                   [REGIONS]       the saved CoreRegions (cpift.regions format, compact)
    regions_retest/<r>/        [retest_regions_dir] the cores of every task's r-th probe (masks only)
    reliability.json           [RELIABILITY]   each task's test–retest Jaccard beside chance
                                               (cpift.probes.reliability, as records)
    stability.json             [STABILITY]     per task, the Jaccard of the core at each snapshot
                                               step with the final core (cpift.probes.stability)
    similarity.json            [SIMILARITY]    task × task Jaccard of the cores
    groups.json                [GROUPS]        the τ grouping, the stage order, every grouping by τ
    fusion/                    [FUSION]        the fused model (a model dir)
    fusion_report.csv          [FUSION_REPORT] the fusion's per-tensor report
    methods/<method>/final/    [method_final_dir] each method's final model (a model dir)
    methods/<method>/<file>    [method_file]   a method's own artifacts:
        multistage/stages.json                 the stages in order
        <gallop|saft|pafi>/masks.npz           the selected elements per density (bit-packed, key
        <gallop|saft|pafi>/density-<d>/final/  density-<d>) and each density's model
        epi/masks/step-<n>.npz [epi_mask]      EPI: each refreshed protected set (bit-packed), and
        epi/drift.json         [EPI_DRIFT]     the Jaccard between consecutive ones
    sequential/<model>/        [sequential_dir] the A → B study: after_A, then each variant
    seeds/seed-<s>/            [seed_dir]      a further seed's artifacts (run.seeds), laid out as
                                               the top level is: probes, regions, …, methods,
                                               sequential, checkpoints. The primary (first) seed's
                                               are the top level's; see RunDir.for_seed
    checkpoints/<job>/step-<n>/ [checkpoint_dir] resumable training state of one training job
                                               (a probe, a method or one stage of it; the job is
                                               the stage name with / as _, see checkpoint_root)
    items.parquet              [ITEMS]         every scored item: the ground truth the metrics are
                                               computed from (columns: ITEM_COLUMNS, below)
    metrics.json               [METRICS_JSON]  the summary views with intervals (cpift.scores.summarize)
    metrics.csv                [METRICS_CSV]   one row per (model, seed, task, metric) score

``items.parquet`` has one row per (model, seed, task, metric, item): ``model`` (the label a
method gave it, ``base`` for the untrained model), ``seed`` (the run seed that trained it; the
base model's is the primary seed), ``task`` (a task name, or ``retention`` for the retention
suite with ``metric`` naming the retention task), ``metric``, ``item`` (the item's index in the
task's evaluation set: the same item for every model and seed), ``score`` in [0, 1],
``weight`` (1, or for a retention prose chunk its number of scored tokens), and ``prediction``
(the chosen option or the completion; empty for prose). Parquet keeps the types (int64 seed and
item, float64 score and weight).

Method and task names used in paths must be plain names (:mod:`cpift.names`), so that no name can
escape the run directory.

Status (``manifest["status"]``) is one of :data:`STATUSES`: ``"running"`` while a process works on
the run, then ``"done"``, ``"failed"`` (with ``error``) or ``"stopped"`` (interrupted by the
user). A process killed outright cannot update its status: a run whose status is ``"running"``
but whose lock nobody holds (:meth:`RunDir.locked_by` is ``None``) died and can be resumed.

Typical use by the pipeline::

    run = RunDir.create("runs/quick", config.to_dict())     # or RunDir.open(...) to resume
    with run.lock(), run.running():                           # status running → done / failed / stopped
        run.set_stage("probe")
        run.log_event(event="train_step", job="probe-math", step=1, loss=2.31)
        if not run.exists(probe_dir("math")):
            with run.artifact_dir(probe_dir("math")) as tmp:
                model.save_pretrained(tmp)
        run.write_json(SIMILARITY, {...})
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_dir, atomic_write_text, remove_stale_temps
from .errors import CpiftError, DiskFullError, FormatError, OutputExistsError, ParameterError
from .manifest import manifest_header, read_manifest
from .names import check_name, check_task_name, path_part

__all__ = [
    "CHECKPOINTS",
    "EPI_DRIFT",
    "EVAL_CACHE",
    "EVENTS",
    "FORMAT",
    "FORMAT_VERSION",
    "FUSION",
    "FUSION_REPORT",
    "ITEMS",
    "ITEM_COLUMNS",
    "GROUPS",
    "LAUNCH_CONFIG",
    "LAUNCH_LOG",
    "LAUNCH_RECORD",
    "LOCK",
    "LOGS",
    "MANIFEST",
    "METHODS",
    "METRICS_CSV",
    "METRICS_JSON",
    "PROBES",
    "REGIONS",
    "RELIABILITY",
    "RETEST_REGIONS",
    "SEEDS",
    "SEQUENTIAL",
    "SIMILARITY",
    "STABILITY",
    "STATUSES",
    "RunDir",
    "RunExistsError",
    "RunLockedError",
    "checkpoint_dir",
    "checkpoint_root",
    "epi_mask",
    "method_dir",
    "method_file",
    "method_final_dir",
    "probe_dir",
    "retest_regions_dir",
    "seed_dir",
    "sequential_dir",
]

FORMAT = "cpift.run"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
LOCK = "run.lock"
EVENTS = "events.jsonl"
LOGS = "logs"
LAUNCH_LOG = f"{LOGS}/launch.log"
LAUNCH_CONFIG = f"{LOGS}/launch.toml"
LAUNCH_RECORD = f"{LOGS}/launch.json"
EVAL_CACHE = "eval_cache.json"
PROBES = "probes"
REGIONS = "regions"
SIMILARITY = "similarity.json"
RETEST_REGIONS = "regions_retest"
RELIABILITY = "reliability.json"
STABILITY = "stability.json"
GROUPS = "groups.json"
FUSION = "fusion"
FUSION_REPORT = "fusion_report.csv"
METHODS = "methods"
SEQUENTIAL = "sequential"
CHECKPOINTS = "checkpoints"
SEEDS = "seeds"
ITEMS = "items.parquet"
ITEM_COLUMNS = ("model", "seed", "task", "metric", "item", "score", "weight", "prediction")
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"

STATUSES: tuple[str, ...] = ("running", "done", "failed", "stopped")

# Manifest keys that set_status(**extra) may not overwrite.
_RESERVED = frozenset({"format", "version", "cpift_version", "created", "config", "status"})


class RunLockedError(CpiftError):
    """Another live process holds the run directory's lock. ``pid`` is its process id (``None``
    when it could not be read) and ``path`` the run directory."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"PID {pid}" if pid is not None else "another process (PID unknown)"
        super().__init__(f"run directory is locked by {who}")


class RunExistsError(OutputExistsError):
    """A new run was asked for in a directory that already holds something (resume it instead)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "resume it (resume=True), or choose another directory")


_NAME_MAX_BYTES = 255  # NAME_MAX of Linux, macOS and Windows file systems


def _check_creatable(path: Path) -> None:
    """Refuse, with one clear message, a run directory path that cannot be created: a name longer
    than file systems allow (255 bytes), a parent that is a file, or one the system refuses."""
    for part in path.parts:
        if len(os.fsencode(part)) > _NAME_MAX_BYTES:
            raise CpiftError(f"cannot create the run directory {str(path)[:60]}…: the name {part[:40]!r}… has "
                             f"{len(part)} characters, more than a file name may ({_NAME_MAX_BYTES} bytes)")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if ancestor != path and not ancestor.is_dir():
        raise CpiftError(f"cannot create the run directory {path}: {ancestor} is a file, not a directory")
    if ancestor == path and not path.is_dir():
        raise CpiftError(f"cannot create the run directory {path}: a file of that name exists")


# -- parameterised paths -----------------------------------------------------------------------


def probe_dir(task: str, repeat: int = 1) -> str:
    """``probes/<task>``: the probe fine-tune of one task; ``probes/<task>@<repeat>`` its
    ``repeat``-th probe (2, 3, …: another data order, for the test–retest reliability)."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ParameterError(f"a probe's repeat is a positive integer; got {repeat!r}")
    return f"{PROBES}/{path_part(check_task_name(task))}" + (f"@{repeat}" if repeat > 1 else "")


def retest_regions_dir(repeat: int) -> str:
    """``regions_retest/<repeat>``: the cores of every task's ``repeat``-th probe."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 2:
        raise ParameterError(f"a retest is the probe repeat 2, 3, …; got {repeat!r}")
    return f"{RETEST_REGIONS}/{repeat}"


def method_dir(method: str) -> str:
    """``methods/<method>``: everything one method produced."""
    return f"{METHODS}/{check_name(method, 'method')}"


def method_final_dir(method: str) -> str:
    """``methods/<method>/final``: the method's final model."""
    return f"{method_dir(method)}/final"


def method_file(method: str, name: str) -> str:
    """``methods/<method>/<name>``: one of a method's own artifacts (``name`` may have folders)."""
    return f"{method_dir(method)}/{name}"


EPI_DRIFT = method_file("epi", "drift.json")


def epi_mask(step: int) -> str:
    """``methods/epi/masks/step-<step, 6 digits>.npz``: EPI's protected set refreshed at ``step``."""
    return method_file("epi", f"masks/step-{step:06d}.npz")


def sequential_dir(model: str) -> str:
    """``sequential/<model>``: a model of the A → B study (``after_A`` or a variant's name)."""
    return f"{SEQUENTIAL}/{check_name(model, 'model')}"


def seed_dir(seed: int) -> str:
    """``seeds/seed-<seed>``: the artifacts of a further seed of the run (see :meth:`RunDir.for_seed`)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ParameterError(f"a seed is a non-negative integer; got {seed!r}")
    return f"{SEEDS}/seed-{seed}"


def checkpoint_root(stage: str) -> str:
    """``checkpoints/<job>``: where training ``stage`` (e.g. ``cpift/stage2``) keeps its checkpoints."""
    return f"{CHECKPOINTS}/{check_name(path_part(stage.replace('/', '_')), 'job', max_length=_NAME_MAX_BYTES)}"


def checkpoint_dir(job: str, step: int) -> str:
    """``checkpoints/<job>/step-<step, 6 digits>``: resumable state of a training job at a step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ParameterError(f"checkpoint step must be a non-negative integer; got {step!r}")
    return f"{CHECKPOINTS}/{check_name(job, 'job')}/step-{step:06d}"


# -- JSON ----------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Make numpy scalars and arrays, paths, sets and dataclass-like configs JSON-serialisable."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    for attr in ("tolist", "item"):  # numpy arrays/scalars, 0-d torch tensors
        method = getattr(obj, attr, None)
        if callable(method):
            return method()
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any, indent: int | None = 1) -> str:
    return json.dumps(obj, indent=indent, default=_json_default, ensure_ascii=False)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the run directory ---------------------------------------------------------------------------


class RunDir:
    """One run directory (see the module docstring for the layout).

    ``RunDir(path)`` does no I/O; use :meth:`create` for a new run and :meth:`open` for an existing
    one (they check the manifest).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser().absolute()
        self.seed: int | None = None
        self.artifacts = self.path  # where relative artifact paths resolve (see for_seed)
        self.writes = True  # False in a follower process of a data-parallel run (see follower)
        self._lock_fd: int | None = None
        self._lock_depth = 0

    def for_seed(self, seed: int, *, primary: bool) -> RunDir:
        """The run as the methods of one seed see it: artifact paths (:meth:`path_for`,
        :meth:`exists`, :meth:`write_json`, …) resolve under :func:`seed_dir` — or at the top level
        for the ``primary`` seed — and every event it logs carries ``seed``. The manifest, the
        lock, the events and :attr:`path` stay the run's."""
        view = RunDir(self.path)
        view.seed, view.writes = seed, self.writes
        view.artifacts = self.path if primary else self.path / seed_dir(seed)
        return view

    def follower(self) -> RunDir:
        """The run as a follower process of a data-parallel run sees it (:mod:`cpift.processes`):
        it reads everything, and its manifest, events and JSON writes do nothing — the main
        process writes them. Code that writes artifacts itself checks :attr:`writes`."""
        view = RunDir(self.path)
        view.seed, view.artifacts, view.writes = self.seed, self.artifacts, False
        return view

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # -- creating and opening ------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], config: Mapping[str, Any] | Any) -> RunDir:
        """Create a new run directory holding its manifest (status ``"running"``) and an empty
        ``events.jsonl``.

        ``config`` is the run's configuration as a JSON-serialisable mapping, or any object with
        a ``to_dict()`` method (a :class:`cpift.config.Config`). The directory is published with
        one rename, so of two processes creating the same run exactly one succeeds.

        Raises:
            RunExistsError: ``path`` exists and is not an empty directory (open it to resume).
            CpiftError: ``path`` cannot be created (a parent is a file, a name is too long, the
                file system refuses it).
        """
        run = cls(path)
        if hasattr(config, "to_dict") and callable(config.to_dict):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ParameterError(f"config must be a mapping or have to_dict(); got {type(config).__name__}")
        now = _now_iso()
        manifest = {
            **manifest_header(FORMAT, FORMAT_VERSION),
            "created": now,
            "updated": now,
            "status": "running",
            "stage": None,
            "error": None,
            "config": dict(config),
        }
        text = _dumps(manifest)  # fails on a non-serialisable config before anything is created
        _check_creatable(run.path)
        if run.path.is_dir() and not any(run.path.iterdir()):
            with contextlib.suppress(OSError):
                run.path.rmdir()  # an empty directory (made by hand, or a mkdir -p) is fine to take
        try:
            with atomic_dir(run.path) as tmp:
                (tmp / MANIFEST).write_text(text, encoding="utf-8")
                (tmp / EVENTS).touch()
        except OutputExistsError:
            raise RunExistsError(run.path) from None
        except DiskFullError:
            raise
        except OSError as exc:
            raise CpiftError(f"cannot create the run directory {run.path}: {run.path.parent} refuses it "
                             f"({exc.strerror or exc})") from exc
        return run

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunDir:
        """Open an existing run directory, checking its manifest.

        Raises:
            CpiftError: ``path`` does not exist or is not a directory.
            FormatError: the manifest is missing, corrupt, not a cpift run's, or of another
                format version (the message names the file).
        """
        run = cls(path)
        if not run.path.is_dir():
            raise CpiftError(f"run directory {run.path} does not exist")
        run.manifest  # noqa: B018 - validates
        return run

    # -- manifest ------------------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as stored now (read from disk on every access, so a reader sees a live
        run's progress)."""
        path = self.path / MANIFEST
        manifest = read_manifest(path, FORMAT, FORMAT_VERSION, "run")
        if manifest.get("status") not in STATUSES:
            raise FormatError(f"{path}: unknown run status {manifest.get('status')!r}")
        if not isinstance(manifest.get("config"), dict):
            raise FormatError(f"{path}: the manifest holds no config table")
        return manifest

    @property
    def config(self) -> dict[str, Any]:
        """The configuration the run was created with (a plain dict)."""
        return self.manifest["config"]

    @property
    def status(self) -> str:
        """The stored status, one of :data:`STATUSES`."""
        return self.manifest["status"]

    @property
    def stage(self) -> str | None:
        """The stage the run is in (or stopped in), as set by :meth:`set_stage`."""
        return self.manifest.get("stage")

    def _update_manifest(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        manifest = self.manifest
        if not self.writes:
            return manifest
        manifest.update(changes)
        manifest["updated"] = _now_iso()
        atomic_write_text(self.path / MANIFEST, _dumps(manifest))
        return manifest

    def set_status(self, status: str, **extra: Any) -> None:
        """Set the status (one of :data:`STATUSES`) and any other manifest fields, e.g.
        ``set_status("failed", error="…")`` or ``set_status("running", stage="fusion")``.

        ``error`` is cleared when it is not given; the format fields, ``created`` and ``config``
        cannot be changed.
        """
        if status not in STATUSES:
            raise ParameterError(f"run status must be one of {', '.join(STATUSES)}; got {status!r}")
        bad = _RESERVED.intersection(extra)
        if bad:
            raise ParameterError(f"set_status cannot change {', '.join(sorted(bad))}")
        changes: dict[str, Any] = {"error": None, **extra, "status": status}
        self._update_manifest(changes)

    def change_config(self, config: Mapping[str, Any], changes: list[tuple[str, Any, Any]]) -> None:
        """Replace the run's config by ``config`` and append ``changes`` (``(key, old, new)``, see
        :func:`cpift.config.config_changes`) with the time to the manifest's ``config_changes``
        list, so that a run extended after its creation says so."""
        manifest = self.manifest
        history = [*manifest.get("config_changes", []),
                   *({"time": _now_iso(), "key": key, "old": old, "new": new} for key, old, new in changes)]
        self._update_manifest({"config": dict(config), "config_changes": history})

    def set_stage(self, stage: str | None) -> None:
        """Record the stage the run is in (``"probe"``, ``"regions"``, ``"fusion"``, …) without
        changing its status; a seed's view (:meth:`for_seed`) records its ``seed`` beside it."""
        self._update_manifest({"stage": stage, **({"seed": self.seed} if self.seed is not None else {})})

    @contextlib.contextmanager
    def running(self) -> Iterator[RunDir]:
        """Mark the run ``"running"`` for the body, then ``"done"``; ``"stopped"`` on
        ``KeyboardInterrupt``; ``"failed"`` (with the error message) on any other exception,
        which is re-raised."""
        self.set_status("running", pid=os.getpid())
        try:
            yield self
        except KeyboardInterrupt:
            self._record_end("stopped", "interrupted by the user")
            raise
        except BaseException as exc:
            self._record_end("failed", f"{type(exc).__name__}: {exc}")
            raise
        self.set_status("done")

    def _record_end(self, status: str, error: str) -> None:
        # On a full disk the manifest cannot be written either; the run then keeps "running"
        # with nobody holding its lock, which readers take for a run that died (resumable),
        # and the original error propagates.
        with contextlib.suppress(OSError):
            self.set_status(status, error=error)

    # -- lock ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[RunDir]:
        """Hold the run's exclusive lock for the body: only one process works on a run at a time.

        An exclusive, non-blocking ``flock`` on ``run.lock``, which then holds this process's
        PID. The operating system releases the lock when the process exits or is killed, so a
        crashed run never stays locked. Re-entrant within this :class:`RunDir` object. On
        taking the lock, temporary files left by killed writers are removed.

        Raises:
            RunLockedError: (a :class:`CpiftError`) another process holds the lock; its message
                is exactly ``"run directory is locked by PID <pid>"``.
        """
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        if not self.path.is_dir():
            raise CpiftError(f"run directory {self.path} does not exist")
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunLockedError(self.path, self._read_lock_pid(fd)) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd, self._lock_depth = fd, 1
        try:
            self.clean_stale_temps()
            yield self
        finally:
            self._lock_depth = 0
            self._lock_fd = None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _read_lock_pid(fd: int, attempts: int = 20) -> int | None:
        """The PID in a lock file held by another process (it writes it right after locking, so
        wait briefly if it is still empty)."""
        for _ in range(attempts):
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            if text.isdigit():
                return int(text)
            time.sleep(0.05)
        return None

    def locked_by(self) -> int | None:
        """The PID of the process holding the run's lock, or ``None`` when nobody holds it (and
        this process does not). A ``"running"`` status with no holder means the run died.

        It probes with a shared lock taken and dropped at once; a process trying to take the
        run's lock in that same instant is refused as if the run were locked."""
        if self._lock_depth:
            return os.getpid()
        path = self.path / LOCK
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                # A shared lock is refused only while someone holds the exclusive one.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                return self._read_lock_pid(fd, attempts=5)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def clean_stale_temps(self) -> list[Path]:
        """Remove hidden temporary files and directories (``.NAME.tmp-<pid>-…``) that writers
        killed mid-write left anywhere in the run, if their process is gone. Returns them."""
        pattern = re.compile(r"^\.(.+)\.(?:tmp|old)-\d+-")
        removed: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            for name in [*dirnames, *filenames]:
                match = pattern.match(name)
                if match:
                    removed += remove_stale_temps(Path(dirpath) / match.group(1))
            dirnames[:] = [d for d in dirnames if not pattern.match(d)]
        return removed

    # -- events --------------------------------------------------------------------------------

    def log_event(self, **fields: Any) -> dict[str, Any]:
        """Append one event (a JSON object on one line) to ``events.jsonl`` and flush it.

        ``time`` (Unix seconds, float) is added unless given. By convention ``event`` names the
        kind (``"train_step"``, ``"stage"``, ``"eval"``, …). A partial last line left by a writer
        that was killed is cut off first, so every line before the last is always whole.

        Returns:
            The event as written.
        """
        record = {"time": round(time.time(), 3), **({"seed": self.seed} if self.seed is not None else {}), **fields}
        if not self.writes:
            return record
        line = (json.dumps(record, default=_json_default, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path / EVENTS, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _cut_partial_line(fd)
            os.write(fd, line)
        finally:
            os.close(fd)
        return record

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """All events, oldest first (only those whose ``event`` field equals ``event`` if given).

        A last line that is not valid JSON (a writer killed mid-line, or one still writing) is
        skipped. A missing ``events.jsonl`` reads as no events.

        Raises:
            FormatError: a line other than the last is not a JSON object (names file and line).
        """
        path = self.path / EVENTS
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        complete = data.endswith(b"\n")
        if complete:
            lines.pop()  # the empty string after the final newline
        out: list[dict[str, Any]] = []
        for number, raw in enumerate(lines, start=1):
            last = number == len(lines)
            try:
                record = json.loads(raw)
            except ValueError as exc:
                record, problem = None, str(exc)
            else:
                problem = "" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            if problem:
                if last:
                    break
                raise FormatError(f"{path}: line {number} is not a JSON object: {problem}")
            if event is None or record.get("event") == event:
                out.append(record)
        return out

    # -- files and artifacts -------------------------------------------------------------------

    def _resolve(self, relpath: str | os.PathLike[str]) -> Path:
        rel = Path(relpath)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts or str(rel) in ("", "."):
            raise ParameterError(f"{os.fspath(relpath)!r} is not a path inside the run directory")
        return self.artifacts / rel

    def path_for(self, relpath: str | os.PathLike[str]) -> Path:
        """The absolute path of ``relpath`` inside the run, its parent directories created."""
        path = self._resolve(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self, relpath: str | os.PathLike[str]) -> bool:
        """Whether the file or directory ``relpath`` exists (complete, as everything is written
        atomically)."""
        return self._resolve(relpath).exists()

    def write_json(self, relpath: str | os.PathLike[str], obj: Any) -> Path:
        """Write ``obj`` as JSON to ``relpath`` atomically (numpy values, paths and objects with
        ``to_dict()`` are converted). Returns the path (a follower writes nothing)."""
        return atomic_write_text(self.path_for(relpath), _dumps(obj)) if self.writes else self._resolve(relpath)

    _MISSING: Any = object()

    def read_json(self, relpath: str | os.PathLike[str], default: Any = _MISSING) -> Any:
        """Read the JSON file ``relpath``; ``default`` if given and the file does not exist.

        Raises:
            FormatError: the file is missing (and no default) or is not valid JSON; names the file.
        """
        path = self._resolve(relpath)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if default is not RunDir._MISSING:
                return default
            raise FormatError(f"{path}: missing from the run directory") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: unreadable: {exc}") from exc
        try:
            return json.loads(text)
        except ValueError as exc:
            raise FormatError(f"{path}: not valid JSON: {exc}") from exc

    def write_text(self, relpath: str | os.PathLike[str], text: str) -> Path:
        """Write a text file (a CSV table, a log) atomically. Returns the path (a follower writes nothing)."""
        return atomic_write_text(self.path_for(relpath), text) if self.writes else self._resolve(relpath)

    @contextlib.contextmanager
    def artifact_dir(self, relpath: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
        """Build the directory ``relpath`` atomically: write into the yielded temporary directory;
        it appears at ``relpath`` complete when the body ends, and nothing appears if the body
        raises (see :func:`cpift.atomic.atomic_dir`).

        Raises:
            FileExistsError: ``relpath`` exists and ``overwrite`` is false.
        """
        with atomic_dir(self.path_for(relpath), overwrite=overwrite) as tmp:
            yield tmp


def _cut_partial_line(fd: int) -> None:
    """Truncate an append-only text file after its last newline if it does not end in one."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            os.ftruncate(fd, start + cut + 1)
            return
        end = start
    os.ftruncate(fd, 0)

