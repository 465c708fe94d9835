"""LoRA and DoRA baselines on the tiny preset: adapters train, the base stays frozen inside the
adapter model, the merge is exact, resume works on a wrapped model, and the models are scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpift.cli import main
from cpift.config import ConfigError, load_config
from cpift.methods import Context
from cpift.methods.lora import adapter_config, with_adapters
from cpift.models import WEIGHTS_FILE, load_weights, tiny_llama, tiny_tokenizer
from cpift.pipeline import build_tasks, run_config, train_config
from cpift.runs import RunDir
from cpift.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"
ADAPTERS = ["run.methods=[\"lora\", \"dora\"]", "train.keep_checkpoints=true", "train.steps=4",
            "lora.dropout=0.0"]


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory) -> RunDir:
    return run_config(load_config(TINY, ADAPTERS), tmp_path_factory.mktemp("runs") / "adapters", progress=False)


def _last_checkpoint(run: RunDir, method: str) -> Path:
    """The adapter stage's last training checkpoint (the wrapped model and its AdamW state)."""
    return max((run.path / "checkpoints" / method).glob("step-*"))


def _wrapped_state(run: RunDir, method: str) -> dict[str, torch.Tensor]:
    """The adapter model's full state at the end of its stage."""
    return load_file(_last_checkpoint(run, method) / "model.safetensors")


def _base_name(wrapped: str) -> str:
    """``base_model.model.X.base_layer.weight`` → ``X.weight``, the plain model's name."""
    return wrapped.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_train_and_the_base_stays_frozen(adapter_run: RunDir, method: str) -> None:
    base = dict(tiny_llama(0).named_parameters())
    state = _wrapped_state(adapter_run, method)
    adapters = {n: t for n, t in state.items() if ".lora_" in n}
    config = load_config(TINY, ADAPTERS).lora
    # One A and one B (and for DoRA a magnitude) per target module per layer.
    per_module = 3 if method == "dora" else 2
    assert len(adapters) == per_module * len(config.target_modules) * 2
    # B starts at zero, so a changed B means the adapters trained.
    assert all(t.abs().sum() > 0 for n, t in adapters.items() if ".lora_B." in n)
    for name, tensor in state.items():
        if ".lora_" not in name:
            assert torch.equal(tensor, base[_base_name(name)].detach()), name
    # AdamW held the adapter parameters only.
    optimizer = torch.load(_last_checkpoint(adapter_run, method) / "custom_checkpoint_0.pkl", weights_only=True)
    assert len(optimizer["state"]) == len(adapters)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_final_model_is_the_hand_merged_adapter_model(adapter_run: RunDir, method: str) -> None:
    config = load_config(TINY, ADAPTERS).lora
    scale = config.alpha / config.rank
    state = _wrapped_state(adapter_run, method)
    base = dict(tiny_llama(0).named_parameters())
    final = dict(load_weights(tiny_llama(0), adapter_run.path / f"methods/{method}/final").named_parameters())
    assert final.keys() == base.keys()  # a plain model of the base architecture
    merged = set()
    for name in state:
        if not name.endswith(".lora_A.default.weight"):
            continue
        prefix = name.removesuffix(".lora_A.default.weight")
        weight = state[f"{prefix}.base_layer.weight"]
        direction = weight + scale * state[f"{prefix}.lora_B.default.weight"] @ state[name]
        if method == "dora":  # magnitude × unit-norm rows of the updated weight
            magnitude = state[f"{prefix}.lora_magnitude_vector.default.weight"]
            direction = magnitude[:, None] * direction / direction.norm(dim=1, keepdim=True)
        target = _base_name(f"{prefix}.base_layer.weight")
        torch.testing.assert_close(final[target].detach(), direction, rtol=1e-5, atol=1e-6)
        assert not torch.equal(final[target], base[target])
        merged.add(target)
    for name in base.keys() - merged:  # embeddings and norms have no adapters
        assert torch.equal(final[name], base[name]), name


def test_adapter_models_are_scored_with_forgetting(adapter_run: RunDir, capsys) -> None:
    assert all((adapter_run.path / "methods" / m / "final" / WEIGHTS_FILE).is_file() for m in ("lora", "dora"))
    summary = json.loads((adapter_run.path / "metrics.json").read_text())
    assert {"base", "lora", "dora"} <= set(summary["normalised_average"])
    assert {"lora", "dora"} <= set(summary["forgetting"])
    assert summary["forgetting"]["base"]["mean_forget_ratio"] == 0.0
    assert main(["compare", str(adapter_run.path)]) == 0
    out = capsys.readouterr().out
    assert "mean_forget_ratio" in out and "collapse_rate" in out and "dora" in out


def test_unknown_target_module_names_the_key(tmp_path: Path) -> None:
    config = load_config(TINY, ['lora.target_modules=["q_proj", "qkv_proj"]'])
    run = RunDir.create(tmp_path / "run", config.to_dict())
    ctx = Context(config, run, build_tasks(config), tiny_llama(0), tiny_tokenizer(), train_config(config))
    with pytest.raises(ConfigError, match=r"lora\.target_modules\[1\]: 'qkv_proj' matches no module.*q_proj"):
        adapter_config(ctx, use_dora=False)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("use_dora", [False, True])
def test_resume_of_a_wrapped_model_matches_uninterrupted(tmp_path: Path, use_dora: bool) -> None:
    config = load_config(TINY, ["lora.dropout=0.1"])  # dropout: the RNG state must resume too
    run = RunDir.create(tmp_path / "run", config.to_dict())
    ctx = Context(config, run, build_tasks(config), tiny_llama(0), tiny_tokenizer(), train_config(config))
    examples = ctx.examples(list(ctx.tasks))
    settings = TrainConfig(lr=1e-2, warmup_steps=0, steps=4, batch_size=2, max_length=256, checkpoint_every=2,
                           device="cpu")

    def wrapped() -> torch.nn.Module:
        torch.rand(3)  # the global RNG moves between calls; the adapters' init must not follow it
        return with_adapters(ctx, tiny_llama(0), use_dora)

    def stop_at_first_checkpoint(event: dict) -> None:
        if event["event"] == "checkpoint":
            raise _Stop

    uninterrupted = wrapped()
    train(uninterrupted, ctx.tokenizer, examples, settings, progress=False)
    with pytest.raises(_Stop):
        train(wrapped(), ctx.tokenizer, examples, settings, checkpoint_dir=tmp_path / "ck",
              on_event=stop_at_first_checkpoint, progress=False)
    resumed = wrapped()
    result = train(resumed, ctx.tokenizer, examples, settings, checkpoint_dir=tmp_path / "ck", resume=True,
                   progress=False)
    assert result.resumed_from == 2
    for (name, a), (_, b) in zip(resumed.named_parameters(), uninterrupted.named_parameters()):
        assert torch.equal(a, b), name
