"""The forgetting study of the paper's Table 2: task A, then task B.

One model is trained on A (``sequential/after_A``); from it, each variant trains on B with the
same step budget:

- ``multitask`` (Full SFT): B alone, nothing frozen — the plain sequential baseline.
- ``multistage``: B with a balanced replay of A's data mixed in, nothing frozen.
- ``cpift``: B alone with A's core region (the top p% of the A model's update) frozen exactly.

ΔA (score on A after B minus after A) measures forgetting, ΔB (after B minus the base) learning;
:func:`cpift.scores.summarize` reports them from the scores of the models returned here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..regions import core_regions
from ..runs import sequential_dir
from ..settings import ConfigError, Section, Text, names_of, suggest
from .common import Context
from .registry import Method, Plan, register

VARIANTS = ("multitask", "multistage", "cpift")


class SequentialSettings(Section):
    """``[sequential]``: the forgetting experiment, ``first`` then ``second`` by each of ``methods``
    (defaults: the first two of ``data.tasks``, every variant)."""

    first: Text | None = None
    second: Text | None = None
    methods: names_of(VARIANTS) = VARIANTS

    def resolve(self, config: Any) -> SequentialSettings:
        tasks = config.data.tasks
        if "sequential" in config.run.methods and len(tasks) < 2:
            raise ConfigError("run.methods", "'sequential' needs at least two tasks in data.tasks")
        update = {}
        for i, slot in enumerate(("first", "second")):
            task = getattr(self, slot)
            if task is None:
                update[slot] = tasks[i] if i < len(tasks) else None
            elif task not in tasks:
                hint = suggest(task, tasks)
                raise ConfigError(f"sequential.{slot}", f"{task!r} is not in data.tasks ({', '.join(tasks)})"
                                  + (f"; did you mean {hint!r}?" if hint else ""))
        resolved = self.model_copy(update=update)
        if resolved.first is not None and resolved.first == resolved.second:
            raise ConfigError("sequential.second", f"must differ from sequential.first ({resolved.first!r})")
        return resolved


def run(ctx: Context) -> dict[str, torch.nn.Module]:
    """Train A, then each configured variant on B; returns ``seq:after_A`` and ``seq:<variant>``."""
    settings = ctx.config.sequential
    first, second = settings.first, settings.second
    seed = ctx.config.run.seed
    after_a = ctx.cached_model(
        sequential_dir("after_A"),
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

        models[f"seq:{variant}"] = ctx.cached_model(sequential_dir(variant), build)
    return models


register(Method("sequential", run, "task A, then task B by Full SFT, with A replayed, or with A's core frozen",
                "sequential", SequentialSettings,
                plan=lambda c: Plan((1 + len(c.sequential.methods)) * c.train.steps, 1 + len(c.sequential.methods))))
