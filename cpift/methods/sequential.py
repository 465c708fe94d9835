"""The forgetting study of the paper's Table 2: task A, then task B.

One model is trained on A (``sequential/after_A``); from it, each variant trains on B with the
same step budget:

- ``multitask`` (Full SFT): B alone, nothing frozen — the plain sequential baseline.
- ``multistage``: B with a balanced replay of A's data mixed in, nothing frozen.
- ``cpift``: B alone with A's core region (the top p% of the A model's update) frozen exactly.

ΔA (score on A after B minus after A) measures forgetting, ΔB (after B minus the base) learning;
:func:`cpift.evaluate.summarize` reports them from the scores of the models returned here.
"""

from __future__ import annotations

import torch

from ..regions import core_regions
from .common import Context

VARIANTS = ("multitask", "multistage", "cpift")


def run(ctx: Context) -> dict[str, torch.nn.Module]:
    """Train A, then each configured variant on B; returns ``seq:after_A`` and ``seq:<variant>``."""
    settings = ctx.config.sequential
    first, second = settings.first, settings.second
    seed = ctx.config.run.seed
    after_a = ctx.cached_model(
        "sequential/after_A",
        lambda: ctx.train_stage(ctx.fresh_base(), ctx.examples([first], seed=seed), f"sequential/{first}", ctx.steps),
    )
    state_a = {n: t.detach().clone() for n, t in after_a.state_dict().items()}
    models = {"seq:after_A": after_a}
    for variant in settings.methods:

        def build(variant: str = variant) -> torch.nn.Module:
            model = ctx.fresh_base()
            model.load_state_dict(state_a)
            frozen = None
            if variant == "cpift":
                core = core_regions(ctx.base_model, {first: after_a}, p=ctx.config.cpift.p, keep_magnitudes=False)
                frozen = core.mask(first)
            tasks = [second, first] if variant == "multistage" else [second]
            per_task = len(ctx.tasks[second].train) if variant == "multistage" else None
            ctx.train_stage(model, ctx.examples(tasks, per_task=per_task, seed=seed), f"sequential/{variant}",
                            ctx.steps, frozen=frozen)
            return model

        models[f"seq:{variant}"] = ctx.cached_model(f"sequential/{variant}", build)
    return models
