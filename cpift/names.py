"""Names that become parts of file paths: runs, tasks, datasets, methods, training jobs.

One rule, checked before any work starts, so that a name can neither escape a directory nor fail
half-way through a run on a file system limit. A *plain name* (a run, a dataset, a method, an
embedded task) holds letters, digits, ``.``, ``_`` and ``-``, starts with a letter, digit or
``_``, and has at most :data:`NAME_MAX` characters. A *task name* is a plain name or a BIG-bench
task, ``bigbench:<path>`` with plain names joined by ``/`` (at most :data:`TASK_NAME_MAX`
characters); :func:`path_part` spells it as one path component (``bigbench-logical_deduction.three_objects``).
Several names combine into one path component (``sequential_math``, a training job), which the
file system caps at 255 bytes.
"""

from __future__ import annotations

import re

from .errors import ParameterError

__all__ = ["NAME_MAX", "NAME_RULE", "TASK_NAME_MAX", "check_name", "check_task_name", "is_plain_name", "path_part"]

NAME_MAX = 64
TASK_NAME_MAX = 128
NAME_RULE = (f"may hold only letters, digits, '.', '_' and '-' (starting with a letter, digit or '_'), "
             f"at most {NAME_MAX} characters")
_PLAIN = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_PLAIN_RE = re.compile(_PLAIN)
_TASK_RE = re.compile(rf"{_PLAIN}|bigbench:{_PLAIN}(?:/{_PLAIN})*")


def is_plain_name(name: object, max_length: int = NAME_MAX) -> bool:
    """Whether ``name`` is a plain name (a full match: no trailing newline) of at most ``max_length``."""
    return isinstance(name, str) and len(name) <= max_length and _PLAIN_RE.fullmatch(name) is not None


def _refuse(name: object, kind: str, rule: str, max_length: int) -> ParameterError:
    long = isinstance(name, str) and len(name) > max_length
    shown = f"{name[:max_length]!r}… ({len(name)} characters)" if long else repr(name)
    return ParameterError(f"{kind + ' name ' if kind else ''}{shown} {rule}")


def check_name(name: object, kind: str = "", max_length: int = NAME_MAX) -> str:
    """``name`` itself if it is plain; else a :class:`ParameterError` naming it (as a ``kind`` name,
    e.g. ``"method"``) and the rule."""
    if not is_plain_name(name, max_length):
        rule = NAME_RULE if max_length == NAME_MAX else NAME_RULE.replace(str(NAME_MAX), str(max_length))
        raise _refuse(name, kind, rule, max_length)
    return name


def check_task_name(name: object) -> str:
    """``name`` itself if it is a task name (plain, or ``bigbench:<path>``); else a :class:`ParameterError`."""
    if not (isinstance(name, str) and len(name) <= TASK_NAME_MAX and _TASK_RE.fullmatch(name)):
        rule = (f"{NAME_RULE.replace(str(NAME_MAX), str(TASK_NAME_MAX))}, or bigbench:<path> "
                "(plain names joined by '/')")
        raise _refuse(name, "task", rule, TASK_NAME_MAX)
    return name


def path_part(name: str) -> str:
    """A task (or stage) name as one path component: ``:`` becomes ``-`` and ``/`` becomes ``.``
    (``bigbench:logical_deduction/three_objects`` → ``bigbench-logical_deduction.three_objects``)."""
    return name.replace(":", "-").replace("/", ".")
