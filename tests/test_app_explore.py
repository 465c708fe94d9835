"""The app's exploration pages (Core regions, Overlap, Grouping, Fusion preview) through AppTest.

Each test opens a page on the tiny run, moves a widget and checks that the numbers shown change
as the library says they should; figures are read back from the plotly chart's JSON spec.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from streamlit.testing.v1 import AppTest

from cpift.fusion import transplant_report
from cpift.grouping import group_tasks
from cpift.models import save_weights, tiny_llama
from cpift.pipeline import pack_run
from cpift.regions import CoreRegions, core_regions

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")


def open_page(page: str, run: Path | str, **params: str) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=300)
    at.query_params.update({"page": page, "run": str(run), **params})
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def _decode(value):
    """JSON from plotly with its typed arrays (``{"dtype", "bdata", "shape"}``) decoded to numpy."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
            return array.reshape([int(n) for n in str(value["shape"]).split(",")]) if "shape" in value else array
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def figures(at: AppTest) -> dict[str, go.Figure]:
    """The page's plotly figures (read back from each chart's JSON spec), keyed by their title."""
    out = {}
    for chart in at.get("plotly_chart"):
        fig = go.Figure(_decode(json.loads(chart.proto.spec)))
        out[fig.layout.title.text] = fig
    return out


def figure(at: AppTest, title_start: str) -> go.Figure:
    matches = [spec for title, spec in figures(at).items() if title.startswith(title_start)]
    assert len(matches) == 1, (title_start, list(figures(at)))
    return matches[0]


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def run_path(tiny_run) -> Path:
    return tiny_run.path


@pytest.fixture(scope="module")
def saved(run_path) -> CoreRegions:
    return CoreRegions.load(run_path / "regions")


def test_regions_page_p_slider_changes_core_sizes(run_path, saved):
    before = snapshot(run_path)
    at = open_page("regions", run_path)
    table = at.dataframe[0].value
    assert table["core elements"].tolist() == [saved.size(t) for t in saved.tasks]
    shares = figure(at, "Core size per layer").data[0].y
    histogram = figure(at, "Distribution of |Δθ|")
    assert histogram.layout.xaxis.type == "log"

    at.slider(key="w_p").set_value(2.0).run()  # below the run's p: from the saved top magnitudes
    smaller = at.dataframe[0].value
    expected = saved.with_p(2.0)
    assert smaller["core elements"].tolist() == [expected.size(t) for t in saved.tasks]
    assert smaller["threshold |Δ|"].tolist() == pytest.approx([expected.threshold(t) for t in saved.tasks])
    assert np.sum(figure(at, "Core size per layer").data[0].y) < np.sum(shares)
    assert at.query_params["p"] == "2.0"

    at.slider(key="w_p").set_value(8.0).run()  # above it: measured again from the base and the probes
    larger = at.dataframe[0].value["core elements"].tolist()
    assert larger == [int(0.08 * saved.layout.numel)] * len(saved.tasks)
    threshold_mark = next(t for t in figure(at, "Distribution of |Δθ|").data if "threshold" in t.name)
    assert threshold_mark.x[0] == pytest.approx(at.dataframe[0].value["threshold |Δ|"][0])
    assert snapshot(run_path) == before  # viewing never writes to the run


def test_overlap_page_layer_switch_and_p(run_path, saved):
    at = open_page("overlap", run_path, layer="0")
    whole = np.array(figure(at, "Jaccard overlap of the cores").data[0].z, dtype=float)
    off = ~np.eye(len(whole), dtype=bool)
    assert np.allclose(whole[off], saved.jaccard().to_numpy()[off])
    layer0 = figure(at, "Jaccard overlap in layer 0").data[0]
    table = saved.layer_jaccard("layer")
    row = table[(table.group == "0") & (table.task_a == "math") & (table.task_b == "code")].iloc[0]
    assert layer0.z[0][1] == pytest.approx(row.jaccard)
    assert list(layer0.customdata[0][1][-2:]) == [row.intersection, row.union]  # hover counts

    at.select_slider(key="w_layer").set_value("1").run()
    layer1 = figure(at, "Jaccard overlap in layer 1").data[0]
    row1 = table[(table.group == "1") & (table.task_a == "math") & (table.task_b == "code")].iloc[0]
    assert layer1.z[0][1] == pytest.approx(row1.jaccard) and row1.jaccard != row.jaccard
    assert at.query_params["layer"] == "1"
    assert list(figure(at, "Jaccard overlap per layer").data[0].x[:3]) == ["embed", "0", "1"]

    at.radio(key="w_overlap_by").set_value("module").run()
    modules = figure(at, "Jaccard overlap per module").data[0].x
    assert "self_attn.q_proj" in modules and "mlp.down_proj" in modules

    at.slider(key="w_p").set_value(2.5).run()
    assert np.allclose(np.array(figure(at, "Jaccard overlap of the cores").data[0].z, dtype=float)[off],
                       saved.with_p(2.5).jaccard().to_numpy()[off])

    at.radio(key="w_overlap_value").set_value("lift").run()
    lift = figure(at, "Lift of the overlap over chance of the cores").data[0]
    assert lift.zmid == 1.0
    expected = saved.with_p(2.5).overlap_significance()
    assert lift.z[0][1] == pytest.approx(expected.lift.iloc[0])
    at.radio(key="w_overlap_scale").set_value("fixed").run()
    assert figure(at, "Lift of the overlap over chance of the cores").data[0].zmax == 2.0


