"""GaLLoP, SAFT and PaFi: sparse fine-tuning of a selected share of the model's own elements.

1. Gradient: the mean gradient of the training loss on the base model over a subset of the
   training mixture — the first ``sparse.grad_examples`` examples of the seeded mixture, or a
   ``sparse.grad_fraction`` of it — accumulated batch by batch
   (:func:`cpift.train.estimate_gradients`, the training loss on assistant tokens). It is
   computed once for every gradient-based method of the run; PaFi needs none.
2. Selection: the method's score (:data:`cpift.sparse.SCORES`: the method name is the score) and,
   for each ``sparse.density``, the exact top density% (``sparse.scope``). The masks of a method
   are saved bit-packed and deflated in ``methods/<method>/masks.npz`` (key ``density-<d>``), so a
   resumed run selects nothing twice.
3. Training: from the base, on the same mixture and step budget as ``multitask``, only the
   selected elements change: the other elements of a tensor with selected ones are frozen through
   :class:`~cpift.freezing.MaskedOptimizer` (exact, weight decay included), and a tensor with no
   selected element does not train at all (no gradient, no optimizer state).

Cost: :class:`~cpift.freezing.MaskedOptimizer` indexes each tensor by its smaller side, here the
selected elements: for a 1% selection of SmolLM2-135M (134.5M elements, 1.35M selected, by PaFi's
score) it holds 10.8 MB of indices, where indexing the frozen complement held 1.07 GB (both
measured). Each step it copies every tensor with a selected element whole before the update and
puts the frozen elements back from that copy: a transient of about 0.5 GB in float32 (measured
peak: +0.74 GB for the masked step against +0.23 GB for AdamW's step alone), as large as gathering
the frozen values was. The boolean masks given to training take a byte per element (135 MB);
tensors without a selected element cost nothing.

Each density gives one model, labelled ``METHOD@DENSITY`` (``gallop@1``, ``gallop@0.5``, the
density formatted with ``:g``) and saved under ``methods/<method>/density-<d>/final``, so one run
gives the in-distribution vs out-of-distribution view across densities of the GaLLoP paper.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from ..errors import ParameterError
from ..masks import Layout, load_packed, popcount, save_packed, unpack_all
from ..processes import barrier
from ..runs import method_file
from ..selection import SCOPES, top_percent
from ..settings import Float, Section, choice, numbers
from ..sparse import NEEDS_GRADIENT, sparse_scores
from ..train import estimate_gradients
from .common import Context
from .registry import Method, Plan, register

SCORE_METHODS = ("gallop", "saft", "pafi")
"""The sparse methods; each is named after its score in :data:`cpift.sparse.SCORES`."""


def label(method: str, density: float) -> str:
    """The model label of ``method`` at ``density``: ``gallop@1``, ``saft@0.5``."""
    return f"{method}@{density:g}"


def _density_key(density: float) -> str:
    return f"density-{density:g}"


def _masks_relpath(method: str) -> str:
    return method_file(method, "masks.npz")


def subset_size(n: int, fraction: float, count: int) -> int:
    """How many of ``n`` examples the gradient is averaged over: ``count`` if ≥ 1 (at most n),
    else ``fraction`` of n rounded down, at least one."""
    return min(count, n) if count >= 1 else max(1, math.floor(fraction * n))


def selections(ctx: Context, method: str) -> tuple[Layout, dict[str, np.ndarray]]:
    """``method``'s packed masks, one per density (key ``density-<d>``), read or computed once.

    When they are computed, those of every other sparse method of the run are computed with them,
    from the same gradient estimate.
    """
    path = ctx.run.path_for(_masks_relpath(method))
    if not ctx.cached(_masks_relpath(method)):
        settings = ctx.config.sparse
        others = [m for m in ctx.config.run.methods if m in SCORE_METHODS and m != method]
        todo = [m for m in (method, *others) if not ctx.cached(_masks_relpath(m))]
        model = ctx.fresh_base()
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        grads, n = None, 0
        if any(m in NEEDS_GRADIENT for m in todo):
            examples = ctx.examples(list(ctx.tasks), seed=ctx.config.run.seed)
            n = subset_size(len(examples), settings.grad_fraction, settings.grad_examples)
            ctx.run.set_stage("sparse/gradients")
            grads = estimate_gradients(model, ctx.tokenizer, examples[:n], ctx.train_config,
                                       stage="sparse/gradients", progress=ctx.progress)
        for m in todo:
            needs = m in NEEDS_GRADIENT
            layout, scores = sparse_scores(params, grads if needs else None, m)
            masks = {_density_key(d): top_percent(scores, layout, d, settings.scope)[0] for d in settings.density}
            if ctx.run.writes:
                save_packed(ctx.run.path_for(_masks_relpath(m)), masks, layout,
                            {"score": m, "scope": settings.scope, "gradient_examples": str(n if needs else 0)})
        barrier()  # every process reads the masks the main process saved
    layout, masks, _ = load_packed(path)
    return layout, masks


def run(ctx: Context, method: str) -> dict[str, torch.nn.Module]:
    """Select ``method``'s elements on the base model, then train only them, once per density."""
    layout, masks = selections(ctx, method)
    tasks = list(ctx.tasks)
    models = {}
    for density in ctx.config.sparse.density:
        key = _density_key(density)

        def build(words: np.ndarray = masks[key], key: str = key, density: float = density) -> torch.nn.Module:
            if popcount(words) == 0:
                raise ParameterError(f"sparse.density = {density:g} selects no element of the model's "
                                     f"{layout.numel} (floor(density·D/100) = 0); raise it")
            selected = unpack_all(words, layout)
            model = ctx.fresh_base()
            for name, param in model.named_parameters():
                if name in selected and not selected[name].any():
                    param.requires_grad_(False)
            # Negated in place: the selection is not needed again, and a second set of masks would
            # cost another byte per element of the model while training.
            frozen = {name: mask.logical_not_() for name, mask in selected.items() if mask.any()}
            examples = ctx.examples(tasks, seed=ctx.config.run.seed)
            return ctx.train_stage(model, examples, f"{method}/{key}", ctx.steps, frozen=frozen)

        models[label(method, density)] = ctx.cached_model(method_file(method, f"{key}/final"), build)
    return models


Densities = numbers(gt=0, le=100)


class SparseSettings(Section):
    """``[sparse]``: the percent(s) of all parameters trained (one model per density, labelled
    METHOD@DENSITY), the share of the training mixture the gradient is averaged over
    (``grad_fraction``, or ``grad_examples`` examples when ≥ 1), and whether the top density% is
    taken over the model or per tensor (``scope``)."""

    density: Densities = (1.0,)
    grad_fraction: Float = Field(1.0, gt=0, le=1)
    grad_examples: int = Field(0, ge=0)
    scope: Annotated[str, choice(SCOPES)] = "global"


_SUMMARIES = {"gallop": "GaLLoP: trains the top density% by |g| / (|θ| + 1e-8), the rest frozen exactly",
              "saft": "SAFT: trains the top density% by |g|", "pafi": "PaFi: trains the smallest density% by |θ|"}
for _name in SCORE_METHODS:
    register(Method(_name, partial(run, method=_name), _SUMMARIES[_name], "sparse", SparseSettings,
                    plan=lambda c: Plan(len(c.sparse.density) * c.train.steps, len(c.sparse.density))))
