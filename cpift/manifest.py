"""Versioned JSON manifests: the one way cpift's saved artifacts say what they are.

Every directory cpift writes (core regions, a run) holds a JSON manifest with a ``format`` name,
a format ``version`` and the writing ``cpift_version``. Reading checks all three and turns every
problem into one :class:`~cpift.errors.FormatError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import FormatError


def manifest_header(fmt: str, version: int) -> dict[str, Any]:
    """The fields every manifest starts with."""
    return {"format": fmt, "version": version, "cpift_version": __version__}


def read_manifest(path: Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """Read and check the manifest at ``path``; ``what`` names the artifact in errors.

    Raises:
        FormatError: the file is missing, unreadable, of another format, or of another version.
    """
    if not path.is_file():
        raise FormatError(f"{path} is missing: {path.parent} is not a cpift {what} directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise FormatError(f"{path}: not a cpift {what} manifest (format is not {fmt!r})")
    if manifest.get("version") != version:
        raise FormatError(
            f"{path}: written in format version {manifest.get('version')!r} by cpift "
            f"{manifest.get('cpift_version')}; this cpift ({__version__}) reads version {version}"
        )
    return manifest
