"""The processes of tests/test_distributed.py, started by ``torchrun`` (which gives each its
``RANK``, ``WORLD_SIZE`` and rendezvous), in fresh interpreters::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_workers.py MODE ARGS…

Modes: ``train BATCH ACCUM OPTIMIZER STRATEGY OUT`` (``cpift.train.train`` on the tiny model with
frozen masks, ``train.distributed = STRATEGY``), ``resume OUT`` (FSDP: a run, then the same run
resumed from its next-to-last checkpoint; the main process writes both final weights, ``OUT`` and
``OUT.resumed``), ``pipeline OUT RESUME STRATEGY [METHODS]`` (``configs/tiny.toml`` end to end,
``METHODS`` a TOML list). The main process writes the trained weights to ``OUT``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from cpift.data import get_task
from cpift.models import tiny_llama, tiny_tokenizer
from cpift.settings import TrainConfig
from cpift.train import train

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"
STEPS = 3
WHOLLY_FROZEN = "model.layers.0.mlp.down_proj.weight"


def frozen_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every other element of the attention projections frozen, and one matrix wholly."""
    masks = {name: (torch.arange(p.numel()) % 2 == 0).view(p.shape)
             for name, p in model.named_parameters() if "self_attn" in name}
    return {**masks, WHOLLY_FROZEN: torch.ones_like(dict(model.named_parameters())[WHOLLY_FROZEN], dtype=torch.bool)}


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _save(model: torch.nn.Module, out: Path) -> None:
    if _is_main():
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(out))


def train_tiny(batch_size: int, grad_accum: int, optimizer: str, distributed: str, out: Path, *,
               checkpoint_dir: Path | None = None, resume: bool = False) -> None:
    """Train the tiny model with :func:`frozen_masks` (weight decay on, so a frozen element that
    slipped would show); the main process saves the weights to ``out``."""
    model = tiny_llama(0)
    config = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, batch_size=batch_size, grad_accum=grad_accum,
                         steps=STEPS, checkpoint_every=1, optimizer=optimizer, distributed=distributed,
                         max_length=256, seed=0, device="cpu")
    train(model, tiny_tokenizer(), get_task("math", n_train=16, n_eval=0, seed=0).train, config,
          frozen=frozen_masks(model), checkpoint_dir=checkpoint_dir, resume=resume, progress=False)
    _save(model, out)


def resume(out: Path) -> None:
    """FSDP training with checkpoints, then the same run resumed after its last checkpoint is lost."""
    from cpift.processes import barrier
    from cpift.train_state import checkpoint_path

    checkpoints = out.parent / "checkpoints"
    train_tiny(2, 1, "adamw", "fsdp", out, checkpoint_dir=checkpoints)
    if _is_main():
        shutil.rmtree(checkpoint_path(checkpoints, STEPS))
    barrier()
    train_tiny(2, 1, "adamw", "fsdp", out.with_suffix(".resumed"), checkpoint_dir=checkpoints, resume=True)


def pipeline(out: str, resume: str, distributed: str, methods: str | None = None) -> None:
    from cpift.config import load_config
    from cpift.pipeline import run_config

    overrides = [f'train.distributed="{distributed}"'] + ([f"run.methods={methods}"] if methods else [])
    run_config(load_config(TINY, overrides), out, resume=resume == "resume", progress=False)


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    if mode == "train":
        train_tiny(int(args[0]), int(args[1]), args[2], args[3], Path(args[4]))
    elif mode == "resume":
        resume(Path(args[0]))
    else:
        pipeline(*args)
