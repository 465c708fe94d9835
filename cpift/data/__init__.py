"""Tasks to train and evaluate on: the embedded offline suite, the retention suite, real datasets.

* :mod:`cpift.data.tasks` — :class:`Example`, :class:`Task`, :data:`Scorer`;
* :mod:`cpift.data.scoring` — answer extraction and scorers (final number, choice letter, format
  rules, code in the sandbox, acceptable substrings);
* :mod:`cpift.data.embedded` — the procedurally generated offline suite (``math``, ``code``,
  ``logic``, ``format`` and the conflicting pair ``format_upper`` / ``format_lower``);
* :mod:`cpift.data.retention` — never-trained-on prose and easy questions to measure forgetting;
* :mod:`cpift.data.hub` — GSM8K, CodeAlpaca, LogiQA, Alpaca, UltraChat or any dataset, from the
  hub or local files; :mod:`cpift.data.spec` — the dataset spec both the config and the loader use;
* :mod:`cpift.data.bigbench` — BIG-bench tasks offline (``bigbench:<path>``);
* :mod:`cpift.data.chat` — rendering and tokenizing chat examples, for training and scoring alike;
* :mod:`cpift.data.registry` — :func:`get_task` by name or spec, :func:`available_tasks`.
"""

from __future__ import annotations

from cpift.data.embedded import CONFLICTING_PAIRS, EMBEDDED_TASKS, embedded_task, is_embedded_task
from cpift.data.hub import FORMATS, load_task, read_rows
from cpift.data.registry import HUB_PRESETS, available_tasks, get_task
from cpift.data.retention import RETENTION_TASK, retention_task, retention_text, zero_shot_questions
from cpift.data.scoring import (
    FORMAT_RULES,
    NO_METRIC,
    check_format,
    choice_letter,
    code_pass,
    contains_any,
    extract_code,
    final_number,
    letter_match,
    number_match,
    rules_pass,
    text_match,
    unscored,
)
from cpift.data.tasks import Example, Message, Scorer, Task

__all__ = [
    "CONFLICTING_PAIRS",
    "EMBEDDED_TASKS",
    "FORMATS",
    "FORMAT_RULES",
    "HUB_PRESETS",
    "NO_METRIC",
    "RETENTION_TASK",
    "Example",
    "Message",
    "Scorer",
    "Task",
    "available_tasks",
    "check_format",
    "choice_letter",
    "code_pass",
    "contains_any",
    "embedded_task",
    "extract_code",
    "final_number",
    "get_task",
    "is_embedded_task",
    "letter_match",
    "load_task",
    "number_match",
    "read_rows",
    "retention_task",
    "retention_text",
    "rules_pass",
    "text_match",
    "unscored",
    "zero_shot_questions",
]
