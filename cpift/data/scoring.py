"""Automatic scorers: pull the answer out of a completion and compare it with an example's target.

Every scorer has the :data:`~cpift.data.tasks.Scorer` signature ``(example, completion) -> float``
and returns 1.0 (right) or 0.0 (wrong); :func:`unscored` returns NaN for tasks without an
automatic metric (``metric="none"``: trained on, never scored). The extraction helpers
(:func:`final_number`, :func:`choice_letter`, :func:`check_format`, :func:`extract_code`) are public
so that reports and tests can show *what* was read from a completion.

============================  ==============  ================================================
scorer                        ``metric``      ``example.target``
============================  ==============  ================================================
:func:`number_match`          exact_match     the number (``int``/``float``/``str``)
:func:`letter_match`          accuracy        the correct letter (``"A"`` … ``"D"``)
:func:`rules_pass`            rule_pass       one rule or a list of rules (:func:`check_format`)
:func:`code_pass`             pass@1          hidden unit tests (``assert`` lines)
:func:`contains_any`          accuracy        acceptable answer substrings
:func:`text_match`            exact_match     the answer text (or a list of acceptable ones)
:func:`unscored`              none            anything (ignored)
============================  ==============  ================================================
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cpift.data.tasks import Example
from cpift.errors import CpiftError, ParameterError

__all__ = [
    "FORMAT_RULES",
    "NO_METRIC",
    "check_format",
    "choice_letter",
    "code_pass",
    "contains_any",
    "extract_code",
    "final_number",
    "letter_match",
    "number_match",
    "rules_pass",
    "text_match",
    "unscored",
]

NO_METRIC = "none"
"""The ``metric`` of tasks that have no automatic correctness check (trained on, not scored)."""

FORMAT_RULES: tuple[str, ...] = ("json_keys", "bullets", "uppercase", "lowercase", "max_words", "min_words")
"""Rule types :func:`check_format` understands."""

# A number: thousands-grouped ("1,234.5") or plain ("1234", "3.25"), optionally negative. A minus
# sign counts only when it does not follow a word character, so "10-3" reads as 10 and 3.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last integer or decimal number in ``text`` (commas between digit groups removed).

    ``"3 * 4 = 12. The answer is 1,250."`` → ``1250.0``; ``"-3.5"`` → ``-3.5``; ``"no digits"``
    → ``None``. A trailing full stop is not a decimal point, and ``"1,2,3"`` (not thousands
    grouping) reads as the three numbers 1, 2 and 3.
    """
    if not isinstance(text, str):
        return None
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return float(matches[-1].replace(",", ""))


def number_match(example: Example, completion: str) -> float:
    """1.0 when the completion's :func:`final_number` equals ``example.target``, else 0.0."""
    got = final_number(completion)
    if got is None:
        return 0.0
    want = final_number(str(example.target))
    if want is None:
        raise ParameterError(f"the example's target {example.target!r} is not a number")
    return 1.0 if math.isclose(got, want, rel_tol=0.0, abs_tol=1e-6) else 0.0


_LETTERS = "ABCD"


def choice_letter(text: str, letters: str = _LETTERS) -> str | None:
    """The option letter a completion chooses, or ``None`` when it names none.

    Looked for, in order: the last ``Answer: C`` / ``answer is (C)`` (any case for "answer"); a
    completion that starts with the letter alone on its line or followed by ``.``/``)``/``:``
    (``"C"``, ``"C. Cal"``, ``"(C) …"``, ``"C) …"``, but not ``"A cat …"``, nor a completion
    that lists several options line by line); a parenthesised ``(C)`` anywhere. A bare capital letter inside prose is *not* taken (the
    article "A" would read as a choice).
    """
    if not isinstance(text, str) or not text.strip():
        return None
    cls = "[" + re.escape(letters) + "]"
    found = re.findall(rf"(?i:answer)\s*(?:(?i:is)\s*)?[:\-]?\s*(?:(?i:option)\s*)?\(?({cls})\)?(?![\w])", text)
    if found:
        return found[-1]
    head = re.match(rf"\s*\(?({cls})(?:[).:,]|[ \t]*(?:\n|$))", text)
    if head:
        listed = set(re.findall(rf"^\s*\(?({cls})[.)]\s", text, re.MULTILINE))
        if len(listed) <= 1:  # several option lines: the completion repeats the options, chooses none
            return head.group(1)
        return None
    paren = re.search(rf"\(({cls})\)", text)
    return paren.group(1) if paren else None


def letter_match(example: Example, completion: str) -> float:
    """1.0 when :func:`choice_letter` of the completion (letters A–J, for tasks with more than four
    options) is ``example.target``, else 0.0."""
    return 1.0 if choice_letter(completion, "ABCDEFGHIJ") == str(example.target).strip().upper() else 0.0


# ----------------------------------------------------------------------------------------------
# Format rules
# ----------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")


def _strip_fence(text: str) -> str:
    match = _FENCE.search(text)
    return match.group(2).strip() if match else text.strip()


