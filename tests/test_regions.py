"""Core regions: exact k, masks and thresholds, overlap, with_p, persistence and bad input."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import cpift
from cpift.errors import CheckpointError, FormatError, MismatchError, ParameterError
from cpift.overlap import layer_of, module_of
from cpift.regions import CoreRegions, core_regions

NAMES = ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
         "model.layers.1.input_layernorm.weight", "model.norm.weight")


def reference_core(base: dict, task: dict, p: float) -> set[tuple[str, int]]:
    """The top p% of |Δ| as a set of (tensor, flat index), ties to the earlier position."""
    entries = [(name, i, float(v)) for name in base for i, v in enumerate((task[name] - base[name]).abs().reshape(-1))]
    k = int(len(entries) * p * 1e9) // (100 * 10**9)
    ranked = sorted(range(len(entries)), key=lambda j: (-entries[j][2], j))
    return {entries[j][:2] for j in ranked[:k]}


def mask_set(regions: CoreRegions, task: str) -> set[tuple[str, int]]:
    return {(name, int(i)) for name, m in regions.mask(task).items() for i in torch.nonzero(m.reshape(-1)).reshape(-1)}


@st.composite
def models(draw: st.DrawFn) -> tuple[dict, dict]:
    shapes = {name: tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=2))) for name in NAMES}
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    # Rounded deltas make ties common, which is where exactness is hardest.
    tasks = {t: {n: base[n] + torch.round(torch.randn(s, generator=generator) * 2) / 4 for n, s in shapes.items()}
             for t in ("a", "b", "c")}
    return base, tasks


@settings(max_examples=40, deadline=None)
@given(models(), st.sampled_from([0.5, 5, 20, 50, 100]))
def test_regions_match_set_reference(data: tuple[dict, dict], p: float) -> None:
    base, tasks = data
    regions = core_regions(base, tasks, p)
    cores = {t: reference_core(base, tasks[t], p) for t in tasks}
    for task in tasks:
        assert mask_set(regions, task) == cores[task]
        assert regions.size(task) == len(cores[task])
        if cores[task]:
            deltas = {name: (tasks[task][name] - base[name]).abs() for name in base}
            inside = [float(deltas[n].reshape(-1)[i]) for n, i in cores[task]]
            assert min(inside) == pytest.approx(regions.threshold(task), rel=0, abs=0)
            outside_max = max((float(d.reshape(-1)[i]) for n, d in deltas.items() for i in range(d.numel())
                               if (n, i) not in cores[task]), default=-1.0)
            assert outside_max <= regions.threshold(task)
    matrix = regions.jaccard()
    for a, b in combinations(tasks, 2):
        union = cores[a] | cores[b]
        expected = len(cores[a] & cores[b]) / len(union) if union else 0.0
        assert matrix.loc[a, b] == pytest.approx(expected)
    by_layer = regions.layer_jaccard("layer")
    for row in by_layer.itertuples():
        in_group = lambda core: {e for e in core if layer_of(e[0]) == row.group}  # noqa: E731
        ca, cb = in_group(cores[row.task_a]), in_group(cores[row.task_b])
        assert row.intersection == len(ca & cb) and row.union == len(ca | cb)


def test_exact_k_on_tiny_model(tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=1)
    total = sum(p.numel() for p in tiny_base.parameters())
    assert regions.tasks == ["math", "code", "logic"]
    assert regions.layout.numel == total  # tied embeddings once
    for task in regions.tasks:
        assert regions.size(task) == total // 100
        masks = regions.mask(task)
        assert list(masks) == [n for n, _ in tiny_base.named_parameters()]
        assert all(masks[n].shape == p.shape and masks[n].dtype == torch.bool for n, p in tiny_base.named_parameters())


def test_tensor_scope_takes_p_of_each_tensor(tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=10, scope="tensor")
    sizes = regions.tensor_sizes("code")
    for name, param in tiny_base.named_parameters():
        assert sizes[name] == param.numel() // 10
        delta = (tiny_tasks["code"][name] - param.detach()).abs()
        mask = regions.tensor_mask("code", name)
        if mask.any():
            assert delta[mask].min().item() == regions.threshold("code", tensor=name)
    with pytest.raises(ParameterError, match="tensor=NAME"):
        regions.threshold("code")


def test_with_p_equals_recomputing(tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=1)
    for p in (0.3, 7, 100):
        fresh = core_regions(tiny_base, tiny_tasks, p=p)
        moved = regions.with_p(p)
        assert moved.p == p
        for task in regions.tasks:
            assert np.array_equal(moved.packed(task), fresh.packed(task))
            assert moved.threshold(task) == fresh.threshold(task)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_without_kept_magnitudes_same_masks(tiny_base, tiny_tasks, scope: str) -> None:
    kept = core_regions(tiny_base, tiny_tasks, p=3, scope=scope)
    lean = core_regions(tiny_base, tiny_tasks, p=3, scope=scope, keep_magnitudes=False)
    assert not lean.has_magnitudes
    for task in kept.tasks:
        assert np.array_equal(lean.packed(task), kept.packed(task))
        tensors = kept.layout.names if scope == "tensor" else [None]
        assert [lean.threshold(task, t) for t in tensors] == [kept.threshold(task, t) for t in tensors]
    with pytest.raises(ParameterError, match="with_p needs"):
        lean.with_p(1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2), st.integers(0, 2**32 - 1), st.booleans())
def test_streamed_top_k_equals_top_k(n_words: int, kind: int, seed: int, three_passes: bool) -> None:
    from cpift.selection import top_k, top_k_streamed

    rng = np.random.default_rng(seed)
    n = 64 * n_words
    scores = rng.exponential(size=n).astype(np.float32)
    if kind == 1:
        scores = np.round(scores * 4) / 4  # many ties at the threshold
    elif kind == 2:
        scores[rng.random(n) < 0.9] = 0  # the k-th largest often an exact zero
    scores[rng.random(n) < 0.05] = -np.inf  # padding
    k = int(rng.integers(0, int((scores >= 0).sum()) + 1))
    cuts = [0, *sorted(rng.choice(np.arange(64, n, 64), size=min(4, n_words - 1), replace=False)), n]

    def chunks():
        return ((a, scores[a:b]) for a, b in zip(cuts, cuts[1:]))

    expected = top_k(scores, k)
    got = top_k_streamed(chunks, n, k, candidate_limit=0 if three_passes else 1 << 24)
    assert np.array_equal(got.words, expected.words)
    assert k == 0 or got.threshold == expected.threshold


def test_streamed_top_k_refuses_chunks_out_of_order() -> None:
    from cpift.selection import top_k_streamed

    scores = np.ones(128, dtype=np.float32)
    with pytest.raises(ParameterError, match="flat order"):
        top_k_streamed(lambda: iter([(64, scores[64:]), (0, scores[:64])]), 128, 3)


def test_include_exclude(tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=5, exclude=["*embed_tokens*"])
    assert "model.embed_tokens.weight" not in regions.layout.names
    only_mlp = core_regions(tiny_base, tiny_tasks, p=5, include=["*.mlp.*"])
    assert all(".mlp." in n for n in only_mlp.layout.names)
    with pytest.raises(ParameterError, match="leave no tensor"):
        core_regions(tiny_base, tiny_tasks, p=5, include=["nothing*"])


def test_layer_and_module_grouping() -> None:
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == "12"
    assert layer_of("model.embed_tokens.weight") == "embed"
    assert layer_of("lm_head.weight") == "head"
    assert layer_of("model.norm.weight") == "other"
    assert module_of("model.layers.3.mlp.down_proj.weight") == "mlp.down_proj"
    assert module_of("model.layers.3.self_attn.q_proj.bias") == "self_attn.q_proj"
    assert module_of("model.embed_tokens.weight") == "embed_tokens"


def test_layer_jaccard_shapes(tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=5)
    table = regions.layer_jaccard("layer")
    assert list(table.columns[:4]) == ["group", "task_a", "task_b", "jaccard"]
    assert list(dict.fromkeys(table["group"])) == ["embed", "0", "1", "other"]
    assert len(table) == 4 * 3
    assert table["jaccard"].between(0, 1).all()
    modules = regions.layer_jaccard("module")
    assert "mlp.down_proj" in set(modules["group"])
    tensors = regions.layer_jaccard("tensor")
    assert set(tensors["group"]) == set(regions.layout.names)
    with pytest.raises(ParameterError, match="by must be one of"):
        regions.layer_jaccard("row")
    single = core_regions(tiny_base, {"math": tiny_tasks["math"]}, p=5)
    with pytest.raises(ParameterError, match="at least two tasks"):
        single.layer_jaccard()


def test_sizes_per_layer(tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=5)
    sizes = regions.sizes("layer")
    for task in regions.tasks:
        assert sizes[sizes.task == task]["size"].sum() == regions.size(task)
    assert sizes[sizes.task == "math"]["numel"].sum() == regions.layout.numel


# -- persistence ---------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=2, exclude=["*norm*"])
    loaded = CoreRegions.load(regions.save(tmp_path / "regions"))
    assert loaded.tasks == regions.tasks and loaded.p == 2 and loaded.exclude == ["*norm*"]
    for task in regions.tasks:
        assert np.array_equal(loaded.packed(task), regions.packed(task))
        assert loaded.threshold(task) == regions.threshold(task)
    assert loaded.jaccard().equals(regions.jaccard())
    assert not loaded.has_magnitudes
    with pytest.raises(ParameterError, match="magnitudes"):
        loaded.with_p(3)
    with_magnitudes = CoreRegions.load(regions.save(tmp_path / "full", magnitudes=True))
    assert np.array_equal(with_magnitudes.with_p(3).packed("code"), regions.with_p(3).packed("code"))
    assert [p.name for p in tmp_path.iterdir()] != [] and not any(p.name.startswith(".") for p in tmp_path.iterdir())


@settings(max_examples=10, deadline=None)
@given(models(), st.sampled_from([1, 10, 60]), st.sampled_from(["global", "tensor"]))
def test_save_load_property(tmp_path_factory, data: tuple[dict, dict], p: float, scope: str) -> None:
    base, tasks = data
    regions = core_regions(base, tasks, p, scope=scope)
    loaded = CoreRegions.load(regions.save(tmp_path_factory.mktemp("r") / "regions"))
    for task in tasks:
        assert {n: m.tolist() for n, m in loaded.mask(task).items()} == {n: m.tolist() for n, m in regions.mask(task).items()}


@settings(max_examples=10, deadline=None)
@given(models(), st.sampled_from([1, 10, 60]), st.sampled_from(["global", "tensor"]), st.sampled_from([0.5, 1.0]))
def test_compact_save_answers_every_p_up_to_q(tmp_path_factory, data: tuple[dict, dict], q: float, scope: str,
                                              fraction: float) -> None:
    """Top-q float16 magnitudes give the float32 masks at every p ≤ q, ties included."""
    base, tasks = data
    # A base on the float16 grid makes every |Δ| an exact quarter multiple: float16 keeps their
    # order and their ties, so the masks must match exactly.
    base = {n: b.half().float() for n, b in base.items()}
    tasks = {t: {n: base[n] + torch.round(m - base[n]) / 4 for n, m in model.items()} for t, model in tasks.items()}
    regions = core_regions(base, tasks, q, scope=scope)
    directory = regions.save(tmp_path_factory.mktemp("r") / "regions", magnitudes=q, compress=True)
    assert sorted(f.name for f in directory.iterdir()) == ["manifest.json", "masks.npz", "top_magnitudes.npz"]
    loaded = CoreRegions.load(directory)
    assert loaded.max_p == q
    p = q * fraction
    for task in tasks:
        assert np.array_equal(loaded.packed(task), regions.packed(task))
        assert np.array_equal(loaded.with_p(p).packed(task), regions.with_p(p).packed(task))
    with pytest.raises(ParameterError, match=f"p must be ≤ {q:g}"):
        loaded.with_p(q * 1.5)
    with pytest.raises(ParameterError, match="every"):
        loaded.magnitudes(next(iter(tasks)))


def test_compact_save_is_small_and_keeps_the_histogram(tmp_path, tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=1)
    full = regions.save(tmp_path / "full", magnitudes=True)
    compact = regions.save(tmp_path / "compact", magnitudes=1, compress=True)
    size = lambda d: sum(f.stat().st_size for f in d.iterdir())  # noqa: E731
    assert size(compact) * 5 < size(full)
    loaded = CoreRegions.load(compact)
    for task in regions.tasks:
        edges, counts = loaded.histogram(task)
        assert np.array_equal(edges, regions.histogram(task)[0]) and np.array_equal(counts, regions.histogram(task)[1])
        flat = regions.magnitudes(task)
        real = flat[np.isfinite(flat)]
        assert counts.sum() == regions.layout.numel == real.size
        assert counts[0] == np.count_nonzero(real < edges[1])
        assert np.array_equal(counts, np.histogram(real, bins=np.append(edges[:-1], np.inf))[0])
    smaller = CoreRegions.load(regions.with_p(0.5).save(tmp_path / "smaller", magnitudes=1, compress=True))
    assert smaller.p == 0.5 and smaller.max_p == 1  # the kept positions are not the masks: stored apart
    assert all((smaller.with_p(1).packed(t) == regions.packed(t)).all() for t in regions.tasks)
    with pytest.raises(ParameterError, match="q must be"):
        loaded.save(tmp_path / "more", magnitudes=2)
    with pytest.raises(ParameterError, match="top 1 %"):
        loaded.save(tmp_path / "all", magnitudes=True)


def test_saving_over_existing_keeps_old(tmp_path, tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=2)
    target = regions.save(tmp_path / "regions")
    before = (target / "manifest.json").read_text()
    with pytest.raises(FileExistsError):
        regions.with_p(5).save(target)
    assert (target / "manifest.json").read_text() == before
    regions.with_p(5).save(target, overwrite=True)
    assert CoreRegions.load(target).p == 5


def test_damaged_directories_give_format_errors(tmp_path, tiny_base, tiny_tasks) -> None:
    regions = core_regions(tiny_base, tiny_tasks, p=2)
    with pytest.raises(FormatError, match="manifest.json is missing"):
        CoreRegions.load(tmp_path)
    truncated = regions.save(tmp_path / "truncated")
    data = (truncated / "masks.safetensors").read_bytes()
    (truncated / "masks.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="masks.safetensors: not a readable packed-mask file"):
        CoreRegions.load(truncated)
    future = regions.save(tmp_path / "future")
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="format version 99"):
        CoreRegions.load(future)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text("{not json")
    with pytest.raises(FormatError, match="unreadable manifest"):
        CoreRegions.load(foreign)


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0, -1, 101, float("nan")])
def test_p_out_of_range(tiny_base, tiny_tasks, p: float) -> None:
    with pytest.raises(ParameterError, match=r"p must be a percentage in \(0, 100\]"):
        core_regions(tiny_base, tiny_tasks, p=p)


def test_nan_names_task_and_tensor(tiny_base, tiny_tasks) -> None:
    broken = dict(tiny_tasks["code"])
    broken["model.layers.1.mlp.up_proj.weight"] = broken["model.layers.1.mlp.up_proj.weight"].clone()
    broken["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"task 'code': tensor 'model.layers.1.mlp.up_proj.weight'"):
        core_regions(tiny_base, {"math": tiny_tasks["math"], "code": broken}, p=1)
    base = {n: p.detach().clone() for n, p in tiny_base.named_parameters()}
    base["model.norm.weight"][3] = float("inf")
    with pytest.raises(CheckpointError, match=r"base: tensor 'model.norm.weight' holds NaN or Inf"):
        core_regions(base, tiny_tasks, p=1)


def test_mismatched_models(tiny_base, tiny_tasks) -> None:
    missing = {n: t for n, t in tiny_tasks["math"].items() if n != "model.norm.weight"}
    with pytest.raises(MismatchError, match=r"task 'math': tensor 'model.norm.weight'"):
        core_regions(tiny_base, {"math": missing}, p=1)
    reshaped = dict(tiny_tasks["math"])
    reshaped["model.norm.weight"] = torch.zeros(7)
    with pytest.raises(MismatchError, match=r"task 'math': tensor 'model.norm.weight' has shape \[7\]"):
        core_regions(tiny_base, {"math": reshaped}, p=1)
    with pytest.raises(ParameterError, match="at least one task"):
        core_regions(tiny_base, {}, p=1)
    with pytest.raises(ParameterError, match="scope must be one of"):
        core_regions(tiny_base, tiny_tasks, p=1, scope="layer")


def test_disk_and_memory_forms_agree(tmp_path, tiny_base, tiny_tasks) -> None:
    """A safetensors file of the tuned model gives the same regions as the in-memory mapping."""
    save_file({n: t.contiguous() for n, t in tiny_tasks["logic"].items()}, tmp_path / "logic.safetensors")
    from_disk = core_regions(tiny_base, {"logic": tmp_path / "logic.safetensors"}, p=3)
    in_memory = core_regions(tiny_base, {"logic": tiny_tasks["logic"]}, p=3)
    assert np.array_equal(from_disk.packed("logic"), in_memory.packed("logic"))
    assert cpift.core_regions is core_regions


def test_magnitudes_fit_compares_the_vectors_with_the_memory_available(tiny_base) -> None:
    from cpift.regions import magnitudes_fit

    assert magnitudes_fit(tiny_base, 4)
    assert not magnitudes_fit(tiny_base, 4, share=1e-12)  # a model this machine could not hold |Δ| for
