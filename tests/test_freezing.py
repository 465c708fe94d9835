"""Tests of cpift.freezing.MaskedOptimizer: frozen elements stay bit-identical under any optimizer."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cpift.errors import MismatchError, ParameterError
from cpift.freezing import MaskedOptimizer

OptFactory = Callable[[nn.Module], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptFactory] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "sgd_momentum": lambda m: torch.optim.SGD(
        m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01
    ),
}


def small_model(seed: int = 0, d_in: int = 6, d_hidden: int = 5, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def linear_step(model: nn.Module, opt, gen: torch.Generator) -> torch.Tensor:
    """One forward/backward/step with fresh random data (dense, nonzero gradients)."""
    d_in = model[0].in_features
    d_out = model[-1].out_features
    x = torch.randn(8, d_in, generator=gen)
    y = torch.randn(8, d_out, generator=gen)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def random_masks(model: nn.Module, density: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {n: torch.rand(p.shape, generator=gen) < density for n, p in model.named_parameters()}


def assert_frozen_kept(
    model: nn.Module, before: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> None:
    for name, p in model.named_parameters():
        mask = masks.get(name)
        if mask is None:
            continue
        assert torch.equal(p.detach()[mask], before[name][mask]), name


def assert_unfrozen_moved(
    model: nn.Module, before: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> None:
    for name, p in model.named_parameters():
        mask = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        moved = p.detach() != before[name]
        assert moved[~mask].all(), name


# --------------------------------------------------------------------------- bit-exactness


def test_masking_gradients_alone_does_not_stop_adamw() -> None:
    """The reason MaskedOptimizer exists: a zero gradient still moves a weight under AdamW."""
    model = small_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        linear_step(model, opt, gen)
    w = model[0].weight
    before = w.detach().clone()
    opt.zero_grad()
    nn.functional.mse_loss(model(torch.randn(8, 6, generator=gen)), torch.zeros(8, 3)).backward()
    w.grad.zero_()
    opt.step()
    assert (w.detach() != before).all()


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_frozen_elements_bit_identical_after_momentum_built_up(opt_name: str) -> None:
    model = small_model()
    masked = MaskedOptimizer(OPTIMIZERS[opt_name](model), model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):  # unmasked: momentum / moments build up at every element
        linear_step(model, masked, gen)
    masks = random_masks(model, 0.3, gen)
    masked.set_frozen(masks)
    assert masked.frozen_count == sum(int(m.sum()) for m in masks.values())
    before = snapshot(model)
    for _ in range(5):
        linear_step(model, masked, gen)
        assert_frozen_kept(model, before, masks)
    assert_unfrozen_moved(model, before, masks)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    density=st.floats(0.0, 1.0),
    opt_name=st.sampled_from(sorted(OPTIMIZERS)),
    d_hidden=st.integers(1, 6),
    warmup=st.integers(0, 3),
)
def test_property_random_masks(
    seed: int, density: float, opt_name: str, d_hidden: int, warmup: int
) -> None:
    model = small_model(seed, d_in=3, d_hidden=d_hidden, d_out=2)
    masked = MaskedOptimizer(OPTIMIZERS[opt_name](model), model)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(warmup):
        linear_step(model, masked, gen)
    masks = random_masks(model, density, gen)
    masked.set_frozen(masks)
    before = snapshot(model)
    for _ in range(3):
        linear_step(model, masked, gen)
    assert_frozen_kept(model, before, masks)


def test_fully_frozen_parameter() -> None:
    model = small_model()
    masked = MaskedOptimizer(OPTIMIZERS["adamw"](model), model)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        linear_step(model, masked, gen)
    masks = {
        "0.weight": torch.ones(5, 6, dtype=torch.bool),
        "2.bias": torch.ones(3, dtype=torch.bool),
    }
    masked.set_frozen(masks)
    assert masked.frozen_names == ("0.weight", "2.bias")
    assert masked.frozen_count == 33
    before = snapshot(model)
    for _ in range(3):
        linear_step(model, masked, gen)
    assert torch.equal(model[0].weight.detach(), before["0.weight"])
    assert torch.equal(model[2].bias.detach(), before["2.bias"])
    assert not torch.equal(model[0].bias.detach(), before["0.bias"])


def test_tiny_llama_with_tied_embeddings() -> None:
    model = tiny_llama()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # tied: listed once, under the embedding's name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    masked = MaskedOptimizer(opt, model)
    gen = torch.Generator().manual_seed(3)

    def lm_step() -> None:
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        masked.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        masked.step()

    for _ in range(2):
        lm_step()
    masks = random_masks(model, 0.2, gen)
    masks["model.norm.weight"] = torch.ones_like(masks["model.norm.weight"])
    masked.set_frozen(masks)
    before = snapshot(model)
    for _ in range(3):
        lm_step()
    assert_frozen_kept(model, before, masks)
    emb_mask = masks["model.embed_tokens.weight"]
    assert torch.equal(
        model.lm_head.weight.detach()[emb_mask], before["model.embed_tokens.weight"][emb_mask]
    )
    moved = model.model.embed_tokens.weight.detach() != before["model.embed_tokens.weight"]
    assert moved[~emb_mask].float().mean() > 0.9

    with pytest.raises(MismatchError, match="tied to 'model.embed_tokens.weight'"):
        masked.set_frozen({"lm_head.weight": emb_mask})


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4).t())  # shape (4, 3), not contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def test_noncontiguous_parameter() -> None:
    torch.manual_seed(0)
    model = Transposed()
    assert not model.w.is_contiguous()
    masked = MaskedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model
    )
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 3, generator=gen) < 0.5
    for step in range(4):
        if step == 2:
            masked.set_frozen({"w": mask})
            before = model.w.detach().clone()
        masked.zero_grad()
        (model(torch.randn(5, 4, generator=gen)) ** 2).sum().backward()
        masked.step()
    assert torch.equal(model.w.detach()[mask], before[mask])
    assert (model.w.detach() != before)[~mask].all()


@pytest.mark.parametrize("frozen", [2, 10, 12])  # of 12: frozen side indexed, trainable side, fully frozen
def test_noncontiguous_parameter_and_gradient_either_side(frozen: int) -> None:
    torch.manual_seed(0)
    model = Transposed()
    masked = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model)
    gen = torch.Generator().manual_seed(0)
    mask = torch.randperm(12, generator=gen).reshape(4, 3) < frozen

    def step() -> None:
        masked.zero_grad()
        (model(torch.randn(5, 4, generator=gen)) ** 2).sum().backward()
        assert not model.w.grad.is_contiguous()  # the gradient takes the parameter's layout
        masked.step()

    step()
    masked.set_frozen({"w": mask})
    assert masked.frozen_count == frozen
    assert masked.index_bytes == 8 * min(frozen, 12 - frozen)
    before = model.w.detach().clone()
    for _ in range(2):
        step()
        assert (model.w.grad[mask] == 0).all()
    assert torch.equal(model.w.detach()[mask], before[mask])
    assert (model.w.detach() != before)[~mask].all()


# --------------------------------------------------------------------------- the smaller side


class FullCopyReference:
    """The obvious exact masking, for comparison: zero the frozen gradients, copy every parameter,
    step, then take the frozen elements from the copy."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        self.optimizer, self.model, self.masks = optimizer, model, {}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                params[name].grad[mask] = 0
            before = snapshot(self.model)
            self.optimizer.step()
            for name, mask in self.masks.items():
                params[name].copy_(torch.where(mask, before[name], params[name]))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    density=st.one_of(st.floats(0.0, 1.0), st.floats(0.9, 1.0)),  # often mostly frozen
    opt_name=st.sampled_from(sorted(OPTIMIZERS)),
    d_hidden=st.integers(1, 6),
    warmup=st.integers(0, 3),
)
def test_property_bit_identical_to_a_full_copy_reference(
    seed: int, density: float, opt_name: str, d_hidden: int, warmup: int
) -> None:
    """Whichever side each mask is indexed by, every element (frozen or not) and the optimizer's
    state end bit-identical to the obvious full-copy masking, through weight decay and momentum
    built up before freezing."""
    model = small_model(seed, d_in=3, d_hidden=d_hidden, d_out=2)
    twin = copy.deepcopy(model)
    masked = MaskedOptimizer(OPTIMIZERS[opt_name](model), model)
    reference = FullCopyReference(OPTIMIZERS[opt_name](twin), twin)
    gen, twin_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(warmup):
        linear_step(model, masked, gen)
        linear_step(twin, reference, twin_gen)
    masks = random_masks(model, density, torch.Generator().manual_seed(seed + 1))
    masked.set_frozen(masks)
    reference.masks = masks
    for _ in range(3):
        linear_step(model, masked, gen)
        linear_step(twin, reference, twin_gen)
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), name
            for key, value in masked.state[p].items():  # frozen gradients were zeroed alike
                assert torch.equal(value, reference.optimizer.state[q][key]), (name, key)


