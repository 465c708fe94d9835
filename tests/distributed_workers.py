"""The processes of tests/test_distributed.py, started by ``torchrun`` (which gives each its
``RANK``, ``WORLD_SIZE`` and rendezvous), in fresh interpreters::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_workers.py MODE ARGS…

Modes: ``train BATCH ACCUM OPTIMIZER OUT`` (``cpift.train.train`` on the tiny model with frozen
masks), ``pipeline OUT RESUME`` (``configs/tiny.toml`` end to end), ``fsdp OUT`` (FSDP2 shards and
``MaskedOptimizer``). The main process writes the trained weights to ``OUT``.
"""

from __future__ import annotations

import os
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
    """Every other element of the attention projections frozen."""
    return {name: (torch.arange(p.numel()) % 2 == 0).view(p.shape)
            for name, p in model.named_parameters() if "self_attn" in name}


def train_tiny(batch_size: int, grad_accum: int, optimizer: str, out: Path) -> None:
    """Train the tiny model with :func:`frozen_masks` (weight decay on, so a frozen element that
    slipped would show); the main process saves the weights to ``out``."""
    model = tiny_llama(0)
    config = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, batch_size=batch_size, grad_accum=grad_accum,
                         steps=STEPS, checkpoint_every=0, optimizer=optimizer, max_length=256, seed=0, device="cpu")
    train(model, tiny_tokenizer(), get_task("math", n_train=16, n_eval=0, seed=0).train, config,
          frozen=frozen_masks(model), progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(out))


def pipeline(out: str, resume: str) -> None:
    from cpift.config import load_config
    from cpift.pipeline import run_config

    run_config(load_config(TINY), out, resume=resume == "resume", progress=False)


def fsdp(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from cpift.freezing import MaskedOptimizer

    dist.init_process_group("gloo")
    model = tiny_llama(0)
    frozen = {**frozen_masks(model), WHOLLY_FROZEN: torch.ones_like(dict(model.named_parameters())[WHOLLY_FROZEN],
                                                                   dtype=torch.bool)}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, frozen)
    generator = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(STEPS):
        ids = torch.randint(3, 99, (2, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    if dist.get_rank() == 0:
        save_file(full, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode, *args = sys.argv[1:]
    if mode == "train":
        train_tiny(int(args[0]), int(args[1]), args[2], Path(args[3]))
    elif mode == "pipeline":
        pipeline(*args)
    else:
        fsdp(*args)
