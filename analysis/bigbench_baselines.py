"""How the base model scores on candidate BIG-bench tasks, beside chance: where a preset can start.

Run from the repository root (fetches the BIG-bench sdist once)::

    .venv/bin/python analysis/bigbench_baselines.py                       # the default candidates
    .venv/bin/python analysis/bigbench_baselines.py --items 200 logical_deduction/three_objects

For each task: its multiple-choice evaluation items (seed 0, as a run with ``data.seed = 0``
draws them) scored by log-likelihood on the embedded SmolLM2-135M-Instruct, the accuracy with its
95 % Wilson interval, the chance level (the mean over items of correct options / options) and
whether the interval lies above it. A task whose base accuracy is indistinguishable from chance
may still be learnable; one far above chance leaves room to improve only if it is not near 1.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import binomtest

from cpift.data import get_task
from cpift.evaluate import score_task
from cpift.models import load_model

CANDIDATES = (
    "elementary_math_qa/question_only", "unit_conversion/si_conversion", "unit_conversion/unit_identification",
    "logical_deduction/three_objects", "formal_fallacies_syllogisms_negation", "logical_fallacy_detection",
    "navigate", "hyperbaton", "sports_understanding", "winowhy", "social_iqa", "intent_recognition",
    "date_understanding", "strategyqa", "movie_recommendation", "implicatures",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="*", default=CANDIDATES, help="BIG-bench task paths")
    parser.add_argument("--items", type=int, default=100, help="evaluation items per task (default 100)")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m")
    print("| task | n | options | chance | accuracy [95% CI] | acc_norm | above chance | s |")
    print("|---|---:|---:|---:|---|---:|---|---:|")
    for path in args.tasks:
        task = get_task(f"bigbench:{path}", n_train=0, n_eval=args.items, seed=0)
        start = time.perf_counter()
        result = score_task(model, tokenizer, task, batch_size=8)
        seconds = time.perf_counter() - start
        k, n = int(sum(result.scores)), result.n
        low, high = binomtest(k, n).proportion_ci(method="wilson")
        chance = float(np.mean([len(e.correct) / len(e.options) for e in task.eval]))
        options = np.mean([len(e.options) for e in task.eval])
        print(f"| {path} | {n} | {options:.1f} | {chance:.2f} | {k / n:.2f} [{low:.2f}, {high:.2f}] "
              f"| {result.score_norm:.2f} | {'yes' if low > chance else 'no'} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