def test_index_holds_the_smaller_side() -> None:
    model = small_model(d_in=40, d_hidden=50, d_out=3)
    mostly_frozen = torch.ones(50, 40, dtype=torch.bool)
    mostly_frozen.view(-1)[::100] = False  # 20 of 2000 train
    few_frozen = torch.zeros(3, 50, dtype=torch.bool)
    few_frozen[0, :5] = True
    masks = {"0.weight": mostly_frozen, "2.weight": few_frozen, "0.bias": torch.ones(50, dtype=torch.bool)}
    masked = MaskedOptimizer(OPTIMIZERS["adamw"](model), model, masks)
    assert masked.frozen_count == 1980 + 5 + 50
    assert masked.index_bytes == 8 * (20 + 5 + 0)  # the trainable side, the frozen side, nothing
    assert masked.frozen_names == ("0.weight", "0.bias", "2.weight")
    gen = torch.Generator().manual_seed(11)
    before = snapshot(model)
    for _ in range(3):
        linear_step(model, masked, gen)
    assert_frozen_kept(model, before, masks)
    assert_unfrozen_moved(model, before, masks)


def test_mask_change_between_steps() -> None:
    model = small_model()
    masked = MaskedOptimizer(OPTIMIZERS["adamw"](model), model)
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        linear_step(model, masked, gen)
    first = random_masks(model, 0.5, gen)
    second = random_masks(model, 0.5, gen)
    masked.set_frozen(first)
    at_first = snapshot(model)
    for _ in range(3):
        linear_step(model, masked, gen)
    assert_frozen_kept(model, at_first, first)

    masked.set_frozen(second)
    at_second = snapshot(model)
    for _ in range(3):
        linear_step(model, masked, gen)
    assert_frozen_kept(model, at_second, second)
    for name, p in model.named_parameters():
        released = first[name] & ~second[name]
        newly_frozen = second[name] & ~first[name]
        assert (p.detach() != at_second[name])[released].all(), name
        assert torch.equal(p.detach()[newly_frozen], at_second[name][newly_frozen]), name

    masked.set_frozen(None)
    assert masked.frozen_count == 0 and masked.frozen_names == ()
    at_third = snapshot(model)
    linear_step(model, masked, gen)
    assert_unfrozen_moved(model, at_third, {})


