"""The processes of a data-parallel run (``torchrun`` or ``accelerate launch``): who writes, and
how the others follow.

Every process runs the whole pipeline, so that their training steps meet in DDP's gradient
all-reduce (:func:`cpift.train.train` gives each its share of every global batch). Only the main
process writes the run directory and scores models; the others open it as followers
(:meth:`cpift.runs.RunDir.follower`) and take the main process's decisions where files decide
(:func:`from_main`: is this artifact there already?). In a single process — ``WORLD_SIZE`` unset
or 1 — every function here costs nothing and starts no process group.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["barrier", "from_main", "is_main", "start", "world_size"]


def world_size() -> int:
    """The number of processes of this run (``WORLD_SIZE``, as ``torchrun`` sets it; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def start(cpu: bool) -> None:
    """Join the run's process group (gloo on CPU, NCCL on GPUs) when there are several processes:
    accelerate's process-wide state, which :func:`cpift.train.train` then shares."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=cpu)


def is_main() -> bool:
    """Whether this is the process that writes the run directory."""
    if world_size() == 1:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def barrier() -> None:
    """Wait until every process gets here."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def from_main(value: T) -> T:
    """The main process's ``value`` in every process (pickled; small values only)."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
