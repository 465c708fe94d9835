"""The fine-tuning methods, each a ``run(ctx) -> {label: model}`` over a shared :class:`Context`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import cpift, multistage, multitask, sequential
from .common import Context

METHODS: dict[str, Callable[[Context], dict[str, torch.nn.Module]]] = {
    "cpift": cpift.run,
    "multitask": multitask.run,
    "multistage": multistage.run,
    "sequential": sequential.run,
}
"""Method name (as in a config's ``run.methods``) → its runner."""

__all__ = ["METHODS", "Context"]
