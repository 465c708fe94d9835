"""Names that become parts of file paths: runs, tasks, datasets, methods, training jobs.

One rule for all of them, checked before any work starts, so that a name can neither escape a
directory nor fail half-way through a run on a file system limit: letters, digits, ``.``, ``_``
and ``-``, starting with a letter, digit or ``_``, at most :data:`NAME_MAX` characters. Several
names combine into one path component (``sequential-math-then-code``), which the file system caps
at 255 bytes; 64 characters a name leaves room for that.
"""

from __future__ import annotations

import re

from .errors import ParameterError

__all__ = ["NAME_MAX", "NAME_RULE", "check_name", "is_plain_name"]

NAME_MAX = 64
NAME_RULE = (f"may hold only letters, digits, '.', '_' and '-' (starting with a letter, digit or '_'), "
             f"at most {NAME_MAX} characters")
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def is_plain_name(name: object) -> bool:
    """Whether ``name`` follows the rule of this module (a full match: no trailing newline)."""
    return isinstance(name, str) and len(name) <= NAME_MAX and _PLAIN.fullmatch(name) is not None


def check_name(name: object, kind: str = "") -> str:
    """``name`` itself if it is plain; else a :class:`ParameterError` naming it (as a ``kind`` name,
    e.g. ``"task"``) and the rule."""
    if not is_plain_name(name):
        long = isinstance(name, str) and len(name) > NAME_MAX
        shown = f"{name[:NAME_MAX]!r}… ({len(name)} characters)" if long else repr(name)
        raise ParameterError(f"{kind + ' name ' if kind else ''}{shown} {NAME_RULE}")
    return name
