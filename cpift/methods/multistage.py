"""Multi-stage SFT without freezing: the tasks split into K stages trained one after another.

Stage orders: ``random`` (seeded, as in the paper's K = 3 baseline) or ``heuristic``: tasks the
base model already scores best on train first and the hardest last, so that the hardest task's
training is the freshest at the end (a documented choice; the paper does not spell out its
heuristic). The step budget is split evenly over the stages, the remainder to the earlier ones.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from pydantic import Field

from ..runs import method_file, method_final_dir
from ..settings import ConfigError, Section, choice
from .common import Context, split_evenly, stage_tasks
from .registry import Method, register

ORDERS = ("random", "heuristic")


class MultistageSettings(Section):
    """``[multistage]``: the multi-stage SFT baseline (EPI trains the same stages)."""

    k: int | None = Field(None, ge=1)  # default: min(3, number of tasks)
    order: Annotated[str, choice(ORDERS)] = "random"

    def resolve(self, config: Any) -> MultistageSettings:
        n = len(config.data.tasks)
        if self.k is None:
            return self.model_copy(update={"k": min(3, n)})
        if self.k > n:
            raise ConfigError("multistage.k", f"{self.k} stages for {n} task(s) in data.tasks; k must be at most {n}")
        return self


def run(ctx: Context) -> dict[str, torch.nn.Module]:
    """Train the stages in order on one model, no parameter frozen."""
    settings = ctx.config.multistage
    stages = stage_tasks(list(ctx.tasks), settings.k, settings.order, ctx.config.run.seed, ctx.base_scores)
    ctx.run.write_json(method_file("multistage", "stages.json"), {"order": settings.order, "stages": stages})

    def build() -> torch.nn.Module:
        model = ctx.fresh_base()
        for i, (names, steps) in enumerate(zip(stages, split_evenly(ctx.steps, len(stages)))):
            ctx.train_stage(model, ctx.examples(names, seed=ctx.config.run.seed + i), f"multistage/stage{i + 1}", steps)
        return model

    return {"multistage": ctx.cached_model(method_final_dir("multistage"), build)}


register(Method("multistage", run, "K stages in random (seeded) or heuristic order, nothing frozen",
                "multistage", MultistageSettings))