def test_overlap_page_shows_each_pair_beside_chance(run_path, saved):
    at = open_page("overlap", run_path)
    shown = next(d.value for d in at.dataframe if "expected_jaccard" in d.value.columns)
    expected = saved.overlap_significance()
    assert np.allclose(shown["expected_jaccard"], expected["expected_jaccard"])
    assert np.allclose(shown["lift"], expected["lift"], equal_nan=True)
    assert "chance" in " ".join(str(e.value) for e in [*at.caption, *at.warning])


def _groups(fig: go.Figure) -> list[str]:
    return sorted(t.name for t in fig.data if t.name.startswith("group "))


def _nodes(fig: go.Figure) -> dict[str, tuple[float, float]]:
    return {n: (x, y) for t in fig.data if t.name.startswith("group ") for n, x, y in zip(t.text, t.x, t.y)}


def test_grouping_page_tau_changes_graph_groups_and_plan(run_path, saved):
    jaccard = saved.jaccard()
    values = np.sort(jaccard.to_numpy()[np.triu_indices(len(jaccard), 1)])
    low, high = float(values[0]) / 2, float(values[-1]) + 0.001
    at = open_page("grouping", run_path, tau=f"{low:.4f}")
    graph = figure(at, "Tasks linked at τ")
    assert len(_groups(graph)) == 1  # every pair linked
    edges = next(t for t in graph.data if t.name == "edges")
    assert len(edges.x) == len(values)
    nodes = _nodes(graph)

    at.slider(key="w_tau").set_value(round(high, 3)).run()
    graph = figure(at, "Tasks linked at τ")
    assert len(_groups(graph)) == len(saved.tasks) == len(group_tasks(jaccard, round(high, 3)))
    assert not any(t.name == "edges" and t.x for t in graph.data)
    assert _nodes(graph) == nodes  # positions stay put as τ changes
    plan = figure(at, "Stage plan")
    assert len(plan.data[0].cells.values[0]) == len(saved.tasks)
    dendrogram = figure(at, "Single-linkage dendrogram")
    tau_line, chance_line = dendrogram.layout.shapes[-2:]
    assert tau_line.y0 == pytest.approx(round(high, 3))
    chance = saved.overlap_significance().expected_jaccard.mean()
    assert chance_line.y0 == pytest.approx(chance) and chance_line.line.dash == "dash"
    assert any(f"chance level {chance:.4f}" in c.value for c in at.caption)
    assert at.query_params["tau"] == str(round(high, 3))

    at.selectbox(key="w_stage_order").set_value("given").run()
    trains = list(figure(at, "Stage plan").data[0].cells.values[1])
    assert trains == saved.tasks  # "given" keeps the groups' order


def test_fusion_page_overlap_rule_and_p_change_the_shares(run_path, saved):
    at = open_page("fusion", run_path)
    contested = [m.value for m in at.metric]
    expected = transplant_report(saved, "max_delta", by="layer")
    assert contested == [f"{int(expected.contested.sum()):,}"]
    shares = figure(at, "Transplanted core elements")
    math = next(t for t in shares.data if t.name == "math")
    assert np.allclose(math.y, 100 * expected["from:math"] / expected["numel"])
    angles = figure(at, "Angle between base and task tensors")
    assert [b.name for b in angles.data] == saved.tasks

    at.radio(key="w_overlap_rule").set_value("mean").run()
    mean = transplant_report(saved, "mean", by="layer")
    math = next(t for t in figure(at, "Transplanted core elements").data if t.name == "math")
    assert np.allclose(math.y, 100 * mean["from:math"] / mean["numel"])
    assert not np.allclose(mean["from:math"], expected["from:math"])

    at.slider(key="w_p").set_value(1.0).run()
    smaller = transplant_report(saved.with_p(1.0), "mean", by="layer")
    assert [m.value for m in at.metric] == [f"{int(smaller.contested.sum()):,}"]
    assert smaller.contested.sum() < mean.contested.sum()


