"""The app's run pages (Runs, Training, Compare & report) through AppTest.

Widgets change what is shown; a missing, corrupt or failed run is a message on the page, never an
exception; and viewing a run never changes a byte or a modification time in it.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from streamlit.testing.v1 import AppTest

from cpift.config import read_config
from cpift.estimate import estimate_cpu_seconds
from cpift.explore import run_progress
from cpift.scores import compare, formatted, wide
from cpift.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "app" / "main.py")


def open_page(page: str, run: Path | str) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=300)
    at.query_params.update({"page": page, "run": str(run)})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def tree_state(path: Path) -> dict[str, tuple[int, str]]:
    return {str(f.relative_to(path)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(path.rglob("*")) if f.is_file()}


def chart(at: AppTest, index: int) -> go.Figure:
    """A plotly chart of the page, read back from its JSON spec."""
    return pio.from_json(at.get("plotly_chart")[index].proto.spec)


def values(array) -> np.ndarray:
    """A trace's array as numpy: plotly's JSON writes numeric arrays as base64 typed arrays."""
    if isinstance(array, dict):
        data = np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
        return data.reshape([int(n) for n in str(array.get("shape", len(data))).split(",")])
    return np.asarray(array)


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


@pytest.fixture(scope="module")
def copy_run(tiny_run, tmp_path_factory) -> Path:
    """A second run to compare: the tiny run under another name (weights left out)."""
    other = tmp_path_factory.mktemp("app_runs") / "tiny-copy"
    shutil.copytree(tiny_run.path, other, ignore=shutil.ignore_patterns("*.safetensors", "run.lock"))
    return other


def test_runs_page_status_metrics_and_a_preset_to_start_from(tiny_run):
    at = open_page("runs", tiny_run.path)
    assert "Status: **done**" in texts(at.success)
    table = at.dataframe[0].value
    expected = formatted(compare([tiny_run.path]))
    assert list(table.index) == list(expected.index)
    assert table.to_dict() == expected.to_dict()
    average = next(c for c in table.columns if c.startswith("normalised_average"))
    means = wide(compare([tiny_run.path]))["normalised_average"]
    assert [float(cell.split()[0]) for cell in table[average]] == pytest.approx(means.tolist(), abs=1e-3)
    assert all("[" in cell for cell in table[average])  # every score with its interval

    at.selectbox(key="runs_form_preset").set_value("tiny").run()
    assert at.text_area(key="runs_form_text").value == (ROOT / "configs" / "tiny.toml").read_text()
    assert "No time estimate for model 'tiny'" in texts(at.caption)
    at.selectbox(key="runs_form_preset").set_value("quick").run()
    assert at.text_area(key="runs_form_text").value == (ROOT / "configs" / "quick.toml").read_text()
    quick = read_config(ROOT / "configs" / "quick.toml")
    assert f"{estimate_cpu_seconds(quick).steps} optimizer steps" in texts(at.caption)
    at.multiselect(key="runs_form_methods").set_value(["multitask"]).run()
    assert f"{quick.train.steps} optimizer steps × 8.0 s" in texts(at.caption)


def test_training_page_shows_the_runs_progress(tiny_run):
    at = open_page("training", tiny_run.path)
    progress = run_progress(tiny_run.path)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Status"] == "done"
    assert metrics["Step"] == f"{progress.step} / {progress.steps}"
    fig = chart(at, 0)
    loss_traces = [t for t in fig.data if t.yaxis == "y"]
    assert [t.name for t in loss_traces] == list(dict.fromkeys(progress.losses["stage"]))
    assert np.concatenate([values(t.y) for t in loss_traces]).tolist() == pytest.approx(
        progress.losses.groupby("stage", sort=False)["loss"].apply(list).sum())
    assert not [b for b in at.button if b.label in ("Stop", "Resume")]


def test_training_page_offers_resume_for_a_stopped_run(tiny_run, tmp_path):
    run = RunDir.create(tmp_path / "stopped", tiny_run.config)
    run.set_status("stopped", error="interrupted by the user")
    at = open_page("training", run.path)
    assert "Stopped: interrupted by the user" in texts(at.warning)
    assert [b.label for b in at.button if b.label in ("Stop", "Resume")] == ["Resume"]


def test_compare_page_across_runs_and_the_report(tiny_run, copy_run):
    at = open_page("compare", tiny_run.path)
    one = at.dataframe[0].value
    assert list(one.index) == list(wide(compare([tiny_run.path])).index)
    charts = len(at.get("plotly_chart"))
    assert charts >= 4 and len(at.get("download_button")) == charts

    at.text_input(key="w_compare_more").input(str(copy_run)).run()
    both = at.dataframe[0].value
    assert list(both.index) == list(wide(compare([tiny_run.path, copy_run])).index)
    assert "tiny-copy/cpift" in both.index and "run/cpift" in both.index
    assert {t.name for t in chart(at, 0).data} == set(both.index)

    at.button(key="export").click().run()
    assert not at.exception
    assert any(b.proto.label == "Download report (HTML)" for b in at.get("download_button"))


@pytest.mark.parametrize("page", ["runs", "training", "compare"])
def test_missing_corrupt_and_failed_runs_are_messages(page, tiny_run, tmp_path):
    at = open_page(page, tmp_path / "nowhere")
    assert "does not exist" in texts(at.error)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    at = open_page(page, corrupt)
    assert "manifest.json" in texts(at.error)

    failed = RunDir.create(tmp_path / "failed", tiny_run.config)
    failed.set_status("failed", error="CheckpointError: probes/math is corrupt")
    at = open_page(page, failed.path)
    shown = texts(at.error) + texts(at.warning)
    if page == "compare":
        assert "No metrics yet in failed" in shown
    else:
        assert "CheckpointError: probes/math is corrupt" in shown


def test_viewing_never_modifies_the_run(tiny_run):
    before = tree_state(tiny_run.path)
    for page in ("runs", "training", "compare"):
        at = open_page(page, tiny_run.path)
    at.button(key="export").click().run()
    assert tree_state(tiny_run.path) == before
