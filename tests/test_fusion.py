"""Tests of cpift.fusion: SLERP, core transplant with overlap rules and folds, the fusion report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cpift.checkpoint import open_checkpoint
from cpift.errors import MismatchError, ParameterError
from cpift.fusion import fuse, slerp, transplant_report
from cpift.overlap import layer_of
from cpift.regions import CoreRegions, core_regions

HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def np_slerp(t: float, v0, v1, dot_threshold: float = 0.9995, eps: float = 1e-8) -> np.ndarray:
    """mergekit's SLERP, re-implemented in float64 numpy."""
    a = np.asarray(v0, dtype=np.float64)
    b = np.asarray(v1, dtype=np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    an = a / na if na > eps else a
    bn = b / nb if nb > eps else b
    dot = float(np.sum(an * bn))
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    return float(torch.dot(a64, b64) / (a64.norm() * b64.norm()))


@st.composite
def tensor_pairs(draw, dtypes=tuple(DTYPES)):
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    scale0 = draw(st.sampled_from([0.0, 1e-3, 1.0, 30.0]))
    scale1 = draw(st.sampled_from([1e-3, 1.0, 30.0]))
    generator = torch.Generator().manual_seed(seed)
    v0 = (torch.randn(shape, generator=generator) * scale0).to(dtype)
    v1 = (torch.randn(shape, generator=generator) * scale1).to(dtype)
    return v0, v1


# ---------------------------------------------------------------------------------------------
# slerp
# ---------------------------------------------------------------------------------------------


@HYPOTHESIS
@given(pair=tensor_pairs())
def test_slerp_endpoints_exact(pair):
    v0, v1 = pair
    start, end = slerp(v0, v1, 0.0), slerp(v0, v1, 1.0)
    assert start.dtype == v0.dtype and end.dtype == v0.dtype
    assert start.shape == v0.shape and end.shape == v0.shape
    assert torch.equal(start, v0)
    assert torch.equal(end, v1)
    assert torch.equal(slerp(v0, v1, 0), v0)  # integer endpoints too
    assert torch.equal(slerp(v0, v1, 1), v1)


@HYPOTHESIS
@given(pair=tensor_pairs(), t=st.floats(0.0, 1.0))
def test_slerp_keeps_dtype_and_shape(pair, t):
    v0, v1 = pair
    out = slerp(v0, v1, t)
    assert out.dtype == v0.dtype
    assert out.shape == v0.shape
    assert torch.isfinite(out).all()


@HYPOTHESIS
@given(pair=tensor_pairs(dtypes=(torch.float32,)), t=st.floats(0.0, 1.0))
def test_slerp_matches_numpy_mergekit(pair, t):
    v0, v1 = pair
    a, b = v0.numpy().astype(np.float64).ravel(), v1.numpy().astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = float(np.dot(a / (na if na > 1e-8 else 1), b / (nb if nb > 1e-8 else 1)))
    assume(abs(abs(dot) - 0.9995) > 1e-4)  # stay clear of the branch boundary
    expected = np_slerp(t, a, b).reshape(v0.shape)
    scale = max(float(np.abs(a).max(initial=0)), float(np.abs(b).max(initial=0)), 1e-30)
    np.testing.assert_allclose(slerp(v0, v1, t).numpy(), expected, rtol=1e-4, atol=1e-5 * scale)


def test_slerp_matches_numpy_on_fixed_inputs():
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        v0 = torch.randn(4, 6, generator=generator)
        v1 = torch.randn(4, 6, generator=generator) * 3
        for t in (0.1, 0.25, 0.5, 0.9):
            np.testing.assert_allclose(slerp(v0, v1, t).numpy(), np_slerp(t, v0.numpy(), v1.numpy()),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [2.0, -2.0, 0.5])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.75, 1.0])
def test_slerp_colinear_is_linear(factor, t):
    v0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    v1 = v0 * factor
    expected = (1 - t) * v0.double() + t * v1.double()
    out = slerp(v0, v1, t)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_slerp_nearly_colinear_is_linear():
    generator = torch.Generator().manual_seed(2)
    v0 = torch.randn(64, generator=generator)
    v1 = 2 * v0 + 1e-3 * torch.randn(64, generator=generator)
    assert cosine(v0, v1) > 0.9995
    expected = 0.6 * v0.double() + 0.4 * v1.double()
    torch.testing.assert_close(slerp(v0, v1, 0.4).double(), expected, rtol=1e-6, atol=1e-6)


