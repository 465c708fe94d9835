"""Training checkpoints: written atomically, found, pruned, checked and restored for exact resume.

:func:`cpift.train.train` writes ``checkpoint_dir/step-XXXXXX/`` with :func:`save_checkpoint`.
The state itself is :meth:`accelerate.Accelerator.save_state`'s, written into the hidden
temporary directory of :func:`cpift.atomic.atomic_dir` and published by one rename:

* ``model.safetensors`` — the prepared model's state dict (tensors sharing memory, such as tied
  input/output embeddings, stored once); under FSDP instead ``sharded/``, every process's shards
  of the model and the optimizer (:func:`cpift.fsdp.save`);
* ``random_states_<process>.pkl`` — each process's Python, numpy and torch (CPU and CUDA)
  generator states (the data order does not use them; dropout does);
* ``custom_checkpoint_<i>.pkl`` — the objects :func:`register_state` registers with
  :meth:`~accelerate.Accelerator.register_for_checkpointing`, in this order: the AdamW optimizer
  (0), the learning-rate scheduler (1) and, with a :class:`~cpift.train.TrainHook`, the hook (2);
  under FSDP the optimizer is in ``sharded/`` and the numbering starts at the scheduler (0);
* ``trainer_state.json`` — cpift's own, written last: step, losses so far, tokens seen, the
  config and fingerprints of the tokenized data, the frozen set and the hook.

The optimizer and scheduler are registered rather than passed through ``accelerator.prepare``:
accelerate's wrappers would change how they step (its scheduler steps once per process).

Only the newest :data:`KEEP_CHECKPOINTS` are kept (older ones are renamed to a hidden name, then
deleted, so a kill mid-deletion never leaves a visible half checkpoint). :func:`checkpoint_to_resume`
finds the newest complete checkpoint — hidden temporary directories of an interrupted write are
never considered, and those of dead processes are removed — :func:`check_resumable` refuses one
written by a different run, and :func:`load_checkpoint` restores it with
:meth:`~accelerate.Accelerator.load_state`; on CPU the final weights are then bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cpift import fsdp
from cpift.atomic import atomic_dir, remove_stale_temps
from cpift.errors import CheckpointError, CpiftError, MismatchError, ParameterError

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "KEEP_CHECKPOINTS",
    "check_resumable",
    "checkpoint_path",
    "checkpoint_to_resume",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_trainer_state",
    "register_state",
    "run_fingerprint",
    "save_checkpoint",
]

_log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2
"""How many of the newest checkpoints :func:`save_checkpoint` keeps."""

_CKPT_RE = re.compile(r"^step-(\d{6,})$")
_CKPT_TEMP_RE = re.compile(r"^\.(step-\d{6,})\.(?:tmp|old)-\d+-")
# accelerate's file names (accelerate.checkpointing; spelled out so that importing this module does
# not import accelerate); custom objects are numbered in the order register_state registers them.
_MODEL_FILE = "model.safetensors"
_MAIN_RNG_FILE = "random_states_0.pkl"
_OPTIMIZER_FILE = "custom_checkpoint_0.pkl"
_STATE_FILE = "trainer_state.json"  # written last
_FORMAT = 2  # 1: cpift's own files (optimizer.pt, rng.pt, ...); 2: accelerate's save_state


def checkpoint_path(checkpoint_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes: ``checkpoint_dir/step-XXXXXX``."""
    return checkpoint_dir / f"step-{step:06d}"


def list_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in ``checkpoint_dir``, oldest first.

    Only visible ``step-XXXXXX`` directories holding every checkpoint file count; the hidden
    temporary directories of a write in progress (or killed) never do.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CKPT_RE.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        if _complete(entry):
            found.append((int(match.group(1)), entry))
        else:
            _log.warning("ignoring incomplete checkpoint %s", entry)
    return sorted(found)


