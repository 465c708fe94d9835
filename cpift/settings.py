"""The building blocks of cpift's typed configuration: pydantic sections, field types and errors.

A config section is a :class:`Section` — a frozen pydantic model that forbids unknown keys and
takes scalars strictly (a boolean is no number, ``3.0`` is no integer; an integer is a float). The
field types below add what TOML configs need: non-empty lists of distinct names (:data:`Names`),
choices read lazily from the module that owns them (:func:`choice`), a number or a list of
numbers (:func:`numbers`). :func:`config_error` turns pydantic's first error into one
:class:`ConfigError` whose message starts with the key path and reads as before pydantic
(``train.lr: must be > 0, got -1.0``; ``train.lrr: unknown key; did you mean 'lr'?``).

:class:`TrainConfig` is here because both the config (its ``[train]`` section) and the training
loop (:func:`cpift.train.train`) use it: one class, one set of defaults.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, validate_call

from .errors import ParameterError
from .names import check_name, check_task_name

__all__ = [
    "DEVICES",
    "DISTRIBUTED",
    "ConfigError",
    "Float",
    "Name",
    "Names",
    "Section",
    "TaskNames",
    "Text",
    "TrainConfig",
    "choice",
    "config_error",
    "describe",
    "names_of",
    "numbers",
    "suggest",
    "task_names",
    "validated",
]

DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")

_KEY_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])*(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[\d+\])*)*): ")


class ConfigError(ParameterError):
    """A configuration is invalid. ``key`` is the key path (``"train.lr"``, ``"data.datasets[0].source"``)
    or ``None`` for the file as a whole, ``file`` the config file if read from one, ``reason`` the
    message without them. ``ConfigError("train.lr: must be > 0")`` (one message starting with a key
    path) works too."""

    def __init__(self, key: str | None, reason: str | None = None, file: str | os.PathLike[str] | None = None) -> None:
        if reason is None:  # one message, "key.path: reason" or just a reason
            message = "" if key is None else str(key)
            match = _KEY_PREFIX.match(message)
            key, reason = (match.group(1), message[match.end():]) if match else (None, message)
        self.key = key
        self.reason = reason
        self.file = os.fspath(file) if file is not None else None
        parts = [p for p in (self.file, key) if p]
        super().__init__(": ".join([*parts, reason]))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.reason, self.file))


# -- messages -----------------------------------------------------------------------------------

_TOML_TYPE = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
              tuple: "array", dict: "table"}


def describe(value: Any) -> str:
    """A value as TOML calls it, for messages: ``string 'fast'``, ``integer 3``, ``boolean true``."""
    name = next((n for t, n in _TOML_TYPE.items() if type(value) is t), type(value).__name__)
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"{name} {shown}"


def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The closest of ``candidates`` to a mistyped ``word``, if one is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _bound(symbol: str, name: str) -> Callable[[dict[str, Any]], str]:
    def message(error: dict[str, Any]) -> str:
        limit, value = error["ctx"][name], error["input"]
        if isinstance(limit, float) and isinstance(value, int):
            value = float(value)  # an integer given for a float field is that float
        return f"must be {symbol} {limit:g}, got {value!r}" if isinstance(limit, float) else \
            f"must be {symbol} {limit}, got {value!r}"
    return message


# pydantic error type → our message (the key path is put in front by config_error)
_MESSAGES: dict[str, Callable[[dict[str, Any]], str]] = {
    "missing": lambda e: "required key is missing",
    "greater_than": _bound(">", "gt"),
    "greater_than_equal": _bound(">=", "ge"),
    "less_than": _bound("<", "lt"),
    "less_than_equal": _bound("<=", "le"),
    "finite_number": lambda e: f"must be a finite number, got {e['input']!r}",
    "int_type": lambda e: f"expected an integer, got {describe(e['input'])}",
    "int_from_float": lambda e: f"expected an integer, got {describe(e['input'])}",
    "float_type": lambda e: f"expected a number, got {describe(e['input'])}",
    "bool_type": lambda e: f"expected true or false, got {describe(e['input'])}",
    "string_type": lambda e: f"expected a string, got {describe(e['input'])}",
    "string_too_short": lambda e: "must not be empty",
    "tuple_type": lambda e: f"expected a list, got {describe(e['input'])}",
    "list_type": lambda e: f"expected a list, got {describe(e['input'])}",
    "too_short": lambda e: "must not be empty",
    "model_type": lambda e: f"expected a table, got {describe(e['input'])}",
    "model_attributes_type": lambda e: f"expected a table, got {describe(e['input'])}",
    "dict_type": lambda e: f"expected a table, got {describe(e['input'])}",
}


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _sections(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """The fields of ``model`` that are tables of their own, by name."""
    return {name: f.annotation for name, f in model.model_fields.items()
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}


def _unknown_key(root: type[BaseModel], loc: tuple[Any, ...]) -> ConfigError:
    """``unknown key`` at ``loc``, with the closest valid key, or the sections that have that key."""
    model, path = root, [p for p in loc[:-1] if not isinstance(p, int)]
    for part in path:
        model = _sections(model)[part] if part in _sections(model) else \
            next(a for a in model.model_fields[part].annotation.__args__ if isinstance(a, type)
                 and issubclass(a, BaseModel))  # a list of tables (data.datasets)
    key, name = _key_path(loc), str(loc[-1])
    valid = [field for field, info in model.model_fields.items() if not info.exclude]
    hint = suggest(name, valid)
    if hint is not None:
        return ConfigError(key, f"unknown key; did you mean {hint!r}?")
    if len(path) <= 1:  # a section's key, or a top-level one: does another section have it?
        homes = [f"{other}.{name}" for other, section in _sections(root).items()
                 if other not in path and name in section.model_fields]
        if homes:
            return ConfigError(key, f"unknown key; did you mean {' or '.join(homes)}?")
    return ConfigError(key, f"unknown key; valid keys are {', '.join(valid)}")


class _FieldError(ConfigError):
    """A :class:`ConfigError` whose key is relative to the section that raised it: a section built
    inside a bigger model (pydantic calls :meth:`Section.__init__` for nested sections) is named
    with the path to it put in front."""

    unknown = False  # an unknown key, to be named again by the enclosing model


def config_error(exc: ValidationError, model: type[BaseModel] | None = None, *,
                 error_type: type[ConfigError] = ConfigError) -> ConfigError:
    """The first error of a failed validation of ``model`` as one :class:`ConfigError` naming its
    key path, in cpift's words."""
    error = exc.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _FieldError):
        if cause.unknown:  # named again from the whole model, which knows the other sections
            unknown = _unknown_key(model, (*loc, cause.key))
            return error_type(unknown.key, unknown.reason)
        return error_type(".".join(filter(None, (_key_path(loc), cause.key))), cause.reason)
    if isinstance(cause, ConfigError) and cause.key is not None:
        return cause  # raised with its full key path by a cross-section check
    if error["type"] == "extra_forbidden" and model is not None:
        unknown = _unknown_key(model, loc)
        named = error_type(unknown.key, unknown.reason)
        named.unknown = True
        return named
    if isinstance(cause, Exception):
        reason = str(cause)
    elif error["type"] in _MESSAGES:
        reason = _MESSAGES[error["type"]](error)
    else:
        reason = error["msg"]
    return error_type(_key_path(loc) or None, reason)


