"""Fully sharded data parallelism (torch's FSDP2, ``fully_shard``) for :func:`cpift.train.train`.

With ``train.distributed = "fsdp"`` and several processes, each process holds one shard of every
parameter, gradient and optimizer state instead of a whole copy (DDP), so a model whose AdamW
state does not fit one device trains on several. cpift applies ``fully_shard`` itself rather
than through accelerate's FSDP plugin: accelerate enables FSDP on GPUs only, and doing it here
gives one code path that the CPU test suite runs (two gloo processes) and GPUs use unchanged.

* :func:`shard` — a sharded copy of the model to train: every decoder layer (the classes a
  Hugging Face model lists in ``_no_split_modules``) is one FSDP unit, the rest (embeddings,
  final norm, LM head) the root's. The caller's model is left whole and untouched until
  :func:`gather_into` writes the trained weights back, so everything after training (saving,
  scoring, the next stage) sees a plain model. On CUDA with bf16 the units compute in bf16 and
  reduce gradients in fp32 (FSDP's mixed precision), the master weights fp32.
* :func:`save` / :func:`load` — the model's and optimizer's shards in a checkpoint, with
  ``torch.distributed.checkpoint`` (each process writes and reads its own shards). A checkpoint
  resumes on the number of processes that wrote it, as under DDP: DCP could reshard the weights,
  but each process's slice of the batch and its RNG state are its own (``cpift.train`` checks).
* :func:`full` — a whole tensor from a sharded one (an all-gather; every process must call it),
  for code that needs whole gradients (EPI's importance).

Frozen elements stay exact because :class:`cpift.freezing.MaskedOptimizer` lays each whole mask
out as its parameter's shards; the loss is normalised as in DDP (FSDP averages gradients over
processes as DDP does).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["SHARDED_DIR", "complete", "full", "gather_into", "load", "no_sync", "save", "shard"]

SHARDED_DIR = "sharded"
"""The folder of a checkpoint that holds the model's and optimizer's shards (DCP's format)."""


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (a ``DTensor``; collective: every process calls it), or
    ``tensor`` itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _unit_classes(model: torch.nn.Module) -> set[str]:
    """The block classes a Hugging Face model says must not be split (its decoder layers), found
    on any submodule (a PEFT wrapper holds the model it adapts)."""
    return {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}


def shard(model: torch.nn.Module, device: torch.device, mixed_precision: str) -> torch.nn.Module:
    """A copy of ``model`` on ``device``, sharded over the processes of the default process group.

    Args:
        model: the model to train (left as it is).
        device: this process's device.
        mixed_precision: ``"bf16"`` (compute in bf16, reduce in fp32) or ``"no"``.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    # The copy stays where the model is; fully_shard moves only this process's shards to the device.
    sharded = copy.deepcopy(model)
    units = _unit_classes(sharded)
    for module in list(sharded.modules()):
        if type(module).__name__ in units:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(sharded, mesh=mesh, mp_policy=policy)
    return sharded


@contextlib.contextmanager
def no_sync(accelerator: Any, model: torch.nn.Module) -> Iterator[None]:
    """Skip the gradient sync of the micro-batches before a step's last: FSDP's switch on a sharded
    model, accelerate's (DDP's ``no_sync``) otherwise."""
    if not hasattr(model, "set_requires_gradient_sync"):
        with accelerator.no_sync(model):
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def gather_into(sharded: torch.nn.Module, model: torch.nn.Module) -> None:
    """Write the whole trained weights of ``sharded`` into ``model`` (every process gets them, since
    every process goes on with the run)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    model.load_state_dict(whole)


def save(sharded: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Write the model's and optimizer's shards to ``checkpoint/sharded`` (every process calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(sharded, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint / SHARDED_DIR)


def load(sharded: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path) -> None:
    """Restore what :func:`save` wrote at ``checkpoint`` (every process calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(sharded, optimizer)
    state: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint / SHARDED_DIR)
    set_state_dict(sharded, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds finished shards (DCP writes ``.metadata`` once all are written)."""
    return (checkpoint / SHARDED_DIR / ".metadata").is_file()
