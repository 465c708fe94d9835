"""Data-parallel training on two CPU processes (gloo): the same global batch gives the same
weights as one process, frozen elements stay bit-identical on every process and every shard, and
every method of the tiny config runs, writes once and resumes.

The processes are started by ``torchrun`` in fresh interpreters (``tests/distributed_workers.py``);
the tests skip only where the platform has no gloo backend.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_workers import TINY, WHOLLY_FROZEN, frozen_masks, train_tiny
from safetensors.torch import load_file

from cpift.models import tiny_llama

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend for CPU processes")

WORKERS = Path(__file__).resolve().parent / "distributed_workers.py"


def torchrun(*args: object) -> None:
    """Run the workers' ``args`` on two processes; a failure shows their output's tail."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKERS), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def _trained(optimizer: str, out: Path) -> dict[str, torch.Tensor]:
    torchrun("train", 2, 1, optimizer, out)
    return load_file(str(out))


@pytest.fixture(scope="module")
def with_sgd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _trained("sgd", tmp_path_factory.mktemp("ddp") / "sgd.safetensors")


@pytest.fixture(scope="module")
def with_adamw(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _trained("adamw", tmp_path_factory.mktemp("ddp") / "adamw.safetensors")


def test_two_processes_train_as_one_on_the_same_global_batch(with_sgd, tmp_path: Path) -> None:
    # SGD: the weights are linear in the gradients, so only float summation order separates the runs
    # (AdamW's first steps divide each gradient by its own size and would magnify that noise).
    for batch_size, grad_accum in ((4, 1), (2, 2)):  # one process: the global batch whole, or accumulated
        out = tmp_path / f"one-{batch_size}x{grad_accum}.safetensors"
        train_tiny(batch_size, grad_accum, "sgd", out)
        single = load_file(str(out))
        for name, weights in with_sgd.items():
            torch.testing.assert_close(weights, single[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_elements_are_bit_identical_after_data_parallel_training(optimizer, request) -> None:
    trained = request.getfixturevalue(f"with_{optimizer}")
    base = dict(tiny_llama(0).named_parameters())
    moved = 0
    for name, mask in frozen_masks(tiny_llama(0)).items():
        assert torch.equal(trained[name][mask], base[name].detach()[mask]), name
        moved += int((trained[name][~mask] != base[name].detach()[~mask]).sum())
    assert moved > 0  # the free elements did train


# -- the whole pipeline on two processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-run") / "run"
    torchrun("pipeline", out, "new")
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
    copy = tmp_path / "copy"
    shutil.copytree(ddp_run, copy)
    steps = len([line for line in (copy / "events.jsonl").read_text().splitlines() if '"step"' in line])
    torchrun("pipeline", copy, "resume")
    assert len([line for line in (copy / "events.jsonl").read_text().splitlines() if '"step"' in line]) == steps


# -- sharded parameters (FSDP2) ------------------------------------------------------------------


def test_frozen_elements_are_bit_identical_on_every_shard_under_fsdp(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.safetensors"
    torchrun("fsdp", out)
    trained = load_file(str(out))
    base = {name: p.detach() for name, p in tiny_llama(0).named_parameters()}
    assert torch.equal(trained[WHOLLY_FROZEN], base[WHOLLY_FROZEN])
    for name, mask in frozen_masks(tiny_llama(0)).items():
        assert torch.equal(trained[name][mask], base[name][mask]), name
        assert not torch.equal(trained[name][~mask], base[name][~mask]), name  # both shards' free elements train
