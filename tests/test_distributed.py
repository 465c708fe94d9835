"""Data-parallel training on two CPU processes (gloo), DDP and FSDP: the same global batch gives the
same weights as one process, frozen elements stay bit-identical on every process and every shard, an
FSDP run resumes exactly from its sharded checkpoints, and the methods of the tiny config run, write
once and resume.

The processes are started by ``torchrun`` in fresh interpreters (``tests/distributed_workers.py``);
the tests skip only where the platform has no gloo backend.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_workers import STEPS, TINY, WHOLLY_FROZEN, frozen_masks, train_tiny
from safetensors.torch import load_file

from cpift.errors import MismatchError
from cpift.models import tiny_llama

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend for CPU processes")

WORKERS = Path(__file__).resolve().parent / "distributed_workers.py"
STRATEGIES = ("ddp", "fsdp")


def torchrun(*args: object, check: bool = True) -> str:
    """Run the workers' ``args`` on two processes and return their output; with ``check`` a failure
    shows its tail."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKERS), *map(str, args)], capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0 or not check, output[-4000:]
    return output


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], dict[str, torch.Tensor]]:
    """The weights two processes train with a global batch of 4, by (strategy, optimizer); each
    pair is trained once per module."""
    trained: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def weights(strategy: str, optimizer: str) -> dict[str, torch.Tensor]:
        if (strategy, optimizer) not in trained:
            out = tmp_path_factory.mktemp(strategy) / f"{optimizer}.safetensors"
            torchrun("train", 2, 1, optimizer, strategy, out)
            trained[strategy, optimizer] = load_file(str(out))
        return trained[strategy, optimizer]

    return weights


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_train_as_one_on_the_same_global_batch(strategy, two_processes, tmp_path: Path) -> None:
    # SGD: the weights are linear in the gradients, so only float summation order separates the runs
    # (AdamW's first steps divide each gradient by its own size and would magnify that noise).
    weights = two_processes(strategy, "sgd")
    for batch_size, grad_accum in ((4, 1), (2, 2)):  # one process: the global batch whole, or accumulated
        out = tmp_path / f"one-{batch_size}x{grad_accum}.safetensors"
        train_tiny(batch_size, grad_accum, "sgd", "none", out)
        single = load_file(str(out))
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, single[name], rtol=1e-5, atol=1e-7, msg=f"{strategy}: {name}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_elements_are_bit_identical_on_every_process_and_shard(strategy, optimizer, two_processes) -> None:
    weights = two_processes(strategy, optimizer)
    base = {name: p.detach() for name, p in tiny_llama(0).named_parameters()}
    assert torch.equal(weights[WHOLLY_FROZEN], base[WHOLLY_FROZEN])
    for name, mask in frozen_masks(tiny_llama(0)).items():
        assert torch.equal(weights[name][mask], base[name][mask]), f"{strategy}: {name}"
        if name != WHOLLY_FROZEN:  # the free elements of both shards did train
            assert not torch.equal(weights[name][~mask], base[name][~mask]), f"{strategy}: {name}"


def test_an_fsdp_run_resumes_bit_exactly_from_its_sharded_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.safetensors"
    torchrun("resume", out)
    uninterrupted, resumed = load_file(str(out)), load_file(str(out.with_suffix(".resumed")))
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints == [f"step-{STEPS - 1:06d}", f"step-{STEPS:06d}"]
    assert (tmp_path / "checkpoints" / f"step-{STEPS:06d}" / "sharded" / ".metadata").is_file()
    # each process took its own slice of the batch: on another number of processes it would not resume exactly
    with pytest.raises(MismatchError, match=r"processes: checkpoint 2, now 1"):
        train_tiny(2, 1, "adamw", "fsdp", tmp_path / "one.safetensors", checkpoint_dir=tmp_path / "checkpoints",
                   resume=True)


def test_one_process_strategy_refuses_a_multi_process_launch(tmp_path: Path) -> None:
    output = torchrun("train", 2, 1, "sgd", "none", tmp_path / "x.safetensors", check=False)
    assert "launched on 2 processes but train.distributed is 'none'" in output
    assert not (tmp_path / "x.safetensors").exists()


# -- the whole pipeline on two processes ---------------------------------------------------------


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-run") / "run"
    torchrun("pipeline", out, "new", "ddp")
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
    torchrun("pipeline", copy, "resume", "ddp")
    assert len([line for line in (copy / "events.jsonl").read_text().splitlines() if '"step"' in line]) == steps


def test_the_methods_run_sharded(ddp_run: Path, tmp_path: Path) -> None:
    """CPI-FT's frozen stages, EPI's moving masks, a sparse method and LoRA run under FSDP, and
    what does not depend on a top-k's ties (see above) equals DDP's."""
    from cpift.runs import RunDir

    torchrun("pipeline", tmp_path / "run", "new", "fsdp", '["multitask", "cpift", "epi", "gallop", "lora"]')
    run = RunDir.open(tmp_path / "run")
    assert run.status == "done"
    assert {"multitask", "cpift", "epi", "gallop@5", "lora"} <= set(run.read_json("metrics.json")["scores"])
    for model in ("methods/multitask/final", "probes/math"):
        mine, theirs = (load_file(str(root / model / "model.safetensors")) for root in (tmp_path / "run", ddp_run))
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6, msg=f"{model}: {name}")