def test_slerp_orthogonal_unit_vectors_midpoint():
    e0 = torch.tensor([1.0, 0.0, 0.0])
    e1 = torch.tensor([0.0, 1.0, 0.0])
    mid = slerp(e0, e1, 0.5)
    assert mid.norm().item() == pytest.approx(1.0, abs=1e-6)  # linear interpolation would give 0.707
    assert math.degrees(math.acos(cosine(mid, e0))) == pytest.approx(45.0, abs=1e-3)
    assert math.degrees(math.acos(cosine(mid, e1))) == pytest.approx(45.0, abs=1e-3)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0]))
    quarter = slerp(e0, e1, 1 / 3)  # 30° from e0
    assert math.degrees(math.acos(cosine(quarter, e0))) == pytest.approx(30.0, abs=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp_preserves_dtype_and_shape(dtype):
    generator = torch.Generator().manual_seed(3)
    v0 = torch.randn(2, 3, 4, generator=generator).to(dtype)
    v1 = torch.randn(2, 3, 4, generator=generator).to(dtype)
    out = slerp(v0, v1, 0.5)
    assert out.dtype == dtype
    assert out.shape == (2, 3, 4)
    expected = np_slerp(0.5, v0.float().numpy(), v1.float().numpy())
    np.testing.assert_allclose(out.float().numpy(), expected, rtol=2e-2, atol=2e-2)


def test_slerp_shape_mismatch():
    with pytest.raises(MismatchError, match=r"\[2, 3\]"):
        slerp(torch.ones(2, 3), torch.ones(3, 2), 0.5)
    with pytest.raises(MismatchError):
        slerp(torch.ones(6), torch.ones(2, 3), 0.5)


@pytest.mark.parametrize("t", [-0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.5", None])
def test_slerp_t_out_of_range(t):
    with pytest.raises(ParameterError, match="t must be in"):
        slerp(torch.ones(3), torch.arange(3.0), t)


# ---------------------------------------------------------------------------------------------
# fuse on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_state(tiny_base):
    return {n: p.detach().clone() for n, p in tiny_base.named_parameters()}


@pytest.fixture(scope="module")
def regions3(tiny_base, tiny_tasks):
    return core_regions(tiny_base, tiny_tasks, p=5)


@pytest.fixture(scope="module")
def regions1(tiny_base, tiny_tasks):
    return core_regions(tiny_base, {"math": tiny_tasks["math"]}, p=5)


def _masks(regions):
    return {t: regions.mask(t) for t in regions.tasks}


@pytest.mark.parametrize("overlap", ["max_delta", "last", "mean"])
@pytest.mark.parametrize("fold", ["mean", "sequential"])
def test_sole_core_elements_take_task_value(tiny_base, tiny_tasks, regions3, overlap, fold):
    fused = fuse(tiny_base, tiny_tasks, regions3, omega=0.5, overlap=overlap, fold=fold)
    masks = _masks(regions3)
    checked = 0
    for name in regions3.layout.names:
        for task in regions3.tasks:
            others = torch.zeros_like(masks[task][name])
            for other in regions3.tasks:
                if other != task:
                    others |= masks[other][name]
            sole = masks[task][name] & ~others
            assert torch.equal(fused[name][sole], tiny_tasks[task][name][sole]), (name, task)
            checked += int(sole.sum())
    assert checked > 0.9 * sum(regions3.size(t) for t in regions3.tasks) * 0.5


@pytest.mark.parametrize("omega", [0.0, 0.3, 1.0])
def test_one_task_non_core_is_slerp(tiny_base, tiny_tasks, base_state, regions1, omega):
    task = tiny_tasks["math"]
    fused = fuse(tiny_base, {"math": task}, regions1, omega=omega)
    mask = regions1.mask("math")
    moved = 0
    for name, base_tensor in base_state.items():
        core = mask[name]
        expected = slerp(base_tensor, task[name], omega)
        assert torch.equal(fused[name][~core], expected[~core]), name
        assert torch.equal(fused[name][core], task[name][core]), name
        if omega == 0:
            assert torch.equal(fused[name][~core], base_tensor[~core]), name
        if omega == 1:
            assert torch.equal(fused[name], task[name]), name
        moved += int((fused[name][~core] != base_tensor[~core]).sum())
    assert (moved > 0) == (0 < omega < 1)  # SLERP moves the whole tensor, not just the perturbed elements


@pytest.mark.parametrize(
    "fold",
    [
        "mean",
        "sequential",
    ],
)
def test_omega_zero_keeps_base_with_several_tasks(tiny_base, tiny_tasks, base_state, regions3, fold):
    assert len(regions3.tasks) == 3
    fused = fuse(tiny_base, tiny_tasks, regions3, omega=0.0, fold=fold)
    union = None
    for task in regions3.tasks:
        mask = regions3.mask(task)
        union = mask if union is None else {n: union[n] | mask[n] for n in mask}
    for name, base_tensor in base_state.items():
        outside = ~union[name]
        assert torch.equal(fused[name][outside], base_tensor[outside]), (fold, name)


def test_omega_zero_keeps_base_with_two_tasks(tiny_base, tiny_tasks, base_state):
    two = {"math": tiny_tasks["math"], "code": tiny_tasks["code"]}
    regions = core_regions(tiny_base, two, p=5)
    fused = fuse(tiny_base, two, regions, omega=0.0, fold="mean")
    masks = _masks(regions)
    for name, base_tensor in base_state.items():
        outside = ~(masks["math"][name] | masks["code"][name])
        assert torch.equal(fused[name][outside], base_tensor[outside]), name


def test_fold_one_task_same_two_tasks_differ(tiny_base, tiny_tasks, regions1):
    one = {"math": tiny_tasks["math"]}
    mean = fuse(tiny_base, one, regions1, omega=0.5, fold="mean")
    seq = fuse(tiny_base, one, regions1, omega=0.5, fold="sequential")
    assert mean.keys() == seq.keys()
    assert all(torch.equal(mean[n], seq[n]) for n in mean)

    two = {"math": tiny_tasks["math"], "code": tiny_tasks["code"]}
    regions2 = core_regions(tiny_base, two, p=5)
    mean = fuse(tiny_base, two, regions2, omega=0.5, fold="mean")
    seq = fuse(tiny_base, two, regions2, omega=0.5, fold="sequential")
    assert any(not torch.equal(mean[n], seq[n]) for n in mean)


def test_output_has_every_base_tensor_in_base_dtype(tiny_base, tiny_tasks, regions3):
    fused = fuse(tiny_base, tiny_tasks, regions3)
    base = open_checkpoint(tiny_base)
    assert list(fused) == base.names()
    for name in base.names():
        assert fused[name].dtype == base.dtype(name)
        assert tuple(fused[name].shape) == base.shape(name)


def test_tensors_outside_layout_get_slerp_only(tiny_base, tiny_tasks, base_state):
    tasks = {"math": tiny_tasks["math"]}
    embed = "model.embed_tokens.weight"
    regions = core_regions(tiny_base, tasks, p=5, exclude=["*embed_tokens*"])
    assert embed not in regions.layout.names
    fused = fuse(tiny_base, tasks, regions, omega=0.4)
    assert torch.equal(fused[embed], slerp(base_state[embed], tasks["math"][embed], 0.4))


def test_tasks_in_another_order(tiny_base, tiny_tasks, regions3):
    reordered = dict(reversed(list(tiny_tasks.items())))
    with pytest.raises(MismatchError, match="regions"):
        fuse(tiny_base, reordered, regions3)
    fewer = {t: tiny_tasks[t] for t in ("math", "code")}
    with pytest.raises(MismatchError):
        fuse(tiny_base, fewer, regions3)


def test_task_with_wrong_shape(tiny_base, tiny_tasks, regions3):
    broken = {t: dict(s) for t, s in tiny_tasks.items()}
    victim = "model.norm.weight"
    broken["code"][victim] = broken["code"][victim][:-1]
    with pytest.raises(MismatchError, match="code"):
        fuse(tiny_base, broken, regions3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"omega": -0.1}, "omega"),
        ({"omega": 1.5}, "omega"),
        ({"omega": float("nan")}, "omega"),
        ({"omega": "0.5"}, "omega"),
        ({"overlap": "first"}, "overlap"),
        ({"overlap": None}, "overlap"),
        ({"fold": "median"}, "fold"),
    ],
)
def test_bad_parameters(tiny_base, tiny_tasks, regions3, kwargs, match):
    with pytest.raises(ParameterError, match=match):
        fuse(tiny_base, tiny_tasks, regions3, **kwargs)
    with pytest.raises(ParameterError, match=match):
        fuse(tiny_base, tiny_tasks, regions3, **kwargs, keep_tensors=False).report


