"""Regression tests for bad input found by using cpift as a new user would: each ends as one clear
``cpift`` error (CLI: exit 2, one line naming the culprit, no traceback), nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from cpift.atomic import atomic_dir, atomic_write_text
from cpift.cli import main
from cpift.config import ConfigError, config_changes, load_config
from cpift.errors import CpiftError, DiskFullError, OutputExistsError
from cpift.models import tiny_llama
from cpift.pipeline import ConfigChangedError, run_config
from cpift.regions import core_regions
from cpift.runs import RunDir, RunExistsError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
ONE_METHOD = ['run.methods=["multitask"]', "train.steps=2", "eval.retention=false"]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of the ``cpift`` command."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    run_config(load_config(TINY, ONE_METHOD), out, progress=False)
    return out


# -- 1. a resume compares the whole config ----------------------------------------------------


def test_resume_with_a_changed_config_is_refused_naming_the_keys(finished_run: Path, capsys) -> None:
    before = (finished_run / "manifest.json").read_text()
    code, err = _cli(["run", TINY, "--out", finished_run, "--resume", *_sets([*ONE_METHOD, "train.lr=0.5"])], capsys)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.lr: 0.001 → 0.5" in err and "--out" in err
    config = json.loads(before)["config"]
    assert json.loads((finished_run / "manifest.json").read_text())["config"] == config


def test_a_run_made_before_a_setting_existed_resumes_with_its_default(tmp_path: Path, finished_run: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["eval"]["probes"]  # as a cpift without eval.probes wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_config(load_config(TINY, ONE_METHOD), out, resume=True, progress=False).status == "done"
    with pytest.raises(ConfigChangedError, match="eval.probes: true → false"):
        run_config(load_config(TINY, [*ONE_METHOD, "eval.probes=false"]), out, resume=True, progress=False)


def test_resume_without_the_runs_methods_is_refused(finished_run: Path, capsys) -> None:
    code, err = _cli(["run", TINY, "--out", finished_run, "--resume", *_sets(ONE_METHOD[1:])], capsys)
    assert code == 2 and "run.methods" in err and "--add-methods" in err


def test_add_methods_extends_the_run_and_records_it(tmp_path: Path, finished_run: Path) -> None:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    grown = [*ONE_METHOD[1:], 'run.methods=["multitask", "multistage"]']
    with pytest.raises(ConfigChangedError, match="add_methods=True"):
        run_config(load_config(TINY, grown), out, resume=True, progress=False)
    run = run_config(load_config(TINY, grown), out, resume=True, add_methods=True, progress=False)
    manifest = run.manifest
    assert manifest["config"]["run"]["methods"] == ["multitask", "multistage"]
    [change] = manifest["config_changes"]
    assert (change["key"], change["old"], change["new"]) == ("run.methods", ["multitask"], ["multitask", "multistage"])
    assert (out / "methods" / "multistage" / "final").is_dir()
    # add_methods allows growing the methods, nothing else.
    with pytest.raises(ConfigChangedError, match="train.lr"):
        run_config(load_config(TINY, [*grown, "train.lr=0.5"]), out, resume=True, add_methods=True, progress=False)


def test_config_changes_lists_every_difference() -> None:
    old = {"run": {"methods": ["a"]}, "train": {"lr": 1.0, "steps": 3}}
    new = {"run": {"methods": ["a", "b"]}, "train": {"lr": 1.0}, "eval": {"n": 2}}
    assert config_changes(old, new) == [("run.methods", ["a"], ["a", "b"]), ("eval.n", None, 2),
                                        ("train.steps", 3, None)]
    assert config_changes(old, json.loads(json.dumps(old))) == []


# -- 2. a full disk --------------------------------------------------------------------------


def test_a_write_that_fails_on_a_full_disk_says_so_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    """torch's zip writer loses the errno ("unexpected pos"): a failure with no space left is a full disk."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(10 << 20, 10 << 20, 0))
    target = tmp_path / "ckpt"
    with pytest.raises(DiskFullError, match=r"no space left on device while writing .*ckpt") as info:
        with atomic_dir(target):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 97856 vs 97748")
    assert isinstance(info.value, CpiftError) and info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_enospc_from_a_file_write_names_the_file(tmp_path: Path, monkeypatch) -> None:
    def no_space(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError, match="metrics.json"):
        atomic_write_text(tmp_path / "metrics.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_a_run_on_a_full_file_system_stops_clearly_and_resumes(tmp_path: Path) -> None:
    """The reproduction itself: a 1 MiB tmpfs (needs root and mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        command = [sys.executable, "-m", "cpift.cli", "run", str(TINY), "--out", str(mount / "run"),
                   *_sets(['run.methods=["cpift"]'])]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert "cpift: error: no space left on device while writing " + str(mount / "run") in done.stderr
        subprocess.run(["mount", "-o", "remount,size=200m", str(mount)], check=True)
        done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert RunDir.open(mount / "run").status == "done"
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# -- 3. names --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x\n", "t" * 129, "a/b", "bigbench:", "bigbench:a//b", ""])
def test_task_names_that_cannot_name_files_are_refused_before_any_work(name: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.tasks\[1\]"):
        load_config(TINY, [f"data.tasks={json.dumps(['math', name])}"])


def test_long_dataset_and_run_names_are_refused(tmp_path: Path) -> None:
    spec = {"name": "d" * 300, "source": str(ROOT / "tests/fixtures/datasets/gsm8k.jsonl"), "format": "gsm8k"}
    config = tmp_path / "c.toml"
    config.write_text(TINY.read_text().replace('[model]', '[[data.datasets]]\n' + "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in spec.items()) + "\n\n[model]", 1))
    with pytest.raises(ConfigError, match=r"data\.datasets\[0\]\.name: .*300 characters"):
        load_config(config)
    with pytest.raises(ConfigError, match=r"run\.name"):
        load_config(TINY, ["run.name=" + "r" * 65])


# -- 4. unusable output paths ------------------------------------------------------------------


@pytest.mark.parametrize("out, message", [
    ("afile/sub", "afile is a file, not a directory"),
    ("n" * 300, "more than a file name may"),
    ("/proc/cpift-run-" + uuid.uuid4().hex[:6], "/proc refuses it"),
])
def test_unusable_out_paths_give_one_line(out: str, message: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    code, err = _cli(["run", TINY, "--out", out, *_sets(ONE_METHOD)], capsys)
    assert code == 2 and err.startswith("cpift: error: cannot create the run directory") and message in err
    assert err.count("\n") == 1


def test_an_existing_run_names_the_cli_remedy(finished_run: Path, capsys) -> None:
    code, err = _cli(["run", TINY, "--out", finished_run, *_sets(ONE_METHOD)], capsys)
    assert code == 2 and "pass --resume" in err and "RunDir" not in err
    with pytest.raises(RunExistsError, match="resume=True"):
        RunDir.create(finished_run, {})


# -- 5. duplicate task names ---------------------------------------------------------------------


def test_a_repeated_task_is_refused(tmp_path: Path, capsys) -> None:
    code, err = _cli(["regions", "--base", "tiny", "--task", "math=A", "--task", "math=B", "--out", tmp_path / "r"],
                     capsys)
    assert code == 2 and "--task math is given twice" in err
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(TINY, ['data.tasks=["math", "math"]'])


# -- 6. no bare built-in exceptions on user errors ------------------------------------------------


def test_saving_regions_onto_an_existing_path_is_a_cpift_error(tmp_path: Path, tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=5)
    with pytest.raises(OutputExistsError, match="overwrite=True") as info:
        regions.save(tmp_path)
    assert isinstance(info.value, CpiftError) and isinstance(info.value, FileExistsError)


def test_cli_out_that_exists_names_the_option(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base.safetensors"
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in tiny_llama(0).named_parameters()}, base)
    code, err = _cli(["regions", "--base", base, "--task", f"a={base}", "--task", f"b={base}", "--out", tmp_path],
                     capsys)
    assert code == 2 and err.rstrip().endswith("already exists; choose another --out")


# -- 7. CLI messages name CLI remedies --------------------------------------------------------------


def test_pickle_checkpoints_name_the_cli_option(tmp_path: Path, capsys) -> None:
    pickled = tmp_path / "model.pt"
    torch.save({n: p.detach() for n, p in tiny_llama(0).named_parameters()}, pickled)
    code, err = _cli(["regions", "--base", pickled, "--task", f"a={pickled}", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "--allow-pickle" in err and "allow_pickle=True" not in err
    assert main(["regions", "--base", str(pickled), "--task", f"a={pickled}", "--allow-pickle",
                 "--out", str(tmp_path / "r")]) == 0