def test_frozen_gradients_zeroed_before_inner_step() -> None:
    model = small_model()
    masks = random_masks(model, 0.4, torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    masked = MaskedOptimizer(opt, model, frozen=masks)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        linear_step(model, masked, gen)
    for name, p in model.named_parameters():
        state = opt.state[p]
        m = masks[name]
        assert (state["exp_avg"][m] == 0).all(), name
        assert (state["exp_avg_sq"][m] == 0).all(), name
        assert (state["exp_avg"][~m] != 0).all(), name
        assert (p.grad[m] == 0).all(), name  # the gradients seen by the optimizer


def test_closure_is_masked_and_return_value_passed_through() -> None:
    model = small_model()
    masks = random_masks(model, 0.5, torch.Generator().manual_seed(6))
    before = snapshot(model)
    x, y = torch.randn(8, 6), torch.randn(8, 3)

    def closure() -> torch.Tensor:
        masked.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    masked = MaskedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), model, masks
    )
    for _ in range(2):
        loss = masked.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert_frozen_kept(model, before, masks)
    for name, p in model.named_parameters():
        assert (p.grad[masks[name]] == 0).all()

    masked = MaskedOptimizer(OPTIMIZERS["sgd_momentum"](model), model, masks)
    assert masked.step() is None
    assert isinstance(masked.step(closure), torch.Tensor)


# --------------------------------------------------------------------------- validation


def test_unknown_name() -> None:
    model = small_model()
    with pytest.raises(
        MismatchError, match=r"unknown parameter '0\.wieght' in frozen mask.*e\.g\."
    ) as err:
        MaskedOptimizer(
            OPTIMIZERS["adam"](model), model, {"0.wieght": torch.zeros(5, 6, dtype=torch.bool)}
        )
    assert "'0.weight'" in str(err.value)


def test_shape_mismatch_names_both_shapes() -> None:
    model = small_model()
    with pytest.raises(MismatchError, match=r"'0\.weight'.*\(6, 5\).*\(5, 6\)"):
        MaskedOptimizer(
            OPTIMIZERS["adam"](model), model, {"0.weight": torch.zeros(6, 5, dtype=torch.bool)}
        )


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_non_bool_mask_rejected(dtype: torch.dtype) -> None:
    model = small_model()
    with pytest.raises(ParameterError, match=r"'0\.bias'.*torch\.bool"):
        MaskedOptimizer(OPTIMIZERS["adam"](model), model, {"0.bias": torch.ones(5, dtype=dtype)})


def test_wrong_forms_rejected() -> None:
    model = small_model()
    opt = OPTIMIZERS["adam"](model)
    with pytest.raises(ParameterError, match="'0.bias'"):
        MaskedOptimizer(opt, model, {"0.bias": [True] * 5})
    with pytest.raises(ParameterError, match="mapping"):
        MaskedOptimizer(opt, model, [("0.bias", torch.ones(5, dtype=torch.bool))])
    with pytest.raises(ParameterError, match="Optimizer"):
        MaskedOptimizer(object(), model)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="Module"):
        MaskedOptimizer(opt, object())  # type: ignore[arg-type]


