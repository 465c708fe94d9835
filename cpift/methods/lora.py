"""LoRA and DoRA baselines through ``peft``: low-rank adapters trained on the multi-task mixture.

Both train exactly like ``multitask`` — the same shuffled mixture of every task's examples, the
same optimizer-step budget and the same loop (:meth:`Context.train_stage`) — except that only the
adapters learn: ``peft`` freezes the base weights (``requires_grad=False``), so AdamW holds only
the adapter parameters. DoRA (weight-decomposed LoRA) is ``peft.LoraConfig(use_dora=True)``: a
trained magnitude vector per output row on top of the low-rank direction update.

The adapters are merged into the weights (``merge_and_unload``) before the model is saved, so the
final model is a plain model of the base architecture, saved and scored like every other method.
Training checkpoints hold the wrapped model's full state (base and adapters) and the adapters'
AdamW state, so a stopped run resumes inside the adapter stage like any other.

Choices: the adapters' random init (A; B starts at 0) is drawn from ``run.seed`` in a forked RNG,
so it is reproducible whatever ran before. The rank, alpha, dropout and target modules come from
``[lora]``; the learning rate is ``lora.lr`` (default ten times ``train.lr``: adapters start from
B = 0 and move few parameters, and the usual LoRA rates are about ten times those of full
fine-tuning). No bias is trained.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from ..errors import CpiftError
from ..runs import method_final_dir
from ..settings import ConfigError, Float, Names, Section
from .common import Context
from .registry import Method, register

if TYPE_CHECKING:
    import peft


LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_LR_FACTOR = 10.0  # lora.lr defaults to this × train.lr


class LoraSettings(Section):
    """``[lora]``: the LoRA and DoRA adapters: rank r, scaling numerator alpha (the update is
    (alpha / rank) · B·A), dropout on the adapter's input, the module names (last component) that
    get adapters — by default a Llama's attention and MLP projections — and the learning rate
    (default ``LORA_LR_FACTOR`` × ``train.lr``)."""

    rank: int = Field(8, ge=1)
    alpha: Float = Field(16.0, gt=0)
    dropout: Float = Field(0.05, ge=0, lt=1)
    target_modules: Names = LORA_TARGETS
    lr: Float | None = Field(None, gt=0)

    def resolve(self, config: Any) -> LoraSettings:
        return self if self.lr is not None else self.model_copy(update={"lr": LORA_LR_FACTOR * config.train.lr})


def _peft() -> ModuleType:
    """The ``peft`` module, imported on use: it takes a second and only these baselines need it."""
    try:
        import peft
    except ImportError as exc:
        raise CpiftError(f"the lora and dora methods need peft (pip install 'cpift[train]'): {exc}") from exc
    return peft


def adapter_config(ctx: Context, use_dora: bool) -> peft.LoraConfig:
    """The ``peft.LoraConfig`` of the run's ``[lora]`` section (DoRA when ``use_dora``).

    Raises:
        ConfigError: a target module name matches no module of the base model (naming the key
            ``lora.target_modules[i]`` and the model's linear layer names).
    """
    settings = ctx.config.lora
    names = {name.rsplit(".", 1)[-1] for name, _ in ctx.base_model.named_modules()}
    for i, target in enumerate(settings.target_modules):
        if target not in names:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in ctx.base_model.named_modules()
                             if isinstance(module, torch.nn.Linear)})
            raise ConfigError(f"lora.target_modules[{i}]", f"{target!r} matches no module of the model; "
                              f"its linear layers are {', '.join(linear)}")
    return _peft().LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                              target_modules=list(settings.target_modules), bias="none", use_dora=use_dora,
                              task_type="CAUSAL_LM")


def with_adapters(ctx: Context, model: torch.nn.Module, use_dora: bool) -> torch.nn.Module:
    """``model`` wrapped by ``peft`` with fresh adapters, their random init drawn from ``run.seed``.

    The init uses a forked RNG seeded by the run's seed, so it does not depend on what ran before
    in the process (an adapter stage restarted before its first checkpoint starts the same way)
    and the global RNG is left as it was.
    """
    config = adapter_config(ctx, use_dora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.config.run.seed)
        return _peft().get_peft_model(model, config)


def train_adapters(ctx: Context, method: str, use_dora: bool) -> dict[str, torch.nn.Module]:
    """Train adapters of a fresh base on every task's examples mixed, then merge them.

    The stage is named ``method`` and its final model saved under ``methods/<method>/final``.
    """

    def build() -> torch.nn.Module:
        model = with_adapters(ctx, ctx.fresh_base(), use_dora)
        examples = ctx.examples(list(ctx.tasks), seed=ctx.config.run.seed)
        ctx.train_stage(model, examples, method, ctx.steps, lr=ctx.config.lora.lr)
        return model.merge_and_unload(safe_merge=True)

    return {method: ctx.cached_model(method_final_dir(method), build)}


def run_lora(ctx: Context) -> dict[str, torch.nn.Module]:
    """The LoRA baseline (adapters merged)."""
    return train_adapters(ctx, "lora", use_dora=False)


def run_dora(ctx: Context) -> dict[str, torch.nn.Module]:
    """The DoRA baseline (weight-decomposed adapters, merged)."""
    return train_adapters(ctx, "dora", use_dora=True)


register(Method("lora", run_lora, "LoRA adapters (peft) on the multitask mixture, merged before saving",
                "lora", LoraSettings))
register(Method("dora", run_dora, "DoRA (LoRA with a trained magnitude per output row), merged likewise",
                "lora", LoraSettings))
