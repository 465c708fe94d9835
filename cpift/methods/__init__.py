"""The fine-tuning methods. Each module declares its methods — settings section, runner, plan — and
registers them in :data:`~cpift.methods.registry.METHODS` when imported (see
:mod:`cpift.methods.registry` for adding one)."""

from __future__ import annotations

# Importing a method's module registers it; this line's order is the registry's (and the config's
# sections') order, so it is kept by hand rather than sorted.
from . import cpift, multitask, multistage, sequential, lora, epi, sparse  # noqa: F401, I001
from .common import Context
from .registry import METHODS, Method, Plan, register

__all__ = ["METHODS", "Context", "Method", "Plan", "register"]