def test_regions_of_another_model_shape():
    base = {"w": torch.arange(12.0)}
    regions = core_regions(base, {"a": {"w": base["w"] + torch.linspace(0, 1, 12)}}, p=25)
    other = {"w": torch.arange(6.0)}
    with pytest.raises(MismatchError, match="'w'"):
        fuse(other, {"a": {"w": other["w"] + 1}}, regions)


# ---------------------------------------------------------------------------------------------
# A hand-made two-task case where every contested element is known
# ---------------------------------------------------------------------------------------------

BASE_W = torch.arange(1.0, 13.0)
DELTA_A = torch.tensor([3.0, -2.0, 0.5, 0.0, 1.0, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0])
DELTA_B = torch.tensor([-1.0, 4.0, -0.5, 2.0, 0.0, 3.0, 0.0, 0.125, 0.0, 0.0, 0.0, 0.0])
CORE_A = {0, 1, 2, 4, 6}
CORE_B = {0, 1, 2, 3, 5}
NON_CORE = [7, 8, 9, 10, 11]
# values at positions 0..6; 0 and 1: larger |Δ| differs; 2: |Δ| ties (0.5) -> earlier task under max_delta.
EXPECTED_CORE = {
    "max_delta": [4.0, 6.0, 3.5, 6.0, 6.0, 9.0, 7.25],
    "last": [0.0, 6.0, 2.5, 6.0, 6.0, 9.0, 7.25],
    "mean": [2.0, 3.0, 3.0, 6.0, 6.0, 9.0, 7.25],
}
EXPECTED_FROM = {"max_delta": (4, 3), "last": (2, 5), "mean": (2, 2)}


