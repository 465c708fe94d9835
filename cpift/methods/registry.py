"""The method registry: every fine-tuning method declared once, and everything else derived from it.

A method is a :class:`Method`: its name (as in a config's ``run.methods``), its runner
``run(ctx) -> {label: model}``, the config section of its settings (a
:class:`~cpift.settings.Section` declared in the method's own file; methods may share one, as
LoRA and DoRA share ``[lora]``), and its plan — the optimizer steps it trains and the models it
scores for a config — from which run estimates and progress are computed. The config schema
(:mod:`cpift.config`), the command line's choices, the launcher's estimate and the app's lists all
read :data:`METHODS`, as mergekit's merge methods declare their own parameters and peft's methods
register themselves.

Adding a method: a file in ``cpift/methods/`` that defines its settings section (if any), its
runner and its plan and ends with ``register(Method(...))``, plus its name in the import line of
``cpift/methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..settings import Section
    from .common import Context

__all__ = ["METHODS", "Method", "Plan", "register", "sections"]


@dataclass(frozen=True)
class Plan:
    """What a method does for a config: optimizer steps trained and models scored."""

    steps: int
    models: int


@dataclass(frozen=True)
class Method:
    """One fine-tuning method (see the module docstring).

    Attributes:
        name: its name in ``run.methods``.
        run: trains the method's models into the run directory; ``{label: model}`` to score.
        plan: its :class:`Plan` for a (validated) config; the default trains one model with the
            step budget ``train.steps``.
        section: the config section holding its settings, or ``None``.
        settings: that section's model (declared in the method's file).
        summary: one line saying what it trains.
    """

    name: str
    run: Callable[[Context], dict[str, torch.nn.Module]]
    summary: str
    section: str | None = None
    settings: type[Section] | None = None
    plan: Callable[[Any], Plan] = lambda config: Plan(config.train.steps, 1)


METHODS: dict[str, Method] = {}
"""Method name → its declaration, in registration order."""


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (a name registers once; a section has one settings model)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    if (method.section is None) != (method.settings is None):
        raise ValueError(f"method {method.name!r}: give both section and settings, or neither")
    owner = sections().get(method.section) if method.section else None
    if owner is not None and owner is not method.settings:
        raise ValueError(f"section [{method.section}] has another settings model already")
    METHODS[method.name] = method
    return method


def sections() -> dict[str, type[Section]]:
    """The methods' settings sections, by section name, in registration order."""
    return {m.section: m.settings for m in METHODS.values() if m.section is not None}
