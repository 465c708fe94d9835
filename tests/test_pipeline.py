"""The pipeline end to end on the tiny preset: every method, artifacts, resume, freezing, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cpift.cli import main
from cpift.config import ConfigError, load_config
from cpift.errors import CpiftError
from cpift.models import WEIGHTS_FILE, load_weights, tiny_llama
from cpift.pipeline import run_config
from cpift.regions import CoreRegions
from cpift.runs import RunDir
from cpift.scores import compare, wide

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
# Every task alone (τ = 1), so CPI-FT consolidates in several stages with earlier cores frozen.
STAGED = ["cpift.tau=1.0", "train.warmup_steps=0", "train.steps=8", "train.keep_checkpoints=true"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> RunDir:
    return run_config(load_config(TINY, STAGED), tmp_path_factory.mktemp("runs") / "tiny", progress=False)


def test_every_method_and_artifact(tiny_run: RunDir) -> None:
    run = tiny_run
    assert run.status == "done"
    for relpath in ["regions/manifest.json", "similarity.json", "groups.json", "fusion/" + WEIGHTS_FILE,
                    "fusion_report.csv", "methods/cpift/final/" + WEIGHTS_FILE, "methods/multitask/final/" + WEIGHTS_FILE,
                    "methods/multistage/final/" + WEIGHTS_FILE, "sequential/after_A/" + WEIGHTS_FILE,
                    "metrics.json", "metrics.csv", "events.jsonl"]:
        assert (run.path / relpath).exists(), relpath
    for task in ("math", "code", "logic", "format"):
        assert (run.path / "probes" / task / WEIGHTS_FILE).is_file()
    scores = pd.read_csv(run.path / "metrics.csv")
    models = set(scores.model)
    assert {"base", "multitask", "multistage", "cpift", "seq:after_A", "seq:multitask", "seq:cpift"} <= models
    assert {"probe:math", "probe:code"} <= models
    assert set(scores[scores.task != "retention"].task) == {"math", "code", "logic", "format"}
    summary = json.loads((run.path / "metrics.json").read_text())
    assert set(summary["normalised_average"]) == models
    assert summary["seesaw"]["base"] == {task: 0.0 for task in ("math", "code", "logic", "format")}
    steps = [e for e in run.events() if e.get("event") == "step"]
    assert {"stage", "step", "loss", "lr", "tokens_per_s", "eta_s"} <= set(steps[0])
    assert not any(p.name.startswith(".") for p in run.path.rglob("*") if p.is_dir())  # no half-written dirs


def test_pack_keeps_what_the_app_reads_without_weights(tiny_run: RunDir, tmp_path: Path) -> None:
    assert main(["pack", str(tiny_run.path), "--out", str(tmp_path / "packed")]) == 0
    packed = RunDir.open(tmp_path / "packed")
    assert packed.status == "done" and packed.config == tiny_run.config
    assert not list(packed.path.rglob(WEIGHTS_FILE)) and not (packed.path / "checkpoints").exists()
    assert list(tiny_run.path.glob("methods/*/masks*")) and not list(packed.path.glob("methods/*/masks*"))
    assert (packed.path / "methods/epi/drift.json").is_file()
    for relpath in ["similarity.json", "groups.json", "fusion_report.csv", "metrics.json", "metrics.csv", "events.jsonl"]:
        assert (packed.path / relpath).read_bytes() == (tiny_run.path / relpath).read_bytes()
    regions, original = CoreRegions.load(packed.path / "regions"), CoreRegions.load(tiny_run.path / "regions")
    p = tiny_run.config["cpift"]["p"]
    assert regions.max_p == p and (packed.path / "regions" / "masks.npz").is_file()
    assert all((regions.with_p(p / 2).packed(t) == original.with_p(p / 2).packed(t)).all() for t in regions.tasks)
    with tiny_run.lock():
        busy = subprocess.run([sys.executable, "-m", "cpift.cli", "pack", str(tiny_run.path), "--out",
                               str(tmp_path / "again")], capture_output=True, text=True)
    assert busy.returncode == 2 and "locked" in busy.stderr and not (tmp_path / "again").exists()


def test_stage_checkpoints_are_removed_once_a_method_is_saved(tmp_path: Path) -> None:
    run = run_config(load_config(TINY, ['run.methods=["multitask"]']), tmp_path / "lean", progress=False)
    assert (run.path / "methods/multitask/final" / WEIGHTS_FILE).is_file()
    assert not any((run.path / "checkpoints").glob("*/step-*"))


def test_frozen_cores_of_earlier_stages_are_bit_identical(tiny_run: RunDir) -> None:
    run = tiny_run
    groups = json.loads((run.path / "groups.json").read_text())
    stages = groups["stages"]
    assert len(stages) == 4  # τ = 1: every task in its own stage
    regions = CoreRegions.load(run.path / "regions")
    final = dict(load_weights(tiny_llama(0), run.path / "methods/cpift/final").named_parameters())
    # After stage i, the cores of stages ≤ i are frozen for the rest of consolidation.
    for i, stage in enumerate(stages[:-1], start=1):
        checkpoints = sorted((run.path / "checkpoints" / f"cpift_stage{i}").glob("step-*"))
        after_stage = dict(load_weights(tiny_llama(0), checkpoints[-1] / WEIGHTS_FILE).named_parameters())
        frozen_tasks = [task for group in stages[:i] for task in group]
        for name, param in final.items():
            mask = torch.zeros_like(param, dtype=torch.bool)
            for task in frozen_tasks:
                mask |= regions.tensor_mask(task, name)
            assert torch.equal(param.detach()[mask], after_stage[name].detach()[mask]), (i, name)
    first = dict(load_weights(tiny_llama(0), run.path / "fusion").named_parameters())
    assert any(not torch.equal(first[n], final[n]) for n in final)  # consolidation did train


def test_compare_prints_methods_by_tasks(tiny_run: RunDir, capsys) -> None:
    table = wide(compare([tiny_run.path]))
    assert {"cpift", "multitask", "multistage"} <= set(table.index)
    assert {"math", "code", "normalised_average"} <= set(table.columns)
    assert main(["compare", str(tiny_run.path)]) == 0
    assert "normalised_average" in capsys.readouterr().out


def test_second_process_is_refused(tiny_run: RunDir, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cpift.runs import RunDir\n"
         f"r = RunDir.open({str(tiny_run.path)!r})\nwith r.lock():\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CpiftError, match=f"run directory is locked by PID {holder.pid}"):
            run_config(load_config(TINY), tiny_run.path, resume=True, progress=False)
    finally:
        holder.kill()
        holder.wait()


def test_config_errors_come_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cpift\.tau"):
        load_config(TINY, ["cpift.tau=1.5"])
    with pytest.raises(ConfigError, match=r"data\.tasks\[0\]"):
        run_config(load_config(TINY, ['data.tasks=["nonexistent", "math"]', "sequential.first=math",
                                      "sequential.second=nonexistent"]), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    assert main(["run", str(TINY), "--out", str(tmp_path / "cli"), "--set", "train.lr=-1"]) == 2


def test_kill_mid_stage_then_resume_matches_uninterrupted(tiny_run: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "cpift.cli", "train", str(TINY), "--method", "cpift", "--out", str(out),
               *[arg for s in STAGED for arg in ("--set", s)]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    events = out / "events.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # kill after the first consolidation step
        if events.is_file() and '"stage": "cpift/stage2"' in events.read_text():
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-stage"
    assert main(["train", str(TINY), "--method", "cpift", "--out", str(out), "--resume",
                 *[arg for s in STAGED for arg in ("--set", s)]]) == 0
    resumed = load_weights(tiny_llama(0), out / "methods/cpift/final")
    uninterrupted = load_weights(tiny_llama(0), tiny_run.path / "methods/cpift/final")
    for (name, a), (_, b) in zip(resumed.named_parameters(), uninterrupted.named_parameters()):
        assert torch.equal(a, b), name
    assert RunDir.open(out).status == "done"


@pytest.mark.parametrize("command", ["", "run", "probe", "regions", "group", "fuse", "train", "eval", "compare",
                                     "findings", "pack", "demo"])
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    assert f"usage: cpift {command}".strip() in capsys.readouterr().out


def test_help_answers_without_importing_torch() -> None:
    code = "import sys; from cpift.cli import build_parser; build_parser(); print(sorted({'torch', 'transformers', " \
           "'pandas', 'scipy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unknown_method_is_one_clear_error(capsys) -> None:
    assert main(["train", str(TINY), "--method", "nope", "--out", "unused"]) == 2
    assert "'nope' is not one of cpift, multitask" in capsys.readouterr().err


def test_single_steps_from_the_cli(tiny_run: RunDir, tmp_path: Path, capsys) -> None:
    base = tmp_path / "base.safetensors"
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in tiny_llama(0).named_parameters()}, base)
    probes = [f"--task={t}={tiny_run.path / 'probes' / t / WEIGHTS_FILE}" for t in ("math", "code")]
    assert main(["regions", "--base", str(base), *probes, "--p", "5", "--out", str(tmp_path / "regions")]) == 0
    capsys.readouterr()
    assert main(["group", str(tmp_path / "regions"), "--tau", "0.0"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == [["math", "code"]]
    assert main(["fuse", "--base", str(base), *probes, "--regions", str(tmp_path / "regions"),
                 "--out", str(tmp_path / "fused")]) == 0
    assert (tmp_path / "fused" / WEIGHTS_FILE).is_file() and (tmp_path / "fused" / "report.csv").is_file()
    assert main(["eval", str(TINY), "--model", str(tmp_path / "fused")]) == 0
    assert "retention" in capsys.readouterr().out
    # A task's core depends only on the base and its own model: the same as in the run (compared by
    # name: a safetensors file stores tensors in another order than the module).
    from_cli = CoreRegions.load(tmp_path / "regions").mask("math")
    in_run = CoreRegions.load(tiny_run.path / "regions").mask("math")
    assert from_cli.keys() == in_run.keys() and all(torch.equal(from_cli[n], in_run[n]) for n in in_run)
