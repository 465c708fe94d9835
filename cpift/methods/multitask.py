"""Multi-task Full SFT: one model trained on the shuffled mixture of every task's data."""

from __future__ import annotations

import torch

from ..runs import method_final_dir
from .common import Context
from .registry import Method, register


def run(ctx: Context) -> dict[str, torch.nn.Module]:
    """Train the base on all tasks' examples mixed, with the whole step budget."""
    tasks = list(ctx.tasks)

    def build() -> torch.nn.Module:
        return ctx.train_stage(ctx.fresh_base(), ctx.examples(tasks, seed=ctx.config.run.seed), "multitask", ctx.steps)

    return {"multitask": ctx.cached_model(method_final_dir("multitask"), build)}


register(Method("multitask", run, "Full SFT on the mixture of all tasks"))
