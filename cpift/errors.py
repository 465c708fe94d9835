"""The exceptions cpift raises for bad input.

Every error a user can cause (a wrong path, a corrupt file, mismatched models, an out-of-range
hyper-parameter) is one of these, with a message that names the culprit: the task, the tensor or
the file. Callers catch :class:`CpiftError` to handle them all.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


class CpiftError(Exception):
    """Base class of every error cpift raises on bad input.

    Errors whose remedy depends on the caller's interface (a keyword argument in Python, an option
    on the command line) carry ``problem`` and ``remedy`` separately; ``str()`` joins them, and
    the command line puts its own option in place of the remedy."""


class CheckpointError(CpiftError):
    """A checkpoint is missing, empty, corrupt, unsafe to load or holds non-finite values."""


class MismatchError(CpiftError):
    """Two things that must line up do not: tensor names or shapes, a mask and its parameter."""


class ParameterError(CpiftError, ValueError):
    """A hyper-parameter is out of range (p, τ, ω, …) or an argument has the wrong form."""


class FormatError(CpiftError):
    """A saved artifact is truncated, corrupt or written by an incompatible version of cpift."""


class OutputExistsError(CpiftError, FileExistsError):
    """An output would replace an existing path. ``path`` names it; still a :class:`FileExistsError`
    (errno ``EEXIST``) for code that races other writers to the same output."""

    def __init__(self, path: str | os.PathLike[str], remedy: str = "choose another path, or pass overwrite=True") -> None:
        super().__init__(errno.EEXIST, "already exists", os.fspath(path))
        self.path = Path(path)
        self.problem = f"{self.path} already exists"
        self.remedy = remedy

    def __str__(self) -> str:
        return f"{self.problem}; {self.remedy}"


class DiskFullError(CpiftError, OSError):
    """Writing an output failed because its file system is full. ``path`` names what was being
    written; whatever was complete before stays complete (every write is atomic)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", os.fspath(path))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"no space left on device while writing {self.path}; free some space, then resume"
