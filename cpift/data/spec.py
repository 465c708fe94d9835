"""A dataset spec: which dataset a task is made of and how to read it — one model for the config's
``[[data.datasets]]`` tables and for :func:`cpift.data.hub.load_task`.

The keys (all but ``name``, ``source`` and ``format`` optional) are documented in
:mod:`cpift.data.hub`. A ``source`` (and ``eval_source``) is a hub
dataset id or a local file or directory; relative local paths are looked up against the
directories in the validation context's ``base_dirs`` (the config file's directory, then the
current one) and stored absolute.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..settings import ConfigError, Name, Section, Text, choice, describe
from ..sources import looks_like_path

__all__ = ["CUSTOM_ROLES", "DatasetSpec", "DatasetSpecs", "find_local", "looked_for"]

def _formats() -> tuple[str, ...]:
    from .hub import FORMATS  # the loader owns the formats (and their converters)

    return FORMATS


def find_local(text: str, base_dirs: Sequence[Path]) -> Path | None:
    """The existing path ``text`` names, a relative one tried against each of ``base_dirs``."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for base in base_dirs:
        if (base / path).exists():
            return (base / path).absolute()
    return None


def looked_for(text: str, base_dirs: Sequence[Path]) -> str:
    """Where :func:`find_local` looked for ``text``, for a message."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    return " or ".join(str((base / path).absolute()) for base in base_dirs)


CUSTOM_ROLES: tuple[str, ...] = ("prompt", "answer", "target", "system")
"""What the ``columns`` of a ``custom`` spec may map (``prompt`` and ``answer`` required)."""


def _path_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


class DatasetSpec(Section):
    """One dataset spec (see the module docstring; the keys are documented in
    :mod:`cpift.data.hub`). ``n_train = None`` takes every usable row."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, str_strip_whitespace=True)

    name: Name
    source: Annotated[Text, BeforeValidator(_path_text)]
    format: Annotated[Text, choice(_formats)]
    config: Text | None = None
    split: Text | None = None
    train_split: Text | None = None
    eval_split: Text | None = None
    eval_source: Annotated[Text | None, BeforeValidator(_path_text)] = None
    n_train: int | None = Field(64, ge=1)
    n_eval: int = Field(32, ge=0)  # 0: a training-only dataset
    seed: int = Field(0, ge=0)
    columns: dict[str, str] | None = None
    scorer: Text | None = None
    family: Text | None = None
    description: Text | None = None
    system: str | None = None
    max_turns: int | None = Field(None, ge=1)
    eval_task: Text | None = None

    @field_validator("source", "eval_source")
    @classmethod
    def _local_or_hub(cls, source: str | None, info: ValidationInfo) -> str | None:
        """With ``base_dirs`` in the validation context (a config file): a local file or directory
        is made absolute and must exist, anything else is a hub dataset id. Without it, the loader
        checks the source when it opens it."""
        base_dirs = (info.context or {}).get("base_dirs")
        if source is None or base_dirs is None:
            return source
        local = find_local(source, base_dirs)
        if local is not None:
            return str(local)
        if looks_like_path(source):
            raise ValueError(f"file {source!r} does not exist (looked for {looked_for(source, base_dirs)})")
        return source

    @model_validator(mode="after")
    def _rules_of_the_format(self) -> DatasetSpec:
        from .embedded import EMBEDDED_TASKS
        from .hub import CUSTOM_SCORERS

        if self.split is not None and self.train_split is not None:
            raise ValueError("spec keys 'split' and 'train_split' are aliases; give only one")
        if self.eval_task is not None:
            if self.eval_task not in EMBEDDED_TASKS:
                raise ValueError(f"spec key 'eval_task' = {self.eval_task!r} is not an embedded task: "
                                 f"{', '.join(EMBEDDED_TASKS)}")
            if self.eval_split is not None or self.eval_source is not None:
                raise ValueError("spec key 'eval_task' replaces the evaluation data: drop 'eval_split' / 'eval_source'")
        if self.format == "custom":
            if not all((self.columns or {}).get(role) for role in ("prompt", "answer")):
                raise ValueError("a 'custom' spec needs 'columns' mapping at least 'prompt' and 'answer' to column "
                                 "names")
            extra = sorted(set(self.columns) - set(CUSTOM_ROLES))
            if extra:
                raise ValueError(f"spec key 'columns' has unknown role(s) {', '.join(map(repr, extra))}; "
                                 f"known: {', '.join(CUSTOM_ROLES)}")
            if self.scorer is not None and self.scorer not in CUSTOM_SCORERS:
                raise ValueError(f"spec key 'scorer' = {self.scorer!r} is not one of {', '.join(CUSTOM_SCORERS)}")
        else:
            for key in ("columns", "scorer"):
                if getattr(self, key) is not None:
                    raise ValueError(f"spec key {key!r} is only for format 'custom' (this spec's format is "
                                     f"{self.format!r})")
        if self.max_turns is not None and self.format != "ultrachat":
            raise ValueError("spec key 'max_turns' is for format 'ultrachat' only")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The spec as the plain dict a config file and the loader take: the keys that were given."""
        return self.model_dump(mode="json", exclude_unset=True)


def _distinct_names(specs: tuple[DatasetSpec, ...]) -> tuple[DatasetSpec, ...]:
    seen: set[str] = set()
    for i, spec in enumerate(specs):
        if spec.name in seen:
            raise ConfigError(f"data.datasets[{i}].name", f"dataset name {spec.name!r} is used twice")
        seen.add(spec.name)
    return specs


def _array_of_tables(value: Any) -> Any:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected an array of tables ([[data.datasets]]), got {describe(value)}")
    return value


DatasetSpecs = Annotated[tuple[DatasetSpec, ...], BeforeValidator(_array_of_tables), Field(strict=False),
                         AfterValidator(_distinct_names)]
"""The ``[[data.datasets]]`` tables: dataset specs with distinct names."""
