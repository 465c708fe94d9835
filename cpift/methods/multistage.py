"""Multi-stage SFT without freezing: the tasks split into K stages trained one after another.

Stage orders: ``random`` (seeded, as in the paper's K = 3 baseline) or ``heuristic``: tasks the
base model already scores best on train first and the hardest last, so that the hardest task's
training is the freshest at the end (a documented choice; the paper does not spell out its
heuristic). The step budget is split evenly over the stages, the remainder to the earlier ones.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from .common import Context

ORDERS = ("random", "heuristic")


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` items (steps, tasks) split as evenly as possible into ``parts``, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def stage_tasks(
    tasks: Sequence[str], k: int, order: str, seed: int, base_scores: Mapping[str, float] | None = None
) -> list[list[str]]:
    """The tasks in stage order, split into ``min(k, len(tasks))`` contiguous stages."""
    ordered = list(tasks)
    if order == "random":
        random.Random(seed).shuffle(ordered)
    else:  # heuristic: best-scored by the base first; ties keep the config order
        scores = base_scores or {}
        ordered.sort(key=lambda t: -scores.get(t, 0.0))
    k = min(k, len(ordered))
    sizes = split_evenly(len(ordered), k)
    stages, start = [], 0
    for size in sizes:
        stages.append(ordered[start : start + size])
        start += size
    return stages


def run(ctx: Context) -> dict[str, torch.nn.Module]:
    """Train the stages in order on one model, no parameter frozen."""
    settings = ctx.config.multistage
    stages = stage_tasks(list(ctx.tasks), settings.k, settings.order, ctx.config.run.seed, ctx.base_scores)
    ctx.run.write_json("methods/multistage/stages.json", {"order": settings.order, "stages": stages})

    def build() -> torch.nn.Module:
        model = ctx.fresh_base()
        for i, (names, steps) in enumerate(zip(stages, split_evenly(ctx.steps, len(stages)))):
            ctx.train_stage(model, ctx.examples(names, seed=ctx.config.run.seed + i), f"multistage/stage{i + 1}", steps)
        return model

    return {"multistage": ctx.cached_model("methods/multistage/final", build)}
