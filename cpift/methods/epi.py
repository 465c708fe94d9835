"""EPI, evolving parameter isolation: a protected set re-selected from online importance.

The tasks train in the same stages as ``multistage`` (``multistage.k`` and ``multistage.order``,
the step budget split evenly), on one model. Throughout, an
:class:`~cpift.sparse.ImportanceTracker` folds every step's gradients into an exponential moving
average of squared gradients (``epi.beta``), normalised within each tensor or layer
(``epi.normalise``). Every ``epi.interval`` optimizer steps (counted over the whole run, not per
stage) and at every stage boundary, the global top ``epi.p``% of that importance becomes the
protected set: elements newly important join it, those no longer important are released. The
protected set is frozen exactly through :class:`~cpift.freezing.MaskedOptimizer` (weight decay
included) until the next refresh. The first refresh comes after ``interval`` steps: before it
nothing has been measured and nothing is protected. Choices the method leaves open are these
(interval, boundary refreshes, the stages) and the tracker's (see :mod:`cpift.sparse`).

Artifacts under ``methods/epi/``: ``masks/step-<n>.npz`` — each refreshed protected set,
bit-packed (:func:`cpift.masks.save_packed`, key ``protected``); ``drift.json`` — the settings,
the stages (``name``, ``tasks``, ``start``, ``steps``) and one record per refresh: ``step``,
``stage`` (where the importance was gathered), ``size``, ``jaccard_previous`` (the
importance-drift curve; null for the first), ``jaccard_first``, ``joined``, ``released``,
``file``. The tracker's state (EMA, current mask, history) is saved in every training checkpoint,
so a resumed run continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import Field

from .. import fsdp
from ..masks import save_packed
from ..runs import EPI_DRIFT, RunDir, epi_mask, method_dir, method_final_dir
from ..settings import Float, Section, choice
from ..sparse import NORMALISATIONS, ImportanceTracker
from ..train import TrainHook
from .common import Context, split_evenly, stage_tasks
from .registry import Method, register


class EpiHook(TrainHook):
    """Feeds an :class:`ImportanceTracker` from training and refreshes the protected set.

    ``offset`` (steps of the earlier stages) and ``stage`` are set by the method before each
    stage; refreshes happen when the run-wide step count is a multiple of ``interval``.
    """

    def __init__(self, tracker: ImportanceTracker, interval: int, run: RunDir, info: Mapping[str, Any]) -> None:
        self.tracker = tracker
        self.interval = interval
        self.run = run
        self.info = dict(info)
        self.offset = 0
        self.stage = ""

    def after_backward(self, model: torch.nn.Module, step: int) -> None:
        # Under FSDP each process holds a shard of each gradient; the importance needs it whole.
        self.tracker.update({name: fsdp.full(p.grad) for name, p in model.named_parameters() if p.grad is not None})

    def after_step(self, step: int) -> dict[str, torch.Tensor] | None:
        at = self.offset + step
        return self.refresh(at) if at % self.interval == 0 else None

    def refresh(self, at: int) -> dict[str, torch.Tensor] | None:
        """Re-select the protected set at run-wide step ``at``; save it and the drift curve."""
        relpath = epi_mask(at)
        self.tracker.refresh(at, stage=self.stage, file=relpath.removeprefix(method_dir("epi") + "/"))
        if self.run.writes:
            save_packed(self.run.path_for(relpath), {"protected": self.tracker.protected},
                        self.tracker.layout, {"step": str(at), "p": repr(self.tracker.p)})
        self.write_drift()
        return self.tracker.frozen()

    def write_drift(self) -> None:
        """Write ``drift.json`` from the tracker's history."""
        self.run.write_json(EPI_DRIFT, {**self.info, "numel": self.tracker.layout.numel, "k": self.tracker.k,
                                    "refreshes": self.tracker.history})

    def frozen(self) -> dict[str, torch.Tensor] | None:
        return self.tracker.frozen()

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state)


def run(ctx: Context) -> dict[str, torch.nn.Module]:
    """Train the stages in order with the protected set refreshed every ``epi.interval`` steps."""
    settings = ctx.config.epi
    ms = ctx.config.multistage
    seed = ctx.config.run.seed
    stages = stage_tasks(list(ctx.tasks), ms.k, ms.order, seed, ctx.base_scores)
    budgets = split_evenly(ctx.steps, len(stages))
    starts = [sum(budgets[:i]) for i in range(len(stages))]
    names = [f"epi/stage{i + 1}" for i in range(len(stages))]

    def build() -> torch.nn.Module:
        model = ctx.fresh_base()
        shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
        tracker = ImportanceTracker(shapes, settings.p, settings.beta, settings.normalise)
        info = {"p": settings.p, "interval": settings.interval, "beta": settings.beta,
                "normalise": settings.normalise, "order": ms.order,
                "stages": [{"name": n, "tasks": t, "start": s, "steps": b}
                           for n, t, s, b in zip(names, stages, starts, budgets)]}
        hook = EpiHook(tracker, settings.interval, ctx.run, info)
        for i, (tasks, steps) in enumerate(zip(stages, budgets)):
            # A new stage starts protecting what mattered at the end of the previous one.
            if tracker.updates and (not tracker.history or tracker.history[-1]["step"] != starts[i]):
                hook.refresh(starts[i])
            hook.offset, hook.stage = starts[i], names[i]
            ctx.train_stage(model, ctx.examples(tasks, seed=seed + i), names[i], steps, frozen=tracker.frozen(),
                            hook=hook)
        hook.write_drift()
        return model

    return {"epi": ctx.cached_model(method_final_dir("epi"), build)}


class EpiSettings(Section):
    """``[epi]``: the protected share ``p`` (percent of all parameters), the refresh ``interval``
    R in optimizer steps (and at every stage boundary), the EMA factor ``beta`` of the squared
    gradients, and the group whose mean importance divides an element's (``normalise``). The
    stages are multistage's (``multistage.k``, ``.order``)."""

    p: Float = Field(1.0, gt=0, le=100)
    interval: int = Field(10, ge=1)
    beta: Float = Field(0.9, ge=0, lt=1)
    normalise: Annotated[str, choice(tuple(NORMALISATIONS))] = "tensor"


register(Method("epi", run, "multistage's stages with the EMA-importance top p% refreshed and frozen exactly",
                "epi", EpiSettings))