def test_fusion_page_quick_evaluation(run_path):
    before = snapshot(run_path)
    at = open_page("fusion", run_path)
    at.number_input(key="w_eval_items").set_value(1)
    next(b for b in at.button if b.label.startswith("Fuse at")).click().run()
    assert not at.error, [e.value for e in at.error]
    scores = at.dataframe[-1].value
    assert scores["task"].tolist() == ["math", "code", "logic", "format"]
    assert scores["n"].tolist() == [1] * 4 and scores[["base", "fused"]].stack().between(0, 1).all()
    for page in ("overlap", "grouping"):
        open_page(page, run_path)
    assert snapshot(run_path) == before  # building and scoring a fused model reads the run only


def test_regions_page_computes_from_checkpoint_paths(run_path, tmp_path):
    base = save_weights(tiny_llama(seed=0), tmp_path / "base")
    at = open_page("regions", run_path)
    at.text_input[0].set_value(str(base))
    at.text_area[0].set_value(f"math = {run_path / 'probes/math'}\ncode = {run_path / 'probes/code'}")
    at.number_input[0].set_value(2.0)
    at.button[0].click().run()
    assert not at.error and not at.exception, [e.value for e in at.error]
    expected = core_regions(base, {t: run_path / "probes" / t for t in ("math", "code")}, p=2.0)
    table = at.dataframe[0].value
    assert table["task"].tolist() == ["math", "code"]
    assert table["core elements"].tolist() == [expected.size("math"), expected.size("code")]
    at.slider(key="w_p").set_value(0.5).run()  # every |Δ| is held: any p
    assert at.dataframe[0].value["core elements"].tolist() == [expected.with_p(0.5).size("math")] * 2
    at.switch_page("views/grouping.py").run()  # the other pages explore the same checkpoints
    assert len(_groups(figure(at, "Tasks linked at τ"))) in (1, 2) and not at.error

    at = open_page("regions", run_path)
    at.text_input[0].set_value(str(tmp_path / "no-such-model"))
    at.text_area[0].set_value(f"math = {run_path / 'probes/math'}")
    at.button[0].click().run()
    assert at.error and not at.exception


def test_packed_run_without_weights(run_path, saved, tmp_path):
    packed = pack_run(run_path, tmp_path / "packed")  # what sample_runs/ ships: no weights, top-p |Δ| only
    at = open_page("regions", packed)
    slider = at.slider(key="w_p")
    assert slider.max == saved.p  # with_p answers p ≤ the saved q only, and there are no probes
    slider.set_value(1.0).run()
    assert at.dataframe[0].value["core elements"].tolist() == [saved.with_p(1.0).size(t) for t in saved.tasks]
    at = open_page("fusion", packed)
    assert not at.error and not at.button  # no quick evaluation without probe weights
    assert figure(at, "Transplanted core elements") and figure(at, "Angle between base and task tensors")


def _broken_runs(run_path: Path, tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text("{not json")
    other_version = tmp_path / "other_version"
    other_version.mkdir()
    manifest = json.loads((run_path / "manifest.json").read_text())
    (other_version / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    old_regions = tmp_path / "old_regions"
    shutil.copytree(run_path, old_regions, ignore=shutil.ignore_patterns("probes", "methods", "sequential", "fusion"))
    regions_manifest = old_regions / "regions" / "manifest.json"
    regions_manifest.write_text(json.dumps({**json.loads(regions_manifest.read_text()), "version": 1}))
    truncated = tmp_path / "truncated"
    shutil.copytree(old_regions, truncated)
    (truncated / "regions" / "manifest.json").write_text((run_path / "regions" / "manifest.json").read_text())
    masks = next((truncated / "regions").glob("masks.*"))
    masks.write_bytes(masks.read_bytes()[:100])
    return {"missing": tmp_path / "nowhere", "corrupt": corrupt, "other version": other_version,
            "regions of another version": old_regions, "truncated regions": truncated}


@pytest.mark.parametrize("page", ["regions", "overlap", "grouping", "fusion"])
def test_bad_runs_show_an_error_not_a_crash(run_path, tmp_path, page):
    for what, path in _broken_runs(run_path, tmp_path).items():
        at = open_page(page, path)
        assert at.error, (page, what)
        assert not at.get("plotly_chart"), (page, what)
    messages = " ".join(e.value for e in at.error)
    assert "truncated/regions/masks" in messages  # the message names the damaged file
