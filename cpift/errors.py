"""The exceptions cpift raises for bad input.

Every error a user can cause (a wrong path, a corrupt file, mismatched models, an out-of-range
hyper-parameter) is one of these, with a message that names the culprit: the task, the tensor or
the file. Callers catch :class:`CpiftError` to handle them all.
"""

from __future__ import annotations


class CpiftError(Exception):
    """Base class of every error cpift raises on bad input."""


class CheckpointError(CpiftError):
    """A checkpoint is missing, empty, corrupt, unsafe to load or holds non-finite values."""


class MismatchError(CpiftError):
    """Two things that must line up do not: tensor names or shapes, a mask and its parameter."""


class ParameterError(CpiftError, ValueError):
    """A hyper-parameter is out of range (p, τ, ω, …) or an argument has the wrong form."""


class FormatError(CpiftError):
    """A saved artifact is truncated, corrupt or written by an incompatible version of cpift."""
