"""Sparse selection (GaLLoP, SAFT, PaFi, custom scores), the gradient estimate, and the sparse methods."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cpift.config import load_config
from cpift.data.tasks import Example
from cpift.errors import MismatchError, ParameterError
from cpift.masks import load_packed, unpack_all
from cpift.methods import METHODS, Context
from cpift.models import tiny_llama, tiny_tokenizer
from cpift.pipeline import build_tasks, load_base, train_config
from cpift.runs import RunDir
from cpift.sparse import sparse_mask
from cpift.train import TrainConfig, collate, estimate_gradients, tokenize_chat

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"

# Flat order a00 a01 a10 a11 b0 b1 b2 b3 (ties go to the lowest of these).
PARAMS = {"a": torch.tensor([[1.0, -2.0], [0.5, 4.0]]), "b": torch.tensor([2.0, -0.5, 1.0, 4.0])}
GRADS = {"a": torch.tensor([[1.0, -1.0], [1.0, 2.0]]), "b": torch.tensor([2.0, 0.5, -1.0, 1.0])}


def chosen(masks: dict[str, torch.Tensor]) -> dict[str, list]:
    return {name: mask.int().tolist() for name, mask in masks.items()}


def test_gallop_large_gradient_on_small_weight_ties_to_lowest_index() -> None:
    # |g|/(|θ|+1e-8) = a: 1 .5 2 .5, b: 1 1 1 .25 (the 1s tie exactly in float32); k = 4:
    # a10 (2), then three of the five 1s: a00, b0, b1.
    masks = sparse_mask(PARAMS, GRADS, 50, "gallop")
    assert chosen(masks) == {"a": [[1, 0], [1, 0]], "b": [1, 1, 0, 0]}
    assert all(m.dtype == torch.bool and m.shape == PARAMS[n].shape for n, m in masks.items())


def test_saft_largest_gradients() -> None:
    # |g| = a: 1 1 1 2, b: 2 .5 1 1; k = 4: a11, b0 (2), then a00, a01 of the tied 1s.
    assert chosen(sparse_mask(PARAMS, GRADS, 50, "saft")) == {"a": [[1, 1], [0, 1]], "b": [1, 0, 0, 0]}


def test_pafi_smallest_weights_needs_no_gradient() -> None:
    # −|θ| = a: -1 -2 -.5 -4, b: -2 -.5 -1 -4; k = floor(37.5·8/100) = 3: a10, b1, then a00 (tie with b2).
    expected = {"a": [[1, 0], [1, 0]], "b": [0, 1, 0, 0]}
    assert chosen(sparse_mask(PARAMS, None, 37.5, "pafi")) == expected
    assert chosen(sparse_mask(PARAMS, GRADS, 37.5, "pafi")) == expected


def test_custom_score_and_per_tensor_scope() -> None:
    # θ itself: a: 1 -2 .5 4, b: 2 -.5 1 4; k = 3: a11, b3 (4), b0 (2).
    masks = sparse_mask(PARAMS, GRADS, 37.5, lambda param, grad: param)
    assert chosen(masks) == {"a": [[0, 0], [0, 1]], "b": [1, 0, 0, 1]}
    # Per tensor, 2 of each: saft in a: a11, then a00 (tie); in b: b0, then b2 (tie with b3).
    assert chosen(sparse_mask(PARAMS, GRADS, 50, "saft", scope="tensor")) == {"a": [[1, 0], [0, 1]],
                                                                            "b": [1, 0, 1, 0]}


def test_exact_count_on_a_model() -> None:
    model = tiny_llama(seed=0)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    for density in (0.7, 3.0, 100.0):
        masks = sparse_mask(params, grads, density, "gallop")
        assert sum(int(m.sum()) for m in masks.values()) == int(density * total // 100)


def test_bad_inputs_raise_clear_errors() -> None:
    for density in (0, -1, 100.5, True, "1"):
        with pytest.raises(ParameterError, match="density"):
            sparse_mask(PARAMS, GRADS, density)
    with pytest.raises(ParameterError, match="score must be one of"):
        sparse_mask(PARAMS, GRADS, 10, "galop")
    with pytest.raises(ParameterError, match="scope"):
        sparse_mask(PARAMS, GRADS, 10, scope="layer")
    with pytest.raises(ParameterError, match="needs the gradients"):
        sparse_mask(PARAMS, None, 10, "saft")
    with pytest.raises(MismatchError, match="no gradient for 'b'"):
        sparse_mask(PARAMS, {"a": GRADS["a"]}, 10)
    with pytest.raises(MismatchError, match="shape"):
        sparse_mask(PARAMS, {"a": GRADS["a"], "b": torch.zeros(3)}, 10)
    with pytest.raises(MismatchError, match="score of 'a'"):
        sparse_mask(PARAMS, GRADS, 10, lambda param, grad: param.reshape(-1))
    nan = {"a": GRADS["a"], "b": torch.tensor([1.0, float("nan"), 0.0, 0.0])}
    with pytest.raises(ParameterError, match="gradient of 'b' holds NaN"):
        sparse_mask(PARAMS, nan, 10)


# ------------------------------------------------------------------------------- gradient estimate


def examples() -> list[Example]:
    pairs = [("2+2?", "4"), ("3+5?", "eight"), ("Say hi.", "hi there"), ("1+6?", "7"), ("Colour?", "blue")]
    system = {"role": "system", "content": "Be brief."}  # short: the tiny tokenizer is per character
    return [Example(messages=(system, {"role": "user", "content": q}, {"role": "assistant", "content": a}))
            for q, a in pairs]


def test_gradient_estimate_is_the_token_weighted_mean_of_batch_gradients() -> None:
    tokenizer, data = tiny_tokenizer(), examples()
    config = TrainConfig(batch_size=2, max_length=64, device="cpu")
    model = tiny_llama(seed=0)
    accumulated = estimate_gradients(model, tokenizer, data, config, progress=False)
    assert all(p.grad is None for p in model.parameters())
    # By hand: each batch's own mean-token-loss gradient, weighted by its number of answer tokens.
    total: dict[str, torch.Tensor] = {}
    tokens = 0
    for start in range(0, len(data), 2):
        batch = data[start : start + 2]
        n = int((collate([tokenize_chat(tokenizer, e, 64) for e in batch], 0)["labels"][:, 1:] != -100).sum())
        grads = estimate_gradients(tiny_llama(seed=0), tokenizer, batch, config, progress=False)
        for name, grad in grads.items():
            total[name] = total.get(name, 0) + n * grad
        tokens += n
    one_batch = estimate_gradients(tiny_llama(seed=0), tokenizer, data,
                                   TrainConfig(batch_size=5, max_length=64, device="cpu"), progress=False)
    assert set(accumulated) == set(total) == {n for n, _ in model.named_parameters()}
    for name, grad in accumulated.items():
        assert grad.abs().sum() > 0 or name.endswith("norm.weight"), name
        torch.testing.assert_close(grad, total[name] / tokens, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(grad, one_batch[name], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------- the methods


def context(run_path: Path, overrides: list[str]) -> Context:
    config = load_config(TINY, overrides)
    model, tokenizer = load_base(config)
    run = RunDir.create(run_path, config.to_dict())
    return Context(config, run, build_tasks(config), model, tokenizer, train_config(config))


def test_sparse_methods_train_only_their_selection(tmp_path: Path) -> None:
    ctx = context(tmp_path / "run", ['run.methods=["gallop", "pafi"]', "sparse.density=[5, 20]",
                                     "train.weight_decay=0.1", "sparse.grad_examples=6"])
    models = METHODS["gallop"].run(ctx)
    assert list(models) == ["gallop@5", "gallop@20"]
    # The other configured method's masks came from the same pass; saft is not configured.
    assert (ctx.run.path / "methods/pafi/masks.npz").is_file()
    assert not (ctx.run.path / "methods/saft/masks.npz").exists()
    layout, masks, metadata = load_packed(ctx.run.path / "methods/gallop/masks.npz")
    assert metadata["gradient_examples"] == "6"
    # The saved selection is the library's, from the gradient over the first 6 mixture examples.
    base = ctx.fresh_base()
    grads = estimate_gradients(ctx.fresh_base(), ctx.tokenizer, ctx.examples(list(ctx.tasks), seed=0)[:6],
                               ctx.train_config, progress=False)
    params = dict(base.named_parameters())
    for density, label in ((5, "gallop@5"), (20, "gallop@20")):
        expected = sparse_mask(params, grads, density, "gallop")
        saved = unpack_all(masks[f"density-{density}"], layout)
        assert all(torch.equal(saved[n], expected[n]) for n in expected)
        assert (ctx.run.path / f"methods/gallop/density-{density}/final/model.safetensors").is_file()
        # Only the selected elements moved (weight decay > 0 included), and some did.
        trained = dict(models[label].named_parameters())
        moved = 0
        for name, mask in expected.items():
            before, after = params[name].detach(), trained[name].detach()
            assert torch.equal(before[~mask], after[~mask]), name
            moved += int((before[mask] != after[mask]).sum())
        assert moved > 0
    pafi = METHODS["pafi"].run(ctx)
    assert list(pafi) == ["pafi@5", "pafi@20"]
    _, pafi_masks, _ = load_packed(ctx.run.path / "methods/pafi/masks.npz")
    expected = sparse_mask(params, None, 5, "pafi")
    assert all(torch.equal(unpack_all(pafi_masks["density-5"], layout)[n], expected[n]) for n in expected)


def test_density_selecting_nothing_is_refused(tmp_path: Path) -> None:
    ctx = context(tmp_path / "run", ['run.methods=["pafi"]', "sparse.density=0.001"])
    with pytest.raises(ParameterError, match="selects no element"):
        METHODS["pafi"].run(ctx)
    assert np.all(load_packed(ctx.run.path / "methods/pafi/masks.npz")[1]["density-0.001"] == 0)


@pytest.mark.parametrize(("override", "key", "message"), [
    ("sparse.density=[1, 0]", "sparse.density[1]", "must be > 0"),
    ("sparse.density=[1, 1.0]", "sparse.density", "listed twice"),
    ("sparse.density=[]", "sparse.density", "must not be empty"),
    ('sparse.density=["1"]', "sparse.density[0]", "expected a number"),
    ("sparse.grad_fraction=0", "sparse.grad_fraction", "must be > 0"),
    ("sparse.grad_examples=-1", "sparse.grad_examples", "must be >= 0"),
    ("sparse.scope=layer", "sparse.scope", "not one of global, tensor"),
    ("epi.beta=1.0", "epi.beta", "must be < 1"),
    ("epi.interval=0", "epi.interval", "must be >= 1"),
    ("epi.normalise=row", "epi.normalise", "not one of tensor, layer, none"),
])
def test_config_errors_name_the_key(override: str, key: str, message: str) -> None:
    from cpift.config import ConfigError

    with pytest.raises(ConfigError, match=message) as caught:
        load_config(TINY, [override])
    assert caught.value.key == key


def test_a_single_density_is_a_list_of_one() -> None:
    config = load_config(TINY, ["sparse.density=0.5"])
    assert config.sparse.density == (0.5,)
    assert load_config(TINY, [f"sparse.density={[0.5, 2]}"]).sparse.density == (0.5, 2.0)