def hand_models(dtype):
    base = {"w": BASE_W.to(dtype), "steps": torch.tensor([7, 8])}
    a = {"w": (BASE_W + DELTA_A).to(dtype), "steps": torch.tensor([1, 1])}
    b = {"w": (BASE_W + DELTA_B).to(dtype), "steps": torch.tensor([2, 2])}
    return base, {"a": a, "b": b}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def hand_case(request):
    base, tasks = hand_models(request.param)
    regions = core_regions(base, tasks, p=42)  # k = floor(42 * 12 / 100) = 5
    assert set(torch.nonzero(regions.mask("a")["w"]).flatten().tolist()) == CORE_A
    assert set(torch.nonzero(regions.mask("b")["w"]).flatten().tolist()) == CORE_B
    return base, tasks, regions, request.param


@pytest.mark.parametrize("overlap", ["max_delta", "last", "mean"])
@pytest.mark.parametrize("fold", ["mean", "sequential"])
def test_hand_made_overlap_rules(hand_case, overlap, fold):
    base, tasks, regions, dtype = hand_case
    omega = 0.3
    fused = fuse(base, tasks, regions, omega=omega, overlap=overlap, fold=fold)
    assert list(fused) == ["w", "steps"]
    assert fused["w"].dtype == dtype
    assert torch.equal(fused["steps"], base["steps"])
    assert fused["w"][:7].tolist() == EXPECTED_CORE[overlap]
    w0, wa, wb = (m["w"].float().numpy() for m in (base, tasks["a"], tasks["b"]))
    if fold == "mean":
        expected = (np_slerp(omega, w0, wa) + np_slerp(omega, w0, wb)) / 2
    else:
        expected = np_slerp(omega, np_slerp(omega, w0, wa), wb)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(fused["w"].float().numpy()[NON_CORE], expected[NON_CORE], rtol=tol)


@pytest.mark.parametrize("overlap", ["max_delta", "last", "mean"])
def test_hand_made_report(hand_case, overlap):
    base, tasks, regions, _ = hand_case
    report = fuse(base, tasks, regions, omega=0.3, overlap=overlap, keep_tensors=False).report
    assert report["tensor"].tolist() == ["w", "steps"]
    w = report.set_index("tensor").loc["w"]
    assert (w["from:a"], w["from:b"]) == EXPECTED_FROM[overlap]
    assert w["contested"] == 3
    assert w["numel"] == 12
    steps = report.set_index("tensor").loc["steps"]
    assert steps["contested"] == 0 and steps["from:a"] == 0 and steps["from:b"] == 0


