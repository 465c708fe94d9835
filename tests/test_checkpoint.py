"""Tests of cpift.checkpoint: every accepted model form, tied weights, pickle opt-in, bad input."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import cpift.checkpoint as ckpt_mod
from cpift.checkpoint import Checkpoint, aligned_names, open_checkpoint
from cpift.errors import CheckpointError, MismatchError
from cpift.models import save_model, tiny_tokenizer

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def reference(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base's distinct parameters (tied ones once), as independent contiguous copies."""
    return {n: p.detach().clone().contiguous() for n, p in base.named_parameters()}


def write_shards(state: dict[str, torch.Tensor], directory: Path) -> list[Path]:
    """Two safetensors shards plus a ``model.safetensors.index.json`` weight map."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    half = len(names) // 2
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for file, part in zip(files, (names[:half], names[half:])):
        save_file({n: state[n] for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return [directory / f for f in files]


def safetensors_bytes(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


# ---------------------------------------------------------------------------------------------
# Every accepted form reads the same tensors
# ---------------------------------------------------------------------------------------------


def _as_module(base, tmp_path):
    return base


def _as_mapping(base, tmp_path):
    return dict(base.named_parameters())


def _as_hf_dir(base, tmp_path):
    return save_model(base, tiny_tokenizer(), tmp_path / "hf")


def _as_file(base, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(reference(base), str(path))
    return path


def _as_file_str(base, tmp_path):
    return str(_as_file(base, tmp_path))


def _as_sharded(base, tmp_path):
    write_shards(reference(base), tmp_path / "sharded")
    return tmp_path / "sharded"


FORMS = {
    "module": _as_module,
    "mapping": _as_mapping,
    "hf_dir": _as_hf_dir,
    "file": _as_file,
    "file_str": _as_file_str,
    "sharded": _as_sharded,
}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_gives_same_tensors(form, tiny_base, tmp_path):
    ref = reference(tiny_base)
    ckpt = open_checkpoint(FORMS[form](tiny_base, tmp_path))
    assert isinstance(ckpt, Checkpoint)
    names = ckpt.names()
    assert len(names) == len(set(names)) == len(ckpt)
    assert sorted(names) == sorted(ref)
    assert HEAD not in ckpt
    for name in names:
        assert ckpt.shape(name) == tuple(ref[name].shape), name
        assert ckpt.dtype(name) == ref[name].dtype, name
        assert ckpt.numel(name) == ref[name].numel(), name
        value = ckpt.get(name)
        assert value.device.type == "cpu"
        assert value.dtype == ref[name].dtype
        assert torch.equal(value, ref[name]), name
    assert ckpt.floating_names() == names  # all float32 here
    ckpt.close()


def test_open_checkpoint_returns_open_checkpoint_as_is(tiny_base):
    ckpt = open_checkpoint(tiny_base)
    assert open_checkpoint(ckpt) is ckpt


def test_dtypes_listed_from_headers(tmp_path):
    state = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.arange(4, dtype=torch.float16),
        "c": torch.arange(5, dtype=torch.bfloat16),
        "d": torch.arange(3, dtype=torch.int64),
    }
    save_file(state, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    for name, tensor in state.items():
        assert ckpt.dtype(name) == tensor.dtype
        assert ckpt.shape(name) == tuple(tensor.shape)
        assert torch.equal(ckpt.get(name), tensor)
    assert sorted(ckpt.floating_names()) == ["a", "b", "c"]


def test_sharded_reading_is_lazy_one_shard_at_a_time(tiny_base, tmp_path, monkeypatch):
    ref = reference(tiny_base)
    shards = write_shards(ref, tmp_path / "sharded")
    opened: list[str] = []
    real_safe_open = ckpt_mod.safe_open

    def counting_safe_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "safe_open", counting_safe_open)
    ckpt = open_checkpoint(tmp_path / "sharded")
    # Listing names, shapes and dtypes reads headers only.
    for name in ckpt.names():
        ckpt.shape(name), ckpt.dtype(name)
    assert opened == []
    assert ckpt._open_path is None

    names = list(ref)
    half = len(names) // 2
    first, second = names[:half], names[half:]
    assert torch.equal(ckpt.get(first[0]), ref[first[0]])
    assert ckpt._open_path == shards[0]
    assert torch.equal(ckpt.get(first[1]), ref[first[1]])
    assert ckpt._open_path == shards[0]
    assert opened == [shards[0].name]  # same shard: not reopened
    assert torch.equal(ckpt.get(second[0]), ref[second[0]])
    assert ckpt._open_path == shards[1]
    assert torch.equal(ckpt.get(first[-1]), ref[first[-1]])
    assert ckpt._open_path == shards[0]
    assert opened == [shards[0].name, shards[1].name, shards[0].name]
    ckpt.close()
    assert ckpt._open_path is None
    assert torch.equal(ckpt.get(second[-1]), ref[second[-1]])  # reopens after close
    assert ckpt._open_path == shards[1]


# ---------------------------------------------------------------------------------------------
# Tied weights
# ---------------------------------------------------------------------------------------------


def test_tied_module_lists_embedding_once(tiny_base):
    assert tiny_base.config.tie_word_embeddings
    assert tiny_base.lm_head.weight is tiny_base.model.embed_tokens.weight
    names = open_checkpoint(tiny_base).names()
    assert EMBED in names
    assert HEAD not in names
    assert len(names) == len(list(tiny_base.parameters()))


def test_tied_mapping_same_tensor_deduplicated():
    embed = torch.randn(8, 4)
    other = torch.randn(3)
    ckpt = open_checkpoint({EMBED: embed, "x": other, HEAD: embed})
    assert ckpt.names() == [EMBED, "x"]
    # A copy is a different set of parameters: both listed.
    ckpt = open_checkpoint({EMBED: embed, "x": other, HEAD: embed.clone()})
    assert ckpt.names() == [EMBED, "x", HEAD]


def test_mapping_keeps_distinct_slices_of_one_storage():
    flat = torch.randn(12)
    ckpt = open_checkpoint({"a": flat[:6], "b": flat[6:], "c": flat[:6].view(2, 3)})
    assert ckpt.names() == ["a", "b", "c"]
    assert torch.equal(ckpt.get("b"), flat[6:])


def test_mapping_keeps_transposed_view_with_same_storage():
    w = torch.randn(3, 3)
    ckpt = open_checkpoint({"a": w, "b": w.t()})
    assert ckpt.names() == ["a", "b"]


@pytest.mark.parametrize("tied", [True, False])
def test_tied_safetensors_dir_lists_head_once(tmp_path, tied):
    embed = torch.randn(8, 4)
    state = {EMBED: embed, "model.norm.weight": torch.ones(4), HEAD: embed.clone()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": tied}))
    ckpt = open_checkpoint(tmp_path)
    if tied:
        assert sorted(ckpt.names()) == sorted([EMBED, "model.norm.weight"])
        assert HEAD not in ckpt
    else:
        assert sorted(ckpt.names()) == sorted(state)
        assert torch.equal(ckpt.get(HEAD), embed)
    assert torch.equal(ckpt.get(EMBED), embed)


# ---------------------------------------------------------------------------------------------
# Pickle checkpoints need an opt-in
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "as_dir"),
    [("weights.bin", False), ("weights.pt", False), ("weights.pth", False), ("pytorch_model.bin", True)],
)
def test_pickle_refused_without_opt_in(tiny_base, tmp_path, filename, as_dir):
    ref = reference(tiny_base)
    torch.save(ref, tmp_path / filename)
    target = tmp_path if as_dir else tmp_path / filename
    with pytest.raises(CheckpointError, match="allow_pickle") as info:
        open_checkpoint(target)
    assert filename in str(info.value)
    ckpt = open_checkpoint(target, allow_pickle=True)
    assert sorted(ckpt.names()) == sorted(ref)
    for name, tensor in ref.items():
        assert ckpt.shape(name) == tuple(tensor.shape)
        assert ckpt.dtype(name) == tensor.dtype
        assert torch.equal(ckpt.get(name), tensor)


def test_pickle_with_non_tensor_content_refused(tmp_path):
    torch.save({"a": torch.ones(2), "b": 3}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="odd.pt"):
        open_checkpoint(tmp_path / "odd.pt", allow_pickle=True)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere"):
        open_checkpoint(missing)


def test_empty_directory(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty_dir"):
        open_checkpoint(empty)


def test_directory_without_weights(tmp_path):
    d = tmp_path / "no_weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    (d / "README.md").write_text("nothing here")
    with pytest.raises(CheckpointError, match="no_weights") as info:
        open_checkpoint(d)
    assert "no model weights" in str(info.value)


def test_file_with_unknown_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"whatever")
    with pytest.raises(CheckpointError, match="weights.npz"):
        open_checkpoint(path)


def test_safetensors_without_tensors(tmp_path):
    path = tmp_path / "hollow.safetensors"
    path.write_bytes(safetensors_bytes({"__metadata__": {"format": "pt"}}))
    with pytest.raises(CheckpointError, match="no tensors"):
        open_checkpoint(path)


@pytest.mark.parametrize("cut", [1, 100, "header"])
def test_truncated_safetensors(tmp_path, cut):
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(64), "b": torch.randn(8, 8)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[: 8 + n // 2] if cut == "header" else data[:-cut])
    with pytest.raises(CheckpointError, match="cut.safetensors") as info:
        open_checkpoint(path)  # found from the header alone, before any tensor is read
    assert "truncated" in str(info.value) or "does not fit" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"abc",
        bytes(range(256)) * 4,
        (16).to_bytes(8, "little") + b"this is not json",
        safetensors_bytes({"a": "not a tensor entry"}),
        safetensors_bytes({"a": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),  # no dtype
        safetensors_bytes({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 4]}}, b"\0" * 4),
    ],
    ids=["empty", "short", "random", "not_json", "entry_not_object", "no_dtype", "shape_vs_offsets"],
)
def test_garbage_safetensors(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        ckpt = open_checkpoint(path)
        for name in ckpt.names():
            ckpt.get(name)


@pytest.mark.parametrize("header", [[], None, 3])
def test_safetensors_header_not_an_object(tmp_path, header):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(safetensors_bytes(header))
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        open_checkpoint(path)


def test_safetensors_entry_without_shape(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(safetensors_bytes({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        open_checkpoint(path)


def test_index_lists_missing_shard(tiny_base, tmp_path):
    shards = write_shards(reference(tiny_base), tmp_path / "sharded")
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name) as info:
        open_checkpoint(tmp_path / "sharded")
    assert "missing" in str(info.value).replace(str(tmp_path), "")  # tmp_path holds the test name


@pytest.mark.parametrize("text", ["{not json", json.dumps({"no_weight_map": {}}), json.dumps([1, 2])])
def test_corrupt_index(tiny_base, tmp_path, text):
    write_shards(reference(tiny_base), tmp_path / "sharded")
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        open_checkpoint(tmp_path / "sharded")


def test_unreadable_config(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(tmp_path)


def test_unknown_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.chdir(tmp_path)  # "org/name" must not exist as a relative path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    attempts: list[object] = []

    def no_network(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    hub_id = "cpift-test-org/no-such-model"
    with pytest.raises(CheckpointError, match=hub_id):
        open_checkpoint(hub_id)
    assert attempts == []


def test_non_tensor_in_mapping():
    with pytest.raises(CheckpointError, match="'b'"):
        open_checkpoint({"a": torch.ones(2), "b": [1.0, 2.0]})


def test_empty_mapping():
    with pytest.raises(CheckpointError, match="no tensors"):
        open_checkpoint({})


def test_unsupported_object():
    with pytest.raises(CheckpointError, match="int"):
        open_checkpoint(42)


def test_get_unknown_name(tiny_base, tmp_path):
    for model in (tiny_base, _as_file(tiny_base, tmp_path)):
        ckpt = open_checkpoint(model, label="the-base")
        with pytest.raises(MismatchError, match="no_such_tensor") as info:
            ckpt.get("no_such_tensor")
        assert "the-base" in str(info.value)


# ---------------------------------------------------------------------------------------------
# aligned_names
# ---------------------------------------------------------------------------------------------


def test_aligned_names_default_is_floating_names():
    base = {"w": torch.randn(3, 2), "steps": torch.tensor([1, 2]), "b": torch.randn(2)}
    task = {k: v.clone() for k, v in base.items()}
    names = aligned_names(open_checkpoint(base), {"math": open_checkpoint(task)})
    assert names == ["w", "b"]
    assert aligned_names(open_checkpoint(base), {"math": open_checkpoint(task)}, ["steps"]) == ["steps"]


def test_aligned_names_missing_tensor(tiny_tasks, tiny_base):
    base = open_checkpoint(tiny_base)
    victim = "model.layers.1.mlp.up_proj.weight"
    others = {t: open_checkpoint(s) for t, s in tiny_tasks.items()}
    assert aligned_names(base, others) == base.floating_names()
    broken = {k: v for k, v in tiny_tasks["code"].items() if k != victim}
    others["code"] = open_checkpoint(broken)
    with pytest.raises(MismatchError, match="code") as info:
        aligned_names(base, others)
    assert victim in str(info.value)


def test_aligned_names_different_shape(tiny_tasks, tiny_base):
    base = open_checkpoint(tiny_base)
    victim = "model.layers.0.self_attn.k_proj.weight"
    broken = dict(tiny_tasks["logic"])
    broken[victim] = broken[victim][:-1].clone()
    others = {"math": open_checkpoint(tiny_tasks["math"]), "logic": open_checkpoint(broken)}
    with pytest.raises(MismatchError, match="logic") as info:
        aligned_names(base, others)
    assert victim in str(info.value)