def _complete(checkpoint: Path) -> bool:
    """Whether a checkpoint holds every file: the main process's RNG state, the trainer state and
    either the whole model and optimizer or their shards (FSDP)."""
    whole = all((checkpoint / name).is_file() for name in (_MODEL_FILE, _OPTIMIZER_FILE))
    return (whole or fsdp.complete(checkpoint)) and all(
        (checkpoint / name).is_file() for name in (_MAIN_RNG_FILE, _STATE_FILE))


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir``, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def checkpoint_to_resume(checkpoint_dir: Path, resume: bool, stage: str) -> Path | None:
    """The checkpoint a :func:`~cpift.train.train` call continues from, or None to start at step 0.

    Removes the temporary directories that dead processes left in ``checkpoint_dir`` first.

    Raises:
        ParameterError: ``checkpoint_dir`` holds checkpoints while ``resume`` is False (a fresh
            run must not mix with them).
    """
    _remove_stale_checkpoint_temps(checkpoint_dir)
    latest = latest_checkpoint(checkpoint_dir)
    if latest is not None and not resume:
        raise ParameterError(
            f"checkpoint_dir {checkpoint_dir} already holds checkpoints (newest {latest.name}); "
            "pass resume=True to continue from it, or use another directory"
        )
    if resume and latest is None:
        _log.info("stage %r: no checkpoint in %s; starting from step 0", stage, checkpoint_dir)
    return latest


def _remove_stale_checkpoint_temps(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.is_dir():
        return
    names = {m.group(1) for e in checkpoint_dir.iterdir() if (m := _CKPT_TEMP_RE.match(e.name))}
    for name in names:
        remove_stale_temps(checkpoint_dir / name)


def _prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step directories (complete or not)."""
    steps = sorted(
        (int(m.group(1)), e) for e in checkpoint_dir.iterdir() if (m := _CKPT_RE.match(e.name))
    )
    for _, path in steps[:-keep]:
        # Rename first: a kill during rmtree leaves a hidden directory, never a visible half.
        trash = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def run_fingerprint(data: Sequence[Mapping[str, list[int]]], frozen: Mapping[str, torch.Tensor] | None,
                    hook: object | None, processes: int = 1) -> dict[str, Any]:
    """What identifies a run besides its config: hashes of the tokenized data and of the frozen set
    (names and counts), the hook's class and the number of processes (each takes its own slice of
    the global batch and keeps its own RNG state, so a run resumes exactly only on as many
    processes as wrote its checkpoint). Saved with each checkpoint, compared on resume."""
    data_digest = hashlib.sha256()
    for item in data:
        data_digest.update(np.asarray(item["input_ids"], dtype=np.int64).tobytes())
        data_digest.update(np.asarray(item["labels"], dtype=np.int64).tobytes())
        data_digest.update(b"|")
    frozen_digest = hashlib.sha256()
    for name in sorted(frozen or {}):
        mask = frozen[name]  # type: ignore[index]
        count = int(mask.sum()) if isinstance(mask, torch.Tensor) else -1
        frozen_digest.update(f"{name}:{count};".encode())
    return {"data": data_digest.hexdigest()[:16], "frozen": frozen_digest.hexdigest()[:16],
            "hook": type(hook).__qualname__ if hook is not None else None, "processes": processes}


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of the checkpoint at ``path``.

    Raises:
        CheckpointError: it cannot be read, or is not of this version's format.
    """
    try:
        state = json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / _STATE_FILE}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path / _STATE_FILE} is not a cpift trainer state (format {_FORMAT})")
    state.setdefault("processes", 1)  # written before the number of processes was recorded
    return state