def test_hand_made_task_order_decides_last(hand_case):
    base, tasks, _, _ = hand_case
    swapped = {"b": tasks["b"], "a": tasks["a"]}
    regions = core_regions(base, swapped, p=42)
    fused = fuse(base, swapped, regions, omega=0.3, overlap="last")
    assert fused["w"][:3].tolist() == [4.0, 0.0, 3.5]  # now a is the later task
    fused = fuse(base, swapped, regions, omega=0.3, overlap="max_delta")
    assert fused["w"][:3].tolist() == [4.0, 6.0, 2.5]  # the tie goes to b, now the earlier task


# ---------------------------------------------------------------------------------------------
# the fusion report on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", ["max_delta", "last", "mean"])
def test_report_counts_match_masks(tiny_base, tiny_tasks, regions3, overlap):
    report = fuse(tiny_base, tiny_tasks, regions3, omega=0.5, overlap=overlap, keep_tensors=False).report
    names = open_checkpoint(tiny_base).names()
    assert report["tensor"].tolist() == names  # one row per tensor
    masks = _masks(regions3)
    rows = report.set_index("tensor")
    total_union = 0
    for name in names:
        count = sum(masks[t][name].long() for t in regions3.tasks)
        union, contested = int((count > 0).sum()), int((count > 1).sum())
        row = rows.loc[name]
        assert row["numel"] == masks["math"][name].numel()
        assert row["contested"] == contested, name
        from_sum = sum(int(row[f"from:{t}"]) for t in regions3.tasks)
        if overlap == "mean":
            assert from_sum == union - contested, name
            for t in regions3.tasks:
                others = sum(masks[o][name].long() for o in regions3.tasks if o != t)
                assert row[f"from:{t}"] == int((masks[t][name] & (others == 0)).sum())
        else:
            assert from_sum == union, name
        total_union += union
    assert total_union > 0
    assert int(report["contested"].sum()) > 0  # the case actually has contested elements


def test_report_angles(tiny_base, tiny_tasks, base_state):
    tasks = {
        "same": {n: t.clone() for n, t in base_state.items()},
        "math": tiny_tasks["math"],
        "neg": {n: -t for n, t in base_state.items()},
    }
    regions = core_regions(tiny_base, tasks, p=5)
    report = fuse(tiny_base, tasks, regions, keep_tensors=False).report
    for task in tasks:
        assert report[f"angle:{task}"].between(0, 180).all()
    assert np.allclose(report["angle:same"], 0, atol=0.05)
    assert np.allclose(report["angle:neg"], 180, atol=0.05)
    rows = report.set_index("tensor")
    for name, tensor in base_state.items():
        expected = math.degrees(math.acos(max(-1.0, min(1.0, cosine(tensor, tiny_tasks["math"][name])))))
        assert rows.loc[name, "angle:math"] == pytest.approx(expected, abs=0.05), name
    assert (report["angle:math"] > 0.05).any()


def test_large_tensor_slerp_and_angle_match_float64(tiny_tasks, base_state, regions1):
    # 2**24 elements (an embedding matrix's size): a float32 dot product and norms are off enough
    # there to report a cosine above 1, which took linear interpolation instead of SLERP.
    generator = torch.Generator().manual_seed(0)
    v0 = torch.randn(2**24, generator=generator) * 0.05 + 0.01
    v1 = v0 + 0.05 * v0.std() * torch.randn(2**24, generator=generator)
    cos = cosine(v0, v1)
    assert cos < 0.9995  # a true SLERP, not the colinear case
    expected = np_slerp(0.5, v0.numpy(), v1.numpy())
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(slerp(v0, v1, 0.5).numpy(), expected, rtol=1e-5, atol=1e-5 * scale)

    name = "large.weight"  # outside the regions' layout: SLERP and the angle only
    tasks = {"math": {**tiny_tasks["math"], name: v1}}
    fused = fuse({**base_state, name: v0}, tasks, regions1, omega=0.5)
    np.testing.assert_allclose(fused[name].numpy(), expected, rtol=1e-5, atol=1e-5 * scale)
    angle = fused.report.set_index("tensor").loc[name, "angle:math"]
    assert angle == pytest.approx(math.degrees(math.acos(cos)), rel=1e-5)


