"""Data-parallel training on two CPU processes (gloo): the same global batch gives the same
weights as one process, and frozen elements stay bit-identical on every process.

The test spawns its processes itself (``torch.multiprocessing``), each with the environment
``torchrun`` would give it; it skips only where the platform has no gloo backend.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from cpift.data import get_task
from cpift.models import tiny_llama, tiny_tokenizer
from cpift.settings import TrainConfig
from cpift.train import train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend for CPU processes")

STEPS = 3


def _config(batch_size: int, grad_accum: int, optimizer: str) -> TrainConfig:
    # Weight decay on, so that a frozen element slipping through would show.
    return TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=0, batch_size=batch_size, grad_accum=grad_accum,
                       steps=STEPS, checkpoint_every=0, optimizer=optimizer, max_length=256, seed=0, device="cpu")


def _frozen(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every other element of the attention projections frozen."""
    return {name: (torch.arange(p.numel()) % 2 == 0).view(p.shape)
            for name, p in model.named_parameters() if "self_attn" in name}


def _train(batch_size: int, grad_accum: int, optimizer: str, out: Path) -> None:
    model = tiny_llama(0)
    examples = get_task("math", n_train=16, n_eval=0, seed=0).train
    train(model, tiny_tokenizer(), examples, _config(batch_size, grad_accum, optimizer), frozen=_frozen(model),
          progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(out))


def _worker(rank: int, world: int, port: int, optimizer: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    _train(2, 1, optimizer, Path(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(optimizer: str, out: Path) -> dict[str, torch.Tensor]:
    mp.start_processes(_worker, args=(2, _free_port(), optimizer, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return load_file(str(out))


@pytest.fixture(scope="module")
def with_sgd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _two_processes("sgd", tmp_path_factory.mktemp("ddp") / "sgd.safetensors")


@pytest.fixture(scope="module")
def with_adamw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _two_processes("adamw", tmp_path_factory.mktemp("ddp") / "adamw.safetensors")


def test_two_processes_train_as_one_on_the_same_global_batch(with_sgd, tmp_path: Path) -> None:
    # SGD: the weights are linear in the gradients, so only float summation order separates the runs
    # (AdamW's first steps divide each gradient by its own size and would magnify that noise).
    for batch_size, grad_accum in ((4, 1), (2, 2)):  # one process: the global batch whole, or accumulated
        out = tmp_path / f"one-{batch_size}x{grad_accum}.safetensors"
        _train(batch_size, grad_accum, "sgd", out)
        single = load_file(str(out))
        for name, weights in with_sgd.items():
            torch.testing.assert_close(weights, single[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_elements_are_bit_identical_after_data_parallel_training(optimizer, request) -> None:
    trained = request.getfixturevalue(f"with_{optimizer}")
    base = dict(tiny_llama(0).named_parameters())
    moved = 0
    for name, mask in _frozen(tiny_llama(0)).items():
        assert torch.equal(trained[name][mask], base[name].detach()[mask]), name
        moved += int((trained[name][~mask] != base[name].detach()[~mask]).sum())
    assert moved > 0  # the free elements did train


# -- the whole pipeline on two processes ---------------------------------------------------------

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"


def _pipeline_worker(rank: int, world: int, port: int, out: str, resume: bool) -> None:
    from cpift.config import load_config
    from cpift.pipeline import run_config

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    run_config(load_config(TINY), out, resume=resume, progress=False)


def _pipeline(out: Path, resume: bool = False) -> None:
    mp.start_processes(_pipeline_worker, args=(2, _free_port(), str(out), resume), nprocs=2, join=True,
                       start_method="spawn")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-run") / "run"
    _pipeline(out)
    return out


def test_every_method_runs_on_two_processes_and_the_main_one_writes(ddp_run: Path) -> None:
    from cpift.config import load_config
    from cpift.runs import RunDir

    run = RunDir.open(ddp_run)
    config = load_config(TINY)
    assert run.status == "done"
    assert [e["method"] for e in run.events("method_done")] == list(config.run.methods)  # once, not per process
    steps = [e for e in run.events("step") if e["stage"] == "multitask"]
    assert [e["step"] for e in steps] == list(range(1, config.train.steps + 1))
    assert all(e["examples_per_step"] == 2 * config.train.batch_size for e in steps)  # two processes' batches
    assert run.events("threads")[0]["processes"] == 2
    metrics = run.read_json("metrics.json")
    assert {"multitask", "cpift", "lora", "dora", "epi", "gallop@5", "saft@5", "pafi@5"} <= set(metrics["scores"])


def test_two_processes_give_one_process_on_the_same_global_batch(ddp_run: Path, tmp_path: Path) -> None:
    from cpift.config import load_config
    from cpift.masks import popcount
    from cpift.pipeline import run_config
    from cpift.regions import CoreRegions

    config = load_config(TINY, ['run.methods=["multitask", "cpift", "sequential"]', "train.batch_size=4"])
    single = run_config(config, tmp_path / "single", progress=False)
    for model in ("methods/multitask/final", "probes/math", "sequential/multitask"):
        mine, theirs = (load_file(str(root / model / "model.safetensors")) for root in (ddp_run, single.path))
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6, msg=f"{model}: {name}")
    # A core is a top-k: summation-order noise (~1e-9) can swap elements tied at its threshold (AdamW's
    # first steps move many elements by almost exactly lr), and what follows the cores then differs.
    ours, theirs = (CoreRegions.load(root / "regions") for root in (ddp_run, single.path))
    for task in ours.tasks:
        swapped = popcount(ours.packed(task) ^ theirs.packed(task)) // 2
        assert swapped <= 0.01 * popcount(ours.packed(task)), task
        assert ours.threshold(task) == pytest.approx(theirs.threshold(task), rel=1e-5)


def test_a_finished_run_resumes_on_two_processes_without_training_again(ddp_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ddp_run, copy)
    steps = len([line for line in (copy / "events.jsonl").read_text().splitlines() if '"step"' in line])
    _pipeline(copy, resume=True)
    assert len([line for line in (copy / "events.jsonl").read_text().splitlines() if '"step"' in line]) == steps


# -- sharded parameters (FSDP2) ------------------------------------------------------------------


def _fsdp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from cpift.freezing import MaskedOptimizer

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = tiny_llama(0)
    frozen = _frozen(model)
    frozen["model.layers.0.mlp.down_proj.weight"] = torch.ones_like(model.model.layers[0].mlp.down_proj.weight,
                                                                      dtype=torch.bool)  # wholly frozen
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, frozen)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        ids = torch.randint(3, 99, (2, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    if rank == 0:
        save_file(full, out)
    dist.destroy_process_group()


def test_frozen_elements_are_bit_identical_on_every_shard_under_fsdp(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.safetensors"
    mp.start_processes(_fsdp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    trained = load_file(str(out))
    base = {name: p.detach() for name, p in tiny_llama(0).named_parameters()}
    frozen = _frozen(tiny_llama(0))
    assert torch.equal(trained["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    for name, mask in frozen.items():
        assert torch.equal(trained[name][mask], base[name][mask]), name
        assert not torch.equal(trained[name][~mask], base[name][~mask]), name  # both shards' free elements train
