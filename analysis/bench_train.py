"""Training and scoring speed on the embedded model, beside a peer and the naive way, in one run.

Run from the repository root (a quiet machine; about 3 minutes on 2 CPU cores)::

    .venv/bin/python analysis/bench_train.py
    .venv/bin/python analysis/bench_train.py --steps 12 --items 48

Training: SmolLM2-135M-Instruct (fp32, CPU), the embedded ``math`` task's training examples cut
to 128 tokens, batch 4, AdamW at lr 1e-4 with no warm-up, no evaluation and no checkpoints,
``--steps`` optimizer steps after one untimed warm-up step, three ways from the same weights, in
``--rounds`` rounds (each in a rotated order; medians reported, and each way's range of speed-ups
over the rounds, since one round on a 2-core machine can be off by 20 %):

* ``cpift.train`` — the LM head and cross-entropy at the labelled positions only, fused AdamW,
  length-grouped batches;
* cpift's loop before those changes — written out here: full logits and cross-entropy, torch's
  default AdamW, batches in plain seeded order;
* ``transformers.Trainer`` — the same tokenized examples, batch, lr and its default optimizer
  (fused AdamW in this transformers), padding per batch by its collator.

Tokens/s counts non-padding input tokens. Achieved GFLOP/s is 6 × parameters × tokens processed
(padded positions included; the LM head counted only where cpift applies it) over the time,
beside the fp32 matmul peak measured here at the model's MLP shape.

Scoring: the embedded ``logic`` task's evaluation items (four options each), scored by
log-likelihood (:func:`cpift.evaluate.choice_logprobs`) and by greedy generation of the answer
(32 new tokens at most, batch 8, as cpift scored them before), items/s each.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from cpift.data import get_task
from cpift.data.chat import IGNORE_INDEX, collate, pad_token_id, tokenize_examples
from cpift.evaluate import choice_logprobs, generate
from cpift.models import load_model
from cpift.settings import TrainConfig
from cpift.train import train

BATCH, MAX_LENGTH, LR = 4, 128, 1e-4


def matmul_peak_gflops(hidden: int, inner: int, tokens: int = 512, repeat: int = 20) -> float:
    """fp32 GFLOP/s of the model's largest matmul shape (tokens × hidden @ hidden × inner), best of runs."""
    a, b = torch.randn(tokens, hidden), torch.randn(hidden, inner)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * tokens * hidden * inner / best / 1e9


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def naive_loop(model: torch.nn.Module, data: list, pad_id: int, steps: int) -> tuple[float, int, int]:
    """cpift's loop before this change: full logits, default AdamW, plain seeded order.
    Returns (seconds of the timed steps, non-padding tokens, padded positions)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist() * (steps + 2)
    seconds = tokens = positions = 0
    model.train()
    for step in range(steps + 1):
        batch = collate([data[i] for i in order[step * BATCH:(step + 1) * BATCH]], pad_id)
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum") / (labels != IGNORE_INDEX).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step:  # the first step is a warm-up (AdamW creates its state)
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
            positions += batch["input_ids"].numel()
    return seconds, tokens, positions


def cpift_loop(model: torch.nn.Module, tokenizer, examples: list, steps: int) -> tuple[float, int, int]:
    """``cpift.train`` for ``steps`` + 1 steps, timed from the end of the first step (its events'
    clock) to the end of the last; (seconds, non-padding tokens of the timed steps, the same again:
    train() does not report its padded positions, so FLOPs count the non-padding ones)."""
    config = TrainConfig(lr=LR, warmup_steps=0, steps=steps + 1, batch_size=BATCH, max_length=MAX_LENGTH,
                         checkpoint_every=0, device="cpu")
    marks: list[tuple[float, int]] = []
    train(model, tokenizer, examples, config, progress=False,
          on_event=lambda e: marks.append((time.perf_counter(), e["tokens"])) if e["event"] == "step" else None)
    (t0, tokens0), (t1, tokens1) = marks[0], marks[-1]
    return t1 - t0, tokens1 - tokens0, tokens1 - tokens0


def trainer_loop(model: torch.nn.Module, tokenizer, data: list, steps: int) -> tuple[float, int, int]:
    """``transformers.Trainer`` (its default optimizer) on the same tokenized examples; (seconds,
    non-padding tokens, the same again for the FLOPs)."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.begin: float | None = None
            self.total = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > 1:  # the first step is a warm-up
                self.total += time.perf_counter() - self.begin

    pad_id = pad_token_id(tokenizer)
    dataset = Dataset.from_list([{"input_ids": d["input_ids"], "labels": d["labels"]} for d in data])

    batch_tokens: list[int] = []  # in the order the batches are made (one ahead at most), = trained

    def counting(rows):
        batch = collate(rows, pad_id)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps + 1,
                                 learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no",
                                 logging_strategy="no", report_to=[], use_cpu=True, seed=0,
                                 dataloader_num_workers=0, remove_unused_columns=False)
        timer = StepTimes()
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting, callbacks=[timer])
        trainer.train()
        tokens = sum(batch_tokens[1:steps + 1])
        return timer.total, tokens, tokens