def test_frozen_parameter_not_in_optimizer() -> None:
    model = small_model()
    opt = torch.optim.AdamW(model[0].parameters(), lr=1e-2)
    with pytest.raises(MismatchError, match=r"'2\.weight'.*not in the optimizer"):
        MaskedOptimizer(opt, model, {"2.weight": torch.ones(3, 5, dtype=torch.bool)})
    # Nothing frozen there: harmless.
    masked = MaskedOptimizer(opt, model, {"2.weight": torch.zeros(3, 5, dtype=torch.bool)})
    assert masked.frozen_count == 0
    # After add_param_group it may be frozen.
    masked.add_param_group({"params": list(model[2].parameters())})
    masked.set_frozen({"2.weight": torch.ones(3, 5, dtype=torch.bool)})
    assert masked.frozen_names == ("2.weight",)


def test_failed_set_frozen_keeps_previous_masks() -> None:
    model = small_model()
    masked = MaskedOptimizer(
        OPTIMIZERS["adam"](model), model, {"0.bias": torch.ones(5, dtype=torch.bool)}
    )
    with pytest.raises(MismatchError):
        masked.set_frozen(
            {
                "0.weight": torch.ones(5, 6, dtype=torch.bool),
                "nope": torch.ones(1, dtype=torch.bool),
            }
        )
    assert masked.frozen_names == ("0.bias",) and masked.frozen_count == 5


def test_mask_layouts_and_devices_accepted() -> None:
    model = small_model()
    masked = MaskedOptimizer(OPTIMIZERS["adamw"](model), model)
    mask = (torch.rand(6, 5) < 0.5).t()  # non-contiguous view
    masked.set_frozen({"0.weight": mask})
    assert masked.frozen_count == int(mask.sum())
    if torch.cuda.is_available():
        masked.set_frozen({"0.weight": mask.cuda()})
        assert masked.frozen_count == int(mask.sum())
    before = snapshot(model)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        linear_step(model, masked, gen)
    assert_frozen_kept(model, before, {"0.weight": mask})


def test_sparse_gradient_rejected() -> None:
    model = nn.Embedding(10, 4, sparse=True)
    masked = MaskedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        {"weight": torch.ones(10, 4, dtype=torch.bool)},
    )
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ParameterError, match="sparse"):
        masked.step()


# --------------------------------------------------------------------------- delegation


def test_lr_scheduler_takes_the_inner_optimizer() -> None:
    """LR schedulers require a real Optimizer instance: they take ``masked.optimizer``."""
    model = small_model()
    masked = MaskedOptimizer(OPTIMIZERS["adamw"](model), model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(masked.optimizer, lambda s: 0.5**s)
    masks = random_masks(model, 0.3, torch.Generator().manual_seed(8))
    masked.set_frozen(masks)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            assert masked.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**step)
            linear_step(model, masked, gen)
            scheduler.step()
    # The scheduler saw the optimizer step (no "lr_scheduler.step() before optimizer.step()").
    assert not [w for w in caught if "optimizer.step()" in str(w.message)]
    assert_frozen_kept(model, before, masks)
    assert masked.param_groups is masked.optimizer.param_groups


def test_state_dict_round_trip() -> None:
    model = small_model()
    masks = random_masks(model, 0.3, torch.Generator().manual_seed(9))
    masked = MaskedOptimizer(OPTIMIZERS["adamw"](model), model, masks)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        linear_step(model, masked, gen)
    sd = copy.deepcopy(masked.state_dict())
    inner = masked.optimizer.state_dict()
    assert (
        sd["param_groups"] == inner["param_groups"] and sd["state"].keys() == inner["state"].keys()
    )

    clone = copy.deepcopy(model)
    masked_clone = MaskedOptimizer(OPTIMIZERS["adamw"](clone), clone, masks)
    masked_clone.load_state_dict(sd)
    for p, q in zip(model.parameters(), clone.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(masked.state[p][key], masked_clone.state[q][key])

    before = snapshot(model)
    gen_a, gen_b = torch.Generator().manual_seed(10), torch.Generator().manual_seed(10)
    for _ in range(2):
        linear_step(model, masked, gen_a)
        linear_step(clone, masked_clone, gen_b)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)
    assert_frozen_kept(clone, before, masks)


def test_zero_grad_and_repr() -> None:
    model = small_model()
    masked = MaskedOptimizer(
        OPTIMIZERS["adam"](model), model, {"0.bias": torch.ones(5, dtype=torch.bool)}
    )
    linear_step(model, masked, torch.Generator().manual_seed(0))
    masked.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert masked.defaults["lr"] == 1e-2
    assert masked.model is model
    assert "frozen_count=5" in repr(masked)