# -- field types -----------------------------------------------------------------------------


def _distinct(values: tuple[Any, ...]) -> tuple[Any, ...]:
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise ValueError(f"{value!r} is listed twice")
        seen.append(value)
    return values


def _plain(name: str) -> str:
    try:
        return check_name(name)
    except ParameterError as exc:
        raise ValueError(str(exc)) from None


def _task_name(name: str) -> str:
    try:
        return check_task_name(name)
    except ParameterError as exc:
        raise ValueError(str(exc)) from None


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


Float = Annotated[float, Field(allow_inf_nan=False)]
"""A finite number (an integer is taken as a float)."""

Text = Annotated[str, AfterValidator(_not_blank)]
"""A string with something in it."""

Name = Annotated[str, AfterValidator(_not_blank), AfterValidator(_plain)]
"""A name that can be part of a file name (:mod:`cpift.names`)."""

Names = Annotated[tuple[Name, ...], Field(strict=False, min_length=1), AfterValidator(_distinct)]
"""A non-empty list of distinct plain names (a TOML array; kept as a tuple)."""

OPTIMIZERS = ("adamw", "sgd")
"""The training loop's optimizers: AdamW (fused where the device has it), or plain SGD."""

DISTRIBUTED = ("none", "ddp", "fsdp")
"""How training spreads over the processes of a launch (``torchrun``/``accelerate launch``): one
process only; data parallel with a whole model per process (DDP); data parallel with every
parameter, gradient and optimizer state sharded over the processes (FSDP2, :mod:`cpift.fsdp`)."""

Seed = Annotated[int, Field(ge=0, lt=2**32)]
"""A random seed (an unsigned 32-bit integer, as numpy accepts)."""

Seeds = Annotated[tuple[Seed, ...], Field(strict=False, min_length=1), AfterValidator(_distinct)]
"""A non-empty list of distinct seeds."""