def trainer_optimizer() -> str:
    """The optimizer ``transformers.Trainer`` uses by default in the installed version."""
    from transformers import TrainingArguments

    with tempfile.TemporaryDirectory() as out:
        return str(TrainingArguments(output_dir=out, use_cpu=True, report_to=[]).optim.value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per way (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three training ways (default 3)")
    parser.add_argument("--items", type=int, default=40, help="multiple-choice items scored (default 40)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    base, tokenizer = load_model("smollm2-135m")
    n_params = sum(p.numel() for p in base.parameters())
    examples = list(get_task("math", n_train=64, n_eval=1).train)
    data, _ = tokenize_examples(tokenizer, examples, MAX_LENGTH, "bench")
    pad_id = pad_token_id(tokenizer)
    config = base.config
    peak = matmul_peak_gflops(config.hidden_size, config.intermediate_size)

    # Each round runs the three ways from the same weights, in a rotated order (so that no way is
    # always the first, cold one); the table reports each way's median over the rounds and the
    # range of its per-round ratio to the Trainer, which is what separates a speed-up from noise.
    ways = {
        "cpift loop before (full logits, default AdamW, plain order)":
            lambda model: naive_loop(model, data, pad_id, args.steps),
        "cpift.train (head at labelled tokens, fused AdamW, length-grouped)":
            lambda model: cpift_loop(model, tokenizer, examples, args.steps),
        "transformers.Trainer": lambda model: trainer_loop(model, tokenizer, data, args.steps),
    }
    names = list(ways)
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            runs[name].append(ways[name](copy.deepcopy(base)))
    trainer_rates = [tokens / seconds for seconds, tokens, _ in runs["transformers.Trainer"]]

    task = get_task("logic", n_train=1, n_eval=args.items)
    prompts, options = [e.prompt for e in task.eval], [e.options for e in task.eval]
    base.eval()
    mc_s = _timed(lambda: choice_logprobs(base, tokenizer, prompts, options, batch_size=8))
    gen_s = _timed(lambda: generate(base, tokenizer, prompts, max_new_tokens=32, batch_size=8))
    load_after = os.getloadavg()[0]

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; load average {load_before:.2f} at the start, {load_after:.2f} at the end")
    print(f"model: SmolLM2-135M-Instruct fp32, {n_params:,} parameters; fp32 matmul peak here "
          f"{peak:.0f} GFLOP/s ({512}×{config.hidden_size} @ {config.hidden_size}×{config.intermediate_size})")
    print()
    print(f"Training, {args.steps} steps of batch {BATCH} × ≤ {MAX_LENGTH} tokens (embedded math), "
          f"median of {args.rounds} rounds:")
    print()
    print("| way | s/step | tokens/s | vs Trainer (median, range over rounds) | GFLOP/s (≤) |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        seconds = statistics.median(s for s, _, _ in runs[name])
        rate = statistics.median(t / s for s, t, _ in runs[name])
        flops = statistics.median(6 * n_params * f / s for s, _, f in runs[name])
        ratios = [t / s / trainer for (s, t, _), trainer in zip(runs[name], trainer_rates)]
        label = f"{name} ({trainer_optimizer()})" if name == "transformers.Trainer" else name
        print(f"| {label} | {seconds / args.steps:.2f} | {rate:.0f} | {statistics.median(ratios):.2f}× "
              f"({min(ratios):.2f}–{max(ratios):.2f}) | {flops / 1e9:.0f} |")
    print()
    print(f"Scoring {args.items} four-option items (embedded logic):")
    print()
    print("| way | s | items/s | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| greedy generation, ≤ 32 new tokens, batch 8 | {gen_s:.1f} | {args.items / gen_s:.2f} | 1.00× |")
    print(f"| log-likelihood of the options (choice_logprobs), batch 8 | {mc_s:.1f} | {args.items / mc_s:.2f} "
          f"| {gen_s / mc_s:.2f}× |")
    print()
    print("GFLOP/s = 6 × parameters × non-padding tokens / s (the loop before: × all positions); an upper "
          "bound of the useful rate, beside the matmul peak.")


if __name__ == "__main__":
    main()
