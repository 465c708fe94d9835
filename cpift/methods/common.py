"""What every method needs: the run, the tasks, a fresh base model, and budgeted training.

A method is a function ``run(ctx) -> dict[str, str]`` that trains and saves its final model(s)
under the run directory and returns label → saved model path (relative to the run). The
:class:`Context` gives each method the same budget and the same data, so comparisons are fair,
and makes every step resumable: a step whose artifact exists is not done again.
"""

from __future__ import annotations

import copy
import random
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..data.tasks import Example, Task
from ..models import WEIGHTS_FILE, load_weights, save_weights
from ..processes import barrier, from_main
from ..runs import RunDir, checkpoint_root
from ..settings import TrainConfig
from ..train import TrainHook, train

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class Context:
    """Everything a method sees: config, run directory, tasks, the base model and the budget."""

    config: Config
    run: RunDir
    tasks: dict[str, Task]
    base_model: torch.nn.Module
    tokenizer: object
    train_config: TrainConfig
    base_scores: dict[str, float] = field(default_factory=dict)
    resume: bool = False
    progress: bool | None = None
    _base_state: dict[str, torch.Tensor] = field(init=False, repr=False)
    _stage_checkpoints: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._base_state = {n: t.detach().clone() for n, t in self.base_model.state_dict().items()}

    @property
    def steps(self) -> int:
        """The optimizer-step budget every method gets."""
        return self.train_config.steps

    def fresh_base(self) -> torch.nn.Module:
        """A copy of the base model, untouched by earlier steps."""
        model = copy.deepcopy(self.base_model)
        model.load_state_dict(self._base_state)
        return model

    def examples(self, task_names: Sequence[str], per_task: int | None = None, seed: int = 0) -> list[Example]:
        """Training examples of ``task_names``, balanced: ``per_task`` from each (default all), shuffled."""
        rng = random.Random(seed)
        chosen: list[Example] = []
        for name in task_names:
            pool = list(self.tasks[name].train)
            rng.shuffle(pool)
            chosen.extend(pool[:per_task] if per_task else pool)
        rng.shuffle(chosen)
        return chosen

    def train_stage(
        self,
        model: torch.nn.Module,
        examples: Sequence[Example],
        stage: str,
        steps: int,
        frozen: Mapping[str, torch.Tensor] | None = None,
        lr: float | None = None,
        hook: TrainHook | None = None,
        optimizer: str | None = None,
    ) -> torch.nn.Module:
        """Train ``model`` in place for ``steps`` optimizer steps (``lr`` and ``optimizer``: other
        than the run's); events and checkpoints go to the run."""
        overrides = {"lr": lr, "optimizer": optimizer}
        settings = self.train_config.model_copy(update={"steps": steps, **{k: v for k, v in overrides.items() if v}})
        checkpoint_dir = self.run.path_for(checkpoint_root(stage))
        self._stage_checkpoints.append(checkpoint_dir)
        self.run.set_stage(stage)
        train(model, self.tokenizer, examples, settings, frozen=frozen, stage=stage, checkpoint_dir=checkpoint_dir,
              resume=self.resume, on_event=lambda event: self.run.log_event(**event), progress=self.progress,
              hook=hook)
        return model

    def cached(self, relpath: str) -> bool:
        """Whether an earlier run left the artifact ``relpath`` (the main process's answer in every
        process of a data-parallel run, so that all take the same path)."""
        return from_main(self.run.exists(relpath))

    def cached_model(self, relpath: str, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The model saved at ``relpath`` if a finished earlier run left it, else ``build()`` saved there."""
        directory = self.run.path_for(relpath)
        if self.cached(f"{relpath}/{WEIGHTS_FILE}"):
            return load_weights(self.fresh_base(), directory)
        model = build()
        if self.run.writes:
            save_weights(model, directory)
            # The stages behind this model can no longer be resumed into: their checkpoints go.
            if not self.config.train.keep_checkpoints:
                for checkpoint_dir in self._stage_checkpoints:
                    shutil.rmtree(checkpoint_dir, ignore_errors=True)
        self._stage_checkpoints.clear()
        barrier()  # no process reads the model's directory before it is complete
        return model


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
