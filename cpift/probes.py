"""How much a probe's core region means: is it reproducible, and had it stopped moving?

A task's core is the top p % of its probe's update |θ_probe − θ_base|. Two measurements say
whether that set is a property of the task or of one short, noisy fine-tune:

- Reliability (test–retest): the task probed again with another data order
  (``probe.repeats``); the Jaccard between the two cores, beside the Jaccard two random sets of
  the same sizes would have (:func:`cpift.overlap.expected_jaccard`). Cross-task overlaps can only
  be read against it: two tasks cannot share more of their cores than a task shares with itself.
- Stability: during the probe, the top-p set every ``probe.snapshot_every`` steps
  (:class:`CoreSnapshots`, bit-packed); the Jaccard of each with the final core. A curve still
  rising at the end means a longer probe would give another core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .masks import popcount
from .overlap import expected_jaccard
from .regions import CoreRegions, core_regions
from .train import TrainHook


def mask_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard of two bit-packed masks (0 when both are empty)."""
    union = popcount(a | b)
    return popcount(a & b) / union if union else 0.0


class CoreSnapshots(TrainHook):
    """A training hook that keeps the top-``p`` set of |θ − θ_base| every ``every`` optimizer steps
    and after the last one, bit-packed (:attr:`snapshots`: step → packed mask), as the probe's
    core would be had it stopped there. Its state is saved with each checkpoint, so a resumed
    probe keeps the snapshots taken before."""

    def __init__(self, base: torch.nn.Module, model: torch.nn.Module, p: float, every: int, steps: int,
                 scope: str = "global") -> None:
        self.base, self.model, self.p, self.every, self.steps, self.scope = base, model, p, every, steps, scope
        self.snapshots: dict[int, np.ndarray] = {}

    def after_step(self, step: int) -> None:
        """Take a snapshot at every ``every``-th step and at the last."""
        if step % self.every == 0 or step == self.steps:
            core = core_regions(self.base, {"probe": self.model}, p=self.p, scope=self.scope, keep_magnitudes=False,
                                progress=False)
            self.snapshots[step] = core.packed("probe").copy()
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": {step: torch.from_numpy(words.view(np.int64)) for step, words in self.snapshots.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.snapshots = {int(step): words.numpy().view(np.uint64).copy() for step, words in state["snapshots"].items()}

    def curve(self) -> pd.DataFrame:
        """:func:`stability` of the snapshots taken."""
        return stability(self.snapshots)


SETTLED_JACCARD = 0.8
"""A core counts as settled when the core at the probe's halfway point already shares at least this
Jaccard with the final one (measured on SmolLM2-135M at p = 1 %: 0.13 at step 10 of 60 with
AdamW, 0.40–0.47 with SGD; 0.56–0.62 and 0.81–0.82 at step 30)."""


def halfway(curve: Mapping[str, Sequence]) -> tuple[int, float, bool]:
    """For one task's stability curve (``step``, ``jaccard_to_final``): the last snapshot step at
    or before half the probe, its Jaccard with the final core, and whether that reaches
    :data:`SETTLED_JACCARD` — a core that still moves more in the probe's second half was not
    yet stable."""
    steps, values = list(curve["step"]), list(curve["jaccard_to_final"])
    before = [i for i, step in enumerate(steps) if step <= steps[-1] / 2] or [0]
    i = before[-1]
    return int(steps[i]), float(values[i]), float(values[i]) >= SETTLED_JACCARD


def stability(snapshots: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """Jaccard of the core at each snapshot step with the core at the last one: columns ``step``
    and ``jaccard_to_final`` (1 at the last step), in step order."""
    steps = sorted(snapshots)
    final = snapshots[steps[-1]]
    return pd.DataFrame({"step": steps, "jaccard_to_final": [mask_jaccard(snapshots[s], final) for s in steps]})


def reliability(primary: CoreRegions, retests: Sequence[CoreRegions] | Mapping[int, CoreRegions],
                by: str = "repeat") -> pd.DataFrame:
    """Each task's test–retest Jaccard: its core against the core of each other probe of it (same
    layout and p), beside chance.

    Args:
        primary: the cores of the first probes.
        retests: the cores of the repeated probes — a sequence (``retests[i]``: the (i + 2)-th
            probe of every task, ``probe.repeats``) or a mapping from a label (another seed of
            the run) to its cores.
        by: the name of the label column.

    Returns columns ``task``, ``by`` (2, 3, … or the mapping's keys), ``jaccard``, ``expected``
    (two random sets of the cores' sizes, :func:`~cpift.overlap.expected_jaccard`), ``lift``
    (jaccard / expected).
    """
    labelled = retests.items() if isinstance(retests, Mapping) else ((i + 2, r) for i, r in enumerate(retests))
    rows = []
    d = primary.layout.numel
    for label, retest in labelled:
        for task in primary.tasks:
            if task not in retest.tasks:
                continue
            a, b = primary.packed(task), retest.packed(task)
            observed, chance = mask_jaccard(a, b), expected_jaccard(popcount(a), popcount(b), d)
            rows.append({"task": task, by: label, "jaccard": observed, "expected": chance,
                         "lift": observed / chance if chance else float("nan")})
    return pd.DataFrame(rows, columns=["task", by, "jaccard", "expected", "lift"])