def check_resumable(path: Path, saved: Mapping[str, Any], settings: Mapping[str, Any],
                    fingerprint: Mapping[str, Any]) -> None:
    """Refuse to resume from a checkpoint written by a different run.

    Args:
        path: the checkpoint (for the message).
        saved: its :func:`read_trainer_state`.
        settings: the config fields that change the training trajectory, with today's values.
        fingerprint: today's :func:`run_fingerprint`.

    Raises:
        MismatchError: naming every setting or fingerprint that differs.
    """
    differ = [
        f"{name}: checkpoint {saved['config'].get(name)!r}, now {value!r}"
        for name, value in settings.items() if saved["config"].get(name) != value
    ]
    differ += [
        f"{name}: checkpoint {saved.get(name)!r}, now {value!r}"
        for name, value in fingerprint.items() if saved.get(name) != value
    ]
    if differ:
        raise MismatchError(
            f"cannot resume from {path}: it was written with other settings ("
            + "; ".join(differ) + "); resume with the settings it was written with, or start a new run"
        )


def register_state(accelerator: Accelerator, optimizer: torch.optim.Optimizer | None, scheduler: Any,
                   hook: Any | None) -> None:
    """Have ``accelerator.save_state``/``load_state`` include the optimizer (None under FSDP, whose
    shards :func:`save_checkpoint` writes itself), the scheduler and the hook (anything with
    ``state_dict``/``load_state_dict``) besides the prepared model and RNGs."""
    accelerator.register_for_checkpointing(*(obj for obj in (optimizer, scheduler, hook) if obj is not None))


@contextlib.contextmanager
def _tied_weights_expected() -> Iterator[None]:
    """Silence accelerate's warning, at every save, that tensors sharing memory (tied embeddings)
    were stored once: that is expected, and load_state ties them again."""
    log = logging.getLogger("accelerate.utils.other")

    def unexpected(record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()

    log.addFilter(unexpected)
    try:
        yield
    finally:
        log.removeFilter(unexpected)


def save_checkpoint(accelerator: Accelerator, path: Path, trainer_state: Mapping[str, Any], *,
                    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None,
                    keep: int = KEEP_CHECKPOINTS) -> None:
    """Publish the training state at ``path`` atomically, then keep only the newest ``keep``.

    Every process calls this: each writes its own RNG state (and, with ``sharded`` — the FSDP
    model and its optimizer — its shards), the main process everything else (accelerate's rule)
    and, last, ``trainer_state`` (JSON-able) as ``trainer_state.json``.
    """
    from accelerate.utils import broadcast_object_list

    main = accelerator.is_main_process
    with (atomic_dir(path, overwrite=True) if main else contextlib.nullcontext()) as tmp:
        # The other processes write into the main process's temporary directory.
        (tmp,) = broadcast_object_list([tmp])
        with _tied_weights_expected():
            accelerator.save_state(str(tmp))
        if sharded is not None:
            fsdp.save(*sharded, tmp)
        accelerator.wait_for_everyone()
        if main:
            state = {"format": _FORMAT, **trainer_state}
            (tmp / _STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    if main:
        _prune_checkpoints(path.parent, keep)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, path: Path,
                    sharded: tuple[torch.nn.Module, torch.optim.Optimizer] | None = None) -> None:
    """Restore the model, optimizer, scheduler, hook and RNG states saved at ``path`` (with
    ``sharded``, the FSDP model and optimizer from their shards).

    Raises:
        CheckpointError: a file cannot be read or does not fit (the model, the optimizer).
    """
    from accelerate.utils import RNG_STATE_NAME, load

    rng_file = path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    try:
        # load_state skips an unreadable RNG file with an info log only, which would silently
        # break exact resume: reading it first makes a damaged or missing one fail here.
        load(rng_file)
        if (sharded is not None) != fsdp.complete(path):
            raise CheckpointError(
                f"cannot resume from {path}: it was written "
                + ("without" if sharded is not None else "with")
                + " FSDP (train.distributed); resume it with the strategy it was written with")
        accelerator.load_state(str(path))
        if sharded is not None:
            fsdp.load(*sharded, path)
    except CpiftError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {path}: {type(exc).__name__}: {exc}") from exc
