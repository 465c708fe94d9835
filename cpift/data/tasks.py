"""What a task is: chat examples to train and evaluate on, and how an answer is scored.

Every data source (the embedded offline suite, the paper's real datasets, a user's own files)
produces :class:`Task` objects, so training and evaluation never care where data came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
"""One chat turn: ``{"role": "system" | "user" | "assistant", "content": "..."}``."""


@dataclass(frozen=True)
class Example:
    """One chat example.

    ``messages`` ends with the assistant's reference answer for training examples; for scoring,
    the prompt is every message before the last assistant turn. ``target`` holds what the
    evaluator compares against (the final number, the correct choice letter, hidden unit tests,
    format rules), and ``meta`` anything else a source wants to keep (ids, difficulty). A
    multiple-choice example also lists its answer ``options`` — the texts a model's answer is
    chosen among by log-likelihood (:func:`cpift.evaluate.choice_logprobs`) — and the indices of
    the ``correct`` ones.
    """

    messages: tuple[Message, ...]
    target: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    options: tuple[str, ...] = ()
    correct: tuple[int, ...] = ()

    @property
    def prompt(self) -> tuple[Message, ...]:
        """The messages before the final assistant answer."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[:-1]
        return self.messages

    @property
    def answer(self) -> str | None:
        """The reference assistant answer, if the example has one."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None


Scorer = Callable[[Example, str], float]
"""Scores a generated completion for an example: 1.0 right, 0.0 wrong (partial credit allowed)."""


@dataclass(frozen=True)
class Task:
    """A named task: training and evaluation examples plus an automatic scorer.

    ``family`` names the kind of task (``math``, ``code``, ``logic``, ``format``, ``chat``) so
    that reports can group tasks; ``metric`` names what ``score`` measures (``exact_match``,
    ``pass@1``, ``accuracy``, ``rule_pass``).
    """

    name: str
    family: str
    train: Sequence[Example]
    eval: Sequence[Example]
    score: Scorer
    metric: str
    description: str = ""
