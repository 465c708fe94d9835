"""The exported HTML report: one self-contained file with every figure, table and run config."""

from __future__ import annotations

import html
import re
import shutil

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from cpift.config import parse_config
from cpift.errors import ParameterError
from cpift.plots.compare import merge_metrics
from cpift.report import chromium_path, comparison_figures, export_report, figure_file, load_metrics, run_figures
from cpift.runs import RunDir


@pytest.fixture(scope="module")
def two_runs(tiny_run, tmp_path_factory):
    """The tiny run and a copy of it under another name, as two runs to compare."""
    other = tmp_path_factory.mktemp("report") / "tiny-copy"
    shutil.copytree(tiny_run.path, other, ignore=shutil.ignore_patterns("*.safetensors", "run.lock"))
    return [tiny_run.path, other]


def test_report_is_self_contained_with_every_figure_and_config(two_runs, tmp_path):
    out = export_report(two_runs, tmp_path / "report.html")
    text = out.read_text(encoding="utf-8")
    assert text.count(get_plotlyjs()) == 1  # plotly.js inlined, once
    assert not re.search(r"<script[^>]*\bsrc=", text)
    assert "http" not in text.replace(get_plotlyjs(), "")  # nothing fetched from the network
    assert list(tmp_path.iterdir()) == [out]  # written atomically: no temporary left

    expected = [*comparison_figures(merge_metrics(load_metrics(two_runs))).items()]
    for path in two_runs:
        run = RunDir.open(path)
        assert html.escape(parse_config(run.config).to_toml()) in text
        assert f"<h2>Run {path.name}</h2>" in text
        expected += run_figures(path).items()
    drawn = [t for t, f in expected if isinstance(f, go.Figure)]
    notes = [(t, f) for t, f in expected if isinstance(f, str)]
    assert len(drawn) >= 10
    for title in drawn:
        assert f'data-title="{html.escape(title)}"' in text
    for title, why in notes:
        assert f"{html.escape(title)}: {html.escape(why)}" in text
    assert text.count('class="plotly-graph-div"') == len(drawn) + 2  # + each run's sequential study
    for model in ("tiny-copy/cpift", "run/multitask", "run/seq:cpift"):
        assert f"<th>{html.escape(model)}</th>" in text  # the methods × tasks table, every run's rows


def test_report_of_a_run_without_metrics_says_so(tmp_path, tiny_run):
    fresh = RunDir.create(tmp_path / "fresh", tiny_run.config)
    text = export_report([fresh.path], tmp_path / "r.html").read_text()
    assert "No run has metrics yet." in text
    assert "no optimizer step recorded yet" in text
    with pytest.raises(ParameterError, match="share the name"):
        export_report([tiny_run.path, tiny_run.path], tmp_path / "twice.html")


def test_figure_file_as_html_opens_offline():
    name, data, mime = figure_file(go.Figure(go.Bar(x=[1], y=[2])), "scores", png=False)
    assert (name, mime) == ("scores.html", "text/html")
    assert get_plotlyjs().encode() in data


@pytest.mark.skipif(chromium_path() is None, reason="kaleido finds no Chromium-based browser here")
def test_figure_file_is_a_png_when_kaleido_finds_a_browser():
    name, data, mime = figure_file(go.Figure(go.Bar(x=[1], y=[2])), "scores")
    assert (name, mime) == ("scores.png", "image/png")
    assert data.startswith(b"\x89PNG\r\n\x1a\n")


def test_figure_file_retries_a_failed_png_render_then_falls_back_to_html(monkeypatch):
    import cpift.report as report

    calls = []

    def flaky(fig, **kwargs):
        calls.append(1)
        if len(calls) < failures:
            raise RuntimeError("kaleido_scopes is not defined")
        return b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(report.pio, "to_image", flaky)
    monkeypatch.setattr(report, "chromium_path", lambda: "/usr/bin/chromium")
    failures = 2  # the first render fails, the second works
    assert report.figure_file(go.Figure(), "x")[0] == "x.png" and len(calls) == 2
    calls.clear()
    failures = 3  # both fail: HTML by default, the error when PNG was asked for
    assert report.figure_file(go.Figure(), "x")[0] == "x.html"
    calls.clear()
    with pytest.raises(RuntimeError, match="kaleido_scopes"):
        report.figure_file(go.Figure(), "x", png=True)