def test_report_angle_exactly_zero_for_identical_task(tiny_base, base_state):
    tasks = {"same": {n: t.clone() for n, t in base_state.items()}}
    regions = core_regions(tiny_base, tasks, p=5)
    report = fuse(tiny_base, tasks, regions, keep_tensors=False).report
    assert (report["angle:same"] == 0).all(), report.loc[report["angle:same"] != 0, ["tensor", "angle:same"]]


def test_report_is_the_same_with_and_without_tensors(tiny_base, tiny_tasks, regions3):
    full = fuse(tiny_base, tiny_tasks, regions3)
    light = fuse(tiny_base, tiny_tasks, regions3, keep_tensors=False)
    assert len(light) == 0 and len(full) == len(full.report)
    assert full.report.equals(light.report)


# ---------------------------------------------------------------------------------------------
# transplant_report: the report's counts from the regions alone
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", ["max_delta", "last", "mean"])
def test_transplant_report_equals_fuse_report(tiny_base, tiny_tasks, regions3, overlap):
    report = fuse(tiny_base, tiny_tasks, regions3, omega=0.3, overlap=overlap, keep_tensors=False).report
    expected = report.set_index("tensor").loc[list(regions3.layout.names)]
    columns = ["numel", "contested", *(f"from:{t}" for t in regions3.tasks)]
    preview = transplant_report(regions3, overlap).set_index("group")
    assert preview.index.tolist() == list(regions3.layout.names)
    assert (preview[columns].to_numpy() == expected[columns].to_numpy().astype(np.int64)).all()
    assert preview["contested"].sum() > 0


def test_transplant_report_by_layer_sums_tensors(regions3):
    per_tensor = transplant_report(regions3, "last")
    per_layer = transplant_report(regions3, "last", by="layer")
    labels = [layer_of(n) for n in per_tensor["group"]]
    summed = per_tensor.drop(columns="group").groupby(labels, sort=False).sum()
    assert set(per_layer["group"]) == set(labels)
    assert (per_layer.set_index("group").loc[summed.index].to_numpy() == summed.to_numpy()).all()


def test_transplant_report_needs_magnitudes_for_max_delta(tiny_base, tiny_tasks):
    compact = core_regions(tiny_base, tiny_tasks, p=5, keep_magnitudes=False)
    with pytest.raises(ParameterError, match="magnitudes"):
        transplant_report(compact, "max_delta")
    assert transplant_report(compact, "mean")["contested"].sum() > 0
    with pytest.raises(ParameterError, match="overlap"):
        transplant_report(compact, "first")


def test_transplant_report_from_compact_saved_regions(regions3, tmp_path):
    regions3.save(tmp_path / "regions", magnitudes=regions3.p, compress=True)
    compact = CoreRegions.load(tmp_path / "regions")
    assert compact.max_p == regions3.p
    for overlap in ("max_delta", "last"):
        assert transplant_report(compact, overlap).equals(transplant_report(regions3, overlap)), overlap


# ---------------------------------------------------------------------------------------------
# The streaming fusion gives the same bits as the implementation it replaced
# ---------------------------------------------------------------------------------------------