def task_names(min_length: int = 1) -> Any:
    """A list of at least ``min_length`` distinct task names (plain, or ``bigbench:<path>``:
    :mod:`cpift.names`)."""
    return Annotated[tuple[Annotated[str, AfterValidator(_not_blank), AfterValidator(_task_name)], ...],
                     Field(strict=False, min_length=min_length), AfterValidator(_distinct)]


TaskNames = task_names()
"""A non-empty list of distinct task names."""


def choice(source: tuple[str, ...] | Callable[[], Iterable[str]]) -> AfterValidator:
    """A validator accepting one of ``source`` (a tuple, or a callable read when validating, so
    that choices owned by heavy modules are imported only then), suggesting the closest."""
    def check(value: str) -> str:
        choices = tuple(source() if callable(source) else source)
        if value not in choices:
            hint = suggest(value, choices)
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}" + (f"; did you mean {hint!r}?" if hint
                                                                                 else ""))
        return value
    return AfterValidator(check)


def names_of(source: tuple[str, ...] | Callable[[], Iterable[str]]) -> Any:
    """Like :data:`Names`, each name one of ``source`` (see :func:`choice`)."""
    return Annotated[tuple[Annotated[Name, choice(source)], ...], Field(strict=False, min_length=1),
                     AfterValidator(_distinct)]


def _one_or_many(value: Any) -> Any:
    return value if isinstance(value, (list, tuple)) else [value]


def numbers(min_length: int = 1, **bounds: float) -> Any:
    """A list of at least ``min_length`` distinct numbers within ``bounds`` (``gt``, ``le``, …); a
    bare number is a list of one."""
    return Annotated[tuple[Annotated[float, Field(allow_inf_nan=False, **bounds)], ...],
                     BeforeValidator(_one_or_many), Field(strict=False, min_length=min_length),
                     AfterValidator(_distinct)]


def validated(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with its arguments checked against its annotations (pydantic's
    ``validate_call``, strict); a bad argument raises :class:`ConfigError` naming it."""
    checked = validate_call(config=ConfigDict(strict=True))(function)

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return checked(*args, **kwargs)
        except ValidationError as exc:
            raise config_error(exc) from None

    return call


class Section(BaseModel):
    """A config section: frozen, unknown keys refused, scalars taken strictly."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def resolve(self, config: Any) -> Section:
        """This section with its derived defaults filled in and its cross-section rules checked,
        given the whole config (raise :class:`ConfigError` with the full key path). The default
        returns it unchanged."""
        return self



# -- training ----------------------------------------------------------------------------------


class TrainConfig(Section):
    """``[train]``: the SFT loop every method uses (:func:`cpift.train.train`), and the per-method
    step budget.

    ``max_length``, ``seed`` and ``device`` are the loop's too but are set elsewhere in a config
    file (``data.max_length``, ``run.seed``, ``run.device``) and filled in from there; given to
    the class directly (``TrainConfig(steps=5, device="cpu")``) they are plain fields.
    """

    model_config = ConfigDict(extra="forbid", frozen=False, strict=True)

    lr: Float = Field(1e-4, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    warmup_steps: int = Field(2, ge=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(30, ge=1)
    checkpoint_every: int = Field(10, ge=0)  # 0: only at the end
    max_grad_norm: Float = Field(1.0, ge=0)  # 0: no clipping
    optimizer: Annotated[str, choice(OPTIMIZERS)] = "adamw"  # "sgd": plain SGD (no momentum), e.g. for probes
    # With one process "ddp" and "fsdp" train as "none" does; "none" refuses a multi-process launch.
    distributed: Annotated[str, choice(DISTRIBUTED)] = "none"
    # Stage checkpoints are deleted once the method's final model is saved (a 135M model's
    # checkpoint with AdamW state is 1.6 GB); true keeps them, e.g. to inspect stages.
    keep_checkpoints: bool = False
    max_length: int = Field(256, ge=2, exclude=True)
    seed: Seed = Field(0, exclude=True)
    device: Annotated[str, choice(DEVICES)] = Field("auto", exclude=True)

    FROM_ELSEWHERE: ClassVar[Mapping[str, str]] = {"max_length": "data.max_length", "seed": "run.seed",
                                                   "device": "run.device"}
    """The loop's fields that a config file sets in other sections."""

    def __init__(self, **data: Any) -> None:
        # Built from keyword arguments (by a caller, or by pydantic for the config's [train]), a bad
        # value is a ConfigError naming the field.
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), error_type=_FieldError) from None

    def validate(self) -> None:
        """Validate the current values again (they may have been assigned after creation);
        :class:`ConfigError` naming the first bad field."""
        try:
            TrainConfig.model_validate(self.__dict__)
        except ValidationError as exc:
            raise config_error(exc, TrainConfig) from None
