"""A terminal tour of the core library on the embedded model (what ``make app`` runs for now).

It fine-tunes three short probes of SmolLM2-135M on three tiny, different corpora (a few AdamW
steps each — real updates, not noise), then walks CPI-FT's analysis: core regions, overlap,
grouping, fusion and exact freezing, printing what each step finds and how long it took.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from .freezing import MaskedOptimizer
from .fusion import fuse
from .grouping import group_tasks, groupings_by_tau, stage_order
from .models import EMBEDDED_MODEL, load_model
from .regions import core_regions

CORPORA = {
    "math": [f"Question: what is {a} plus {b}? Answer: {a + b}." for a, b in [(12, 7), (31, 45), (8, 99), (56, 23)]],
    "code": [f"def add_{n}(x):\n    return x + {n}\n" for n in (1, 2, 3, 4)],
    "prose": ["The river wound slowly through the quiet valley at dawn.",
              "She opened the old letter and read it twice before smiling.",
              "Autumn leaves gathered along the edge of the stone path.",
              "The museum closes early on Sundays during the winter."],
}
T = TypeVar("T")


def _timed(label: str, work: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = work()
    print(f"  {label}: {time.perf_counter() - start:.2f} s")
    return result


def _probe(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int) -> torch.nn.Module:
    """A copy of ``model`` after ``steps`` AdamW steps on one batch (a tiny probe fine-tune)."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    for _ in range(steps):
        probe(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return probe.eval()


def run_demo(p: float = 1.0, tau: float = 0.1, steps: int = 3) -> None:
    """Run the tour and print its findings."""
    torch.manual_seed(0)
    print(f"cpift demo on the embedded model {EMBEDDED_MODEL!r}")
    model, tokenizer = _timed("load model", lambda: load_model(EMBEDDED_MODEL))
    batches = {task: tokenizer(texts, return_tensors="pt", padding=True) for task, texts in CORPORA.items()}
    probes = {task: _timed(f"probe '{task}' ({steps} AdamW steps)", lambda b=b: _probe(model, b, steps))
              for task, b in batches.items()}

    print(f"\n1. Core regions at p = {p}%")
    regions = _timed("core regions", lambda: core_regions(model, probes, p=p))
    for task in regions.tasks:
        print(f"  {task:6s} {regions.size(task):>9,} elements, |Δθ| ≥ {regions.threshold(task):.3g}")
    similarity = regions.jaccard()
    print("\n2. Jaccard of the cores\n" + similarity.round(3).to_string())
    by_layer = regions.layer_jaccard("layer")
    top = by_layer.sort_values("jaccard", ascending=False).head(3)
    print("  most shared layers: " + ", ".join(f"{r.group} ({r.task_a}/{r.task_b} {r.jaccard:.2f})" for r in top.itertuples()))

    print(f"\n3. Grouping at τ = {tau}")
    groups = group_tasks(similarity, tau)
    print(f"  groups: {groups}; stage order (least overlap first): "
          f"{stage_order(groups, 'least_overlap_first', similarity)}")
    for g in groupings_by_tau(similarity):
        print(f"  τ in ({g.tau_min:.3f}, {g.tau_max:.3f}]: {[list(x) for x in g.groups]}")

    print("\n4. Fusion (core transplant + SLERP, ω = 0.5)")
    fused = _timed("fuse", lambda: fuse(model, probes, regions))
    report = fused.report
    print(f"  contested elements: {int(report['contested'].sum()):,}; taken from each core: "
          + ", ".join(f"{t} {int(report[f'from:{t}'].sum()):,}" for t in regions.tasks))
    fused_model = copy.deepcopy(model)
    fused_model.load_state_dict(fused, strict=False)
    prompt = tokenizer("Question: what is 20 plus 22? Answer:", return_tensors="pt")
    for label, m in (("base", model), ("fused", fused_model)):
        out = m.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        print(f"  {label:5s} → {tokenizer.decode(out[0, prompt['input_ids'].shape[1]:])!r}")

    first = stage_order(groups, "least_overlap_first", similarity)[0]
    print(f"\n5. Exact freezing: one AdamW step on 'prose' data with the cores of {first} frozen")
    frozen = {name: torch.zeros_like(param, dtype=torch.bool) for name, param in fused_model.named_parameters()}
    for task in first:
        for name, mask in regions.mask(task).items():
            frozen[name] |= mask
    before = {n: p.detach().clone() for n, p in fused_model.named_parameters()}
    fused_model.train()
    optimizer = MaskedOptimizer(torch.optim.AdamW(fused_model.parameters(), lr=1e-4, weight_decay=0.1),
                                fused_model, frozen)
    fused_model(**batches["prose"], labels=batches["prose"]["input_ids"]).loss.backward()
    _timed("masked step", optimizer.step)
    params = dict(fused_model.named_parameters())
    still = all(torch.equal(params[n][m], before[n][m]) for n, m in frozen.items())
    moved = sum(int((params[n] != before[n]).sum()) for n in frozen)
    print(f"  frozen elements bit-identical: {still}; elements that moved: {moved:,} "
          f"of {sum(p.numel() for p in params.values()):,}")