def previous_fuse(base, tuned, regions, omega=0.5, overlap="max_delta", fold="mean"):
    """The fusion loop as it was before it streamed (whole-tensor boolean masks, a zeroed sum, a cloned result).

    Kept verbatim (minus progress bar and checks) as the reference that the current code must match bit for bit.
    """
    from cpift.fusion import _cosine, _slerp_flat

    def resolve(owns, delta):
        count = owns.sum(0)
        contested = count > 1
        if overlap == "mean":
            return None, owns & ~contested, contested
        if overlap == "last":
            score = torch.arange(owns.shape[0], dtype=torch.float32).unsqueeze(1).expand(owns.shape)
        else:
            score = delta
        winner = torch.where(owns, score, -1.0).argmax(0)
        credit = torch.zeros_like(owns)
        credit[winner, torch.arange(owns.shape[1])] = True
        return winner, credit, contested

    def transplant(fused, b, values, masks):
        in_any = masks[0].clone()
        for mask in masks[1:]:
            in_any |= mask
        where = torch.nonzero(in_any).squeeze(1)
        owns = torch.stack([mask[where] for mask in masks])
        vals = torch.stack([value[where] for value in values])
        delta = (vals - b[where]).abs() if overlap == "max_delta" else None
        winner, credit, contested = resolve(owns, delta)
        if winner is None:
            chosen = torch.where(owns, vals, 0.0).sum(0) / owns.sum(0)
        else:
            chosen = vals.gather(0, winner.unsqueeze(0)).squeeze(0)
        result = fused.clone()
        result[where] = chosen
        return result, credit.sum(1).tolist(), int(contested.sum())

    base_ckpt = open_checkpoint(base, label="base")
    task_ckpts = {t: open_checkpoint(m, label=t) for t, m in tuned.items()}
    tasks, in_layout = regions.tasks, set(regions.layout.names)
    state, rows = {}, []
    for name in base_ckpt.names():
        base_tensor = base_ckpt.get(name)
        row = {"tensor": name, "numel": base_tensor.numel(), "contested": 0}
        if not base_tensor.dtype.is_floating_point:
            state[name] = base_tensor
            rows.append(row)
            continue
        b = base_tensor.float().reshape(-1)
        values = [task_ckpts[t].get(name).float().reshape(-1) for t in tasks]
        cosines = [_cosine(b, v) for v in values]
        for task, cos in zip(tasks, cosines):
            row[f"angle:{task}"] = math.degrees(math.acos(cos))
        if omega == 0:
            fused = b
        elif fold == "mean":
            fused = torch.zeros_like(b)
            for v, cos in zip(values, cosines):
                fused += _slerp_flat(b, v, omega, cos)
            fused /= len(values)
        else:
            fused = b
            for v in values:
                fused = _slerp_flat(fused, v, omega, _cosine(fused, v))
        if name in in_layout:
            masks = [regions.tensor_mask(t, name).reshape(-1) for t in tasks]
            fused, owned, row["contested"] = transplant(fused, b, values, masks)
            row.update({f"from:{task}": n for task, n in zip(tasks, owned)})
        state[name] = fused.reshape(base_tensor.shape).to(base_tensor.dtype)
        rows.append(row)
    return state, pd.DataFrame(rows).fillna(0)


def assert_same_bits(actual, expected):
    """Equal tensors bit for bit (so -0.0 differs from 0.0, and NaN payloads count), same names and order."""
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.contiguous().reshape(-1).view(torch.uint8),
                           want.contiguous().reshape(-1).view(torch.uint8)), name


def signed_zero_case():
    """Two tasks far from the base (the SLERP branch, not linear) where base and tasks hold -0.0 together.

    There SLERP gives -0.0 and the fused value must be +0.0, as the sum from zeros made it.
    """
    generator = torch.Generator().manual_seed(11)
    base = {"w": torch.randn(6, 64, generator=generator), "v": torch.randn(130, generator=generator).to(torch.float16),
            "ids": torch.arange(5)}
    tasks = {}
    for task in ("a", "b"):
        state = {n: (t + torch.randn(t.shape, generator=generator).to(t.dtype) if t.is_floating_point() else t + 1)
                 for n, t in base.items()}
        tasks[task] = state
    for state in (base, *tasks.values()):
        state["w"][0, :8] = -0.0
    return base, tasks


