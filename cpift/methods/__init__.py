"""The fine-tuning methods, each a ``run(ctx) -> {label: model}`` over a shared :class:`Context`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from . import cpift, epi, lora, multistage, multitask, sequential, sparse
from .common import Context

METHODS: dict[str, Callable[[Context], dict[str, torch.nn.Module]]] = {
    "cpift": cpift.run,
    "multitask": multitask.run,
    "multistage": multistage.run,
    "sequential": sequential.run,
    "lora": lora.run_lora,
    "dora": lora.run_dora,
    "epi": epi.run,
    **{method: partial(sparse.run, method=method) for method in sparse.SCORE_METHODS},
}
"""Method name (as in a config's ``run.methods``) → its runner."""

__all__ = ["METHODS", "Context"]