def _check_rule(text: str, rule: Mapping[str, Any]) -> bool:
    kind = rule.get("type")
    if kind == "json_keys":
        keys = rule.get("keys")
        if not isinstance(keys, Sequence) or isinstance(keys, str) or not keys:
            raise ParameterError(f"format rule {dict(rule)!r}: 'keys' must be a non-empty list of names")
        try:
            obj = json.loads(_strip_fence(text))
        except ValueError:
            return False
        if not isinstance(obj, dict):
            return False
        if rule.get("exact", True):
            return set(obj) == set(keys)
        return set(keys) <= set(obj)
    if kind == "bullets":
        n = _count(rule)
        lines = [line for line in text.strip().splitlines() if line.strip()]
        return len(lines) == n and all(_BULLET.match(line) for line in lines)
    if kind == "uppercase":
        return any(c.isalpha() for c in text) and not any(c.islower() for c in text)
    if kind == "lowercase":
        return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)
    if kind == "max_words":
        return 1 <= len(text.split()) <= _count(rule)
    if kind == "min_words":
        return len(text.split()) >= _count(rule)
    raise ParameterError(f"unknown format rule type {kind!r} in {dict(rule)!r}; known: {', '.join(FORMAT_RULES)}")


def _count(rule: Mapping[str, Any]) -> int:
    n = rule.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ParameterError(f"format rule {dict(rule)!r}: 'n' must be a non-negative integer")
    return n


def check_format(text: str, rules: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``text`` satisfies every rule (surrounding whitespace ignored).

    A rule is a mapping with a ``type``:

    * ``{"type": "json_keys", "keys": [...], "exact": True}`` — the text (optionally inside a
      ```` ```json ```` fence) parses as a JSON object whose keys are exactly ``keys`` (with
      ``exact=False``: include them);
    * ``{"type": "bullets", "n": 3}`` — exactly ``n`` non-empty lines, each a bullet
      (``-``, ``*``, ``•`` or ``1.`` / ``1)`` followed by text), and nothing else;
    * ``{"type": "uppercase"}`` / ``{"type": "lowercase"}`` — at least one letter and no letter of
      the other case;
    * ``{"type": "max_words", "n": 5}`` — between 1 and ``n`` whitespace-separated words;
    * ``{"type": "min_words", "n": 20}`` — at least ``n`` words.

    Raises:
        ParameterError: a rule of unknown type or with a malformed parameter.
    """
    if isinstance(rules, Mapping):
        rules = [rules]
    if not isinstance(rules, Sequence) or isinstance(rules, str) or not rules:
        raise ParameterError(f"format rules must be a rule mapping or a non-empty list of them, got {rules!r}")
    if not isinstance(text, str):
        return False
    text = text.strip()
    results = []
    for rule in rules:
        if not isinstance(rule, Mapping):
            raise ParameterError(f"a format rule must be a mapping with a 'type', got {rule!r}")
        results.append(_check_rule(text, rule))  # check every rule, so malformed ones always raise
    return all(results)


def rules_pass(example: Example, completion: str) -> float:
    """1.0 when the completion satisfies every rule in ``example.target`` (:func:`check_format`)."""
    return 1.0 if check_format(completion, example.target) else 0.0


# ----------------------------------------------------------------------------------------------
# Code
# ----------------------------------------------------------------------------------------------


def extract_code(text: str) -> str:
    """The program in a completion: the first ```` ```python ```` (or untagged / ``py``) fenced
    block that defines something, else the first such block, else the whole text stripped. An
    unterminated fence (generation cut short) runs to the end of the text."""
    if not isinstance(text, str):
        return ""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    blocks = [body for lang, body in blocks if lang in ("", "python", "py", "python3")]
    for body in blocks:
        if re.search(r"^\s*(?:def|class|import|from)\s", body, re.MULTILINE):
            return body.strip("\n")
    if blocks:
        return blocks[0].strip("\n")
    return text.strip()


def code_pass(example: Example, completion: str) -> float:
    """1.0 when the completion's code (:func:`extract_code`) passes the hidden unit tests in
    ``example.target``, run by :func:`cpift.sandbox.check_solution` (never in this process).

    Raises:
        CpiftError: :mod:`cpift.sandbox` cannot be imported.
    """
    code = extract_code(completion)
    if not code.strip():
        return 0.0
    try:
        from cpift.sandbox import check_solution
    except ImportError as exc:
        raise CpiftError(f"scoring code needs the sandbox module cpift.sandbox, which cannot be imported: {exc}") from exc
    return 1.0 if check_solution(code, str(example.target)).passed else 0.0


# ----------------------------------------------------------------------------------------------
# Free text and unscored tasks
# ----------------------------------------------------------------------------------------------


def contains_any(example: Example, completion: str) -> float:
    """1.0 when the completion contains any of ``example.target`` (a string or a list of them) as a
    whole word or phrase, case-insensitively: ``"4"`` matches ``"2 + 2 = 4."`` but not ``"14"``."""
    targets = [example.target] if isinstance(example.target, str) else list(example.target or ())
    if not isinstance(completion, str):
        return 0.0
    for target in targets:
        pattern = rf"(?<!\w){re.escape(str(target).strip())}(?!\w)"
        if str(target).strip() and re.search(pattern, completion, re.IGNORECASE):
            return 1.0
    return 0.0


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .!?;:,'\"`")


def text_match(example: Example, completion: str) -> float:
    """1.0 when the completion equals ``example.target`` (or one of a list of them) after case
    folding, collapsing whitespace and stripping surrounding punctuation and quotes, else 0.0."""
    targets = [example.target] if isinstance(example.target, str) else list(example.target or ())
    if not isinstance(completion, str):
        return 0.0
    got = _normalise(completion)
    return 1.0 if any(got == _normalise(str(t)) for t in targets) else 0.0


def unscored(example: Example, completion: str) -> float:
    """The scorer of tasks with ``metric="none"``: always NaN (they are trained on, not scored;
    evaluation should skip them, and a NaN makes any accidental average visibly undefined)."""
    return math.nan
