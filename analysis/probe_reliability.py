"""How long must a probe be for its core to mean something? Reliability and stability by length.

Run from the repository root (about 25 minutes on 2 CPU cores with the defaults)::

    .venv/bin/python analysis/probe_reliability.py --out ~/cpift-runs/probe-reliability
    .venv/bin/python analysis/probe_reliability.py --tasks math logic --steps 80 --every 10 \\
        --optimizers adamw:1e-4 sgd:0.05 --out DIR

On the embedded SmolLM2-135M-Instruct, every task is probed twice from the base (two data
orders), once per optimizer, with :class:`cpift.probes.CoreSnapshots` keeping the top-p set every
``--every`` steps. One pass gives, at every probe length t (a snapshot step):

- test–retest: the Jaccard between the two probes' cores of the same task at step t;
- cross-task: the Jaccard between two tasks' cores (first probes) at step t;
- stability: the Jaccard of a probe's core at step t with its core at the last step;
- chance: the Jaccard two random sets of the cores' sizes would have
  (:func:`cpift.overlap.expected_jaccard`).

A probe length is long enough when the test–retest Jaccard is well above both chance and the
cross-task Jaccard, and the stability curve has flattened. Writes ``curves.csv`` (one row per
optimizer, step and measure) and prints a table for README.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import random
import time
from pathlib import Path

import pandas as pd

from cpift.data import get_task
from cpift.masks import popcount
from cpift.models import load_model
from cpift.overlap import expected_jaccard
from cpift.probes import CoreSnapshots, mask_jaccard
from cpift.settings import TrainConfig
from cpift.train import train


def probe_snapshots(base, tokenizer, examples, optimizer: str, lr: float, steps: int, every: int, p: float,
                    seed: int) -> tuple[dict, list[float]]:
    """One probe of ``examples`` in the order of ``seed``: its snapshots and its losses."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    model = copy.deepcopy(base)
    snapshots = CoreSnapshots(base, model, p, every, steps)
    losses: list[float] = []
    settings = TrainConfig(steps=steps, lr=lr, optimizer=optimizer, warmup_steps=2, batch_size=4, max_length=256,
                           seed=seed, device="cpu", checkpoint_every=0)
    train(model, tokenizer, order, settings, hook=snapshots, progress=False,
          on_event=lambda e: losses.append(e["loss"]) if e.get("event") == "step" else None)
    return snapshots.snapshots, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["math", "logic"], help="embedded tasks (default math logic)")
    parser.add_argument("--steps", type=int, default=80, help="probe length (default 80)")
    parser.add_argument("--every", type=int, default=10, help="snapshot interval (default 10)")
    parser.add_argument("--p", type=float, default=1.0, help="core size in percent (default 1)")
    parser.add_argument("--optimizers", nargs="+", default=["adamw:1e-4", "sgd:0.05"],
                        help="optimizer:lr pairs (default adamw:1e-4 sgd:0.05)")
    parser.add_argument("--n-train", type=int, default=64, help="training examples per task (default 64)")
    parser.add_argument("--out", type=Path, required=True, help="directory for curves.csv")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model("smollm2-135m")
    d = sum(param.numel() for param in base.parameters())
    rows = []
    for spec in args.optimizers:
        optimizer, lr = spec.split(":")
        cores: dict[tuple[str, int], dict] = {}
        for task, repeat in itertools.product(args.tasks, (1, 2)):
            examples = get_task(task, n_train=args.n_train, n_eval=0, seed=0).train
            start = time.perf_counter()
            cores[task, repeat], losses = probe_snapshots(base, tokenizer, examples, optimizer, float(lr), args.steps,
                                                          args.every, args.p, seed=repeat)
            print(f"{spec} {task} probe {repeat}: loss {losses[0]:.3f} → {losses[-1]:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        for step in sorted(cores[args.tasks[0], 1]):
            def add(measure: str, a, b) -> None:
                chance = expected_jaccard(popcount(a), popcount(b), d)
                rows.append({"optimizer": spec, "step": step, "measure": measure, "jaccard": mask_jaccard(a, b),
                             "chance": chance})
            for task in args.tasks:
                add(f"retest:{task}", cores[task, 1][step], cores[task, 2][step])
                add(f"stability:{task}", cores[task, 1][step], cores[task, 1][args.steps])
            for first, second in itertools.combinations(args.tasks, 2):
                add(f"cross:{first}-{second}", cores[first, 1][step], cores[second, 1][step])
        pd.DataFrame(rows).to_csv(args.out / "curves.csv", index=False)
    table = pd.DataFrame(rows)
    table["lift"] = table.jaccard / table.chance
    wide = table.pivot_table(index=["optimizer", "step"], columns="measure", values="jaccard")
    chance = table.groupby(["optimizer", "step"]).chance.mean().rename("chance")
    print(pd.concat([wide, chance], axis=1).round(4).to_string())


if __name__ == "__main__":
    main()