@pytest.mark.parametrize("omega", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("fold", ["mean", "sequential"])
@pytest.mark.parametrize("overlap", ["max_delta", "last", "mean"])
def test_fuse_same_bits_as_previous_implementation(tiny_base, tiny_tasks, regions3, omega, fold, overlap):
    fused = fuse(tiny_base, tiny_tasks, regions3, omega, overlap, fold=fold)
    expected, report = previous_fuse(tiny_base, tiny_tasks, regions3, omega, overlap, fold)
    assert_same_bits(fused, expected)
    pd.testing.assert_frame_equal(fused.report, report)


@pytest.mark.parametrize("omega", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("fold", ["mean", "sequential"])
def test_fuse_same_bits_as_previous_one_task_excluded_tensors(tiny_base, tiny_tasks, omega, fold):
    tasks = {"math": tiny_tasks["math"]}
    regions = core_regions(tiny_base, tasks, p=5, exclude=["*embed_tokens*", "*norm*"])
    fused = fuse(tiny_base, tasks, regions, omega, fold=fold)
    expected, report = previous_fuse(tiny_base, tasks, regions, omega, fold=fold)
    assert_same_bits(fused, expected)
    pd.testing.assert_frame_equal(fused.report, report)


@pytest.mark.parametrize("fold", ["mean", "sequential"])
@pytest.mark.parametrize("overlap", ["max_delta", "last", "mean"])
def test_fuse_same_bits_as_previous_signed_zeros_and_dtypes(fold, overlap):
    base, tasks = signed_zero_case()
    regions = core_regions(base, tasks, p=20)
    fused = fuse(base, tasks, regions, 0.5, overlap, fold=fold)
    expected, report = previous_fuse(base, tasks, regions, 0.5, overlap, fold)
    if fold == "mean":  # the case does what it is for: SLERP gave -0.0 where the fusion keeps +0.0
        from cpift.fusion import _cosine, _slerp_flat

        b, v = base["w"].reshape(-1), tasks["a"]["w"].reshape(-1)
        assert torch.signbit(_slerp_flat(b, v, 0.5, _cosine(b, v))[:8]).all()
        assert not torch.signbit(expected["w"][0, :8]).any()
    assert_same_bits(fused, expected)
    pd.testing.assert_frame_equal(fused.report, report)


def test_fuse_from_files_releases_readers_same_bits(tiny_base, tiny_tasks, regions3, tmp_path, monkeypatch):
    """From safetensors files, with the readers closed after every tensor: the same bits, every reader closed."""
    import cpift.fusion as fusion
    from cpift.checkpoint import SafetensorsCheckpoint
    from cpift.models import save_weights

    base_dir = save_weights(tiny_base, tmp_path / "base")
    task_dirs = {t: save_weights(s, tmp_path / t) for t, s in tiny_tasks.items()}
    closes = []
    real_close = SafetensorsCheckpoint.close
    monkeypatch.setattr(SafetensorsCheckpoint, "close", lambda self: (closes.append(self.label), real_close(self)))
    monkeypatch.setattr(fusion, "_RELEASE_BYTES", 0)
    fused = fuse(base_dir, task_dirs, regions3, 0.5, "max_delta")
    n_tensors = len(fused)
    assert closes.count("base") >= n_tensors and all(closes.count(f"task {t!r}") >= n_tensors for t in tiny_tasks)
    expected, report = previous_fuse(base_dir, task_dirs, regions3, 0.5, "max_delta")
    assert_same_bits(fused, expected)  # in the files' order
    pd.testing.assert_frame_equal(fused.report, report)
    in_memory = fuse(tiny_base, tiny_tasks, regions3, 0.5, "max_delta")
    assert_same_bits({n: fused[n] for n in in_memory}, in_memory)


@pytest.mark.parametrize("case", ["tiny", "signed_zeros", "hand_bf16"])
def test_fuse_out_writes_the_file_save_weights_writes(case, tiny_base, tiny_tasks, regions3, tmp_path):
    from cpift.models import save_weights

    if case == "tiny":
        base, tasks, regions = tiny_base, tiny_tasks, regions3
    elif case == "signed_zeros":
        base, tasks = signed_zero_case()
        regions = core_regions(base, tasks, p=20)
    else:  # a bf16 tensor and an int64 one: safetensors orders its data by dtype, then name
        base, tasks = hand_models(torch.bfloat16)
        regions = core_regions(base, tasks, p=42)
    in_memory = fuse(base, tasks, regions, 0.5)
    save_weights(in_memory, tmp_path / "saved")
    (tmp_path / "streamed").mkdir()
    (tmp_path / "streamed" / "stale.txt").write_text("replaced, as save_weights replaces")
    streamed = fuse(base, tasks, regions, 0.5, out=tmp_path / "streamed")
    assert len(streamed) == 0  # not kept by default when written
    pd.testing.assert_frame_equal(streamed.report, in_memory.report)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["model.safetensors"]
    streamed_file, saved_file = (tmp_path / d / "model.safetensors" for d in ("streamed", "saved"))
    assert streamed_file.read_bytes() == saved_file.read_bytes()
    both = fuse(base, tasks, regions, 0.5, out=tmp_path / "both", keep_tensors=True)
    assert_same_bits(both, in_memory)
    neither = fuse(base, tasks, regions, 0.5, keep_tensors=False)
    assert len(neither) == 0
    pd.testing.assert_frame_equal(neither.report, in_memory.report)


def test_fuse_out_failure_publishes_nothing(tiny_base, tiny_tasks, regions3, tmp_path):
    broken = {t: dict(s) for t, s in tiny_tasks.items()}
    broken["code"]["model.norm.weight"] = broken["code"]["model.norm.weight"][:-1]
    with pytest.raises(MismatchError):
        fuse(tiny_base, broken, regions3, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
