"""Typed run configuration, read from TOML and validated with errors that name the key.

:func:`load_config` reads a TOML file, :func:`parse_config` a dict (the same structure); both
return a :class:`Config` of frozen dataclasses with every default filled in, or raise one
:class:`ConfigError` whose message starts with the key path (``train.lr: must be > 0, got -1.0``;
with the file name in front when read from a file). :meth:`Config.to_dict` gives the plain dict
back (``parse_config(c.to_dict()) == c``), :meth:`Config.to_toml` the TOML text. Presets live in
``configs/`` (``tiny.toml`` for tests, ``quick.toml`` for a CPU run of about 20 minutes,
``paper.toml`` for the paper's setting).

Schema (``key = default``; keys without a default are required)::

    [run]
    name                        required; letters, digits, '.', '_', '-' (the run directory's name)
    seed = 0                    global seed (0 ≤ seed < 2**32)
    methods = ["cpift", "multitask", "multistage", "sequential"]   subset of METHODS, unique
    device = "auto"             auto | cpu | cuda | mps (choose a GPU with CUDA_VISIBLE_DEVICES)

    [model]
    name = "smollm2-135m"       the embedded model (or an alias), "tiny" (a tiny random Llama for
                                tests), a local model directory (must exist and hold config.json),
                                or a Hugging Face hub id "org/name" (not checked here)
    dtype = "auto"              auto | float32 | bfloat16 (auto: float32 on CPU, where bfloat16 is
                                very slow, bfloat16 on GPUs that support it)

    [data]
    tasks                       required; the run's tasks, in order: a non-empty list of unique
                                names, each an embedded task, a hub preset of cpift.data
                                (gsm8k, codealpaca, …) or the name of a [[data.datasets]] table
                                (names are resolved by the pipeline, not here)
    n_train = 64                training examples per task (≥ 1)
    n_eval = 32                 evaluation examples per task (≥ 1)
    seed = 0                    seed of the data sampling
    max_length = 256            tokens per training example (≥ 1)
    [[data.datasets]]           optional dataset specs for cpift.data.hub.load_task, kept as dicts:
      name, source, format      required; name must appear in data.tasks; format one of
                                cpift.data.hub.FORMATS; source (and eval_source) a hub dataset id
                                or a local file/directory, which must exist
      other keys                those of cpift.data.hub.SPEC_KEYS (config, split, eval_split,
                                n_train, n_eval, seed, columns, max_turns, eval_task, …); unknown
                                keys are errors; n_train / n_eval / max_turns ≥ 1, seed ≥ 0,
                                columns a table of strings; the loader checks the rest

    [train]
    lr = 1e-4                   > 0
    weight_decay = 0.0          ≥ 0
    warmup_steps = 2            ≥ 0
    batch_size = 4              ≥ 1
    grad_accum = 1              ≥ 1
    steps = 30                  optimizer steps per method (≥ 1): the fair budget every method gets
    checkpoint_every = 10       save resumable state every N optimizer steps; 0 = only at the end
    max_grad_norm = 1.0         gradient clipping norm; 0 = no clipping

    [probe]                     the short per-task fine-tunes that find the core regions
    steps = 10                  ≥ 1
    lr = train.lr               > 0

    [cpift]
    p = 1.0                     core size in percent of all parameters, in (0, 100]
    tau = 0.1                   grouping threshold on the Jaccard overlap, in [0, 1]
    order = "random"            stage order of the groups: one of cpift.grouping.STAGE_ORDERS
    omega = 0.5                 SLERP factor for the non-core parameters, in [0, 1]
    overlap = "max_delta"       rule for an element in several cores: cpift.fusion.OVERLAP_RULES
    fold = "mean"               how several task models are SLERP-ed: cpift.fusion.FOLDS
    fusion_base = "pretrained"  pretrained | last_stage (see below)
    samples_per_task = data.n_train   consolidation sample per task (1 ≤ … ≤ data.n_train)

    [multistage]
    k = min(3, number of tasks) number of stages (1 ≤ k ≤ number of tasks)
    order = "random"            random | heuristic

    [sequential]                the forgetting experiment: train on `first`, then on `second`
    first = data.tasks[0]       a task of data.tasks
    second = data.tasks[1]      another task of data.tasks
    methods = ["multitask", "multistage", "cpift"]   subset of SEQUENTIAL_METHODS, unique

    [lora]                      the LoRA and DoRA baselines (through peft; DoRA = LoRA with use_dora)
    rank = 8                    adapter rank r (≥ 1)
    alpha = 16.0                scaling numerator: the update is (alpha / rank) · B·A (> 0)
    dropout = 0.05              dropout on the adapter's input, in [0, 1)
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                                module names (last component) that get adapters: a Llama's attention
                                and MLP projections; each must match a module of the model
    lr = 10 × train.lr          > 0; adapters train from zero (B = 0) on few parameters and
                                usually want about ten times full fine-tuning's rate

    [sparse]                    GaLLoP, SAFT, PaFi (methods gallop, saft, pafi; the method names the score)
    density = [1.0]             percent(s) of all parameters trained, each in (0, 100]; one model per
                                density, labelled METHOD@DENSITY (gallop@1, gallop@0.5); a single
                                number is a one-element list
    grad_fraction = 1.0         share of the training mixture the gradient is averaged over, (0, 1]
    grad_examples = 0           ≥ 0; when ≥ 1, this many examples instead of grad_fraction
                                (at most the mixture's size)
    scope = "global"            global | tensor: top density% of the model or of each tensor

    [epi]                       EPI, evolving parameter isolation (stages: multistage.k and .order)
    p = 1.0                     protected share in percent of all parameters, in (0, 100]
    interval = 10               R: the protected set is re-selected every R optimizer steps (≥ 1)
                                and at every stage boundary
    beta = 0.9                  EMA factor of the squared gradients, in [0, 1)
    normalise = "tensor"        tensor | layer | none: the group whose mean importance divides it

    [eval]
    max_new_tokens = 32         ≥ 1
    batch_size = 8              ≥ 1
    retention = true            also measure general-ability retention
    n_retention_chunks = 16     ≥ 1

``cpift.fusion_base``: the paper fuses into "the model of the last fine-tuning stage", which is
ambiguous (no stage has run when fusion happens in its own pipeline figure). The default
``"pretrained"`` starts from the pretrained base θ⁽⁰⁾, the reading that keeps the fusion independent
of any stage order and equal to the task-vector merge literature; ``"last_stage"`` starts from the
model of the most recent fine-tuning stage (the last probe, or the previous stage in the
sequential experiment). Both are supported.

Choices of this module: an integer is accepted where a float is expected (``lr = 1`` is 1.0), never
the reverse, and booleans are not numbers. Relative local paths (``model.name``, a dataset's
``source``) are looked up relative to the config file's directory first, then the current
directory, and stored absolute. A key in the wrong section is pointed to the right one
(``train.p: unknown key; did you mean cpift.p?``).

:func:`apply_overrides` applies ``section.key=value`` strings (values in TOML syntax, bare words as
strings) for a command line's ``--set``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from .errors import ParameterError
from .names import check_name

__all__ = [
    "DEVICES",
    "DTYPES",
    "FUSION_BASES",
    "LORA_TARGETS",
    "METHODS",
    "MULTISTAGE_ORDERS",
    "SECTIONS",
    "SEQUENTIAL_METHODS",
    "TINY_MODEL",
    "Config",
    "ConfigError",
    "CpiftConfig",
    "DataConfig",
    "EpiConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "MultistageConfig",
    "ProbeConfig",
    "RunConfig",
    "SequentialConfig",
    "SparseConfig",
    "TrainConfig",
    "apply_overrides",
    "config_changes",
    "load_config",
    "parse_config",
]

METHODS: tuple[str, ...] = ("cpift", "multitask", "multistage", "sequential", "lora", "dora", "epi", "gallop",
                            "saft", "pafi")
SEQUENTIAL_METHODS: tuple[str, ...] = ("multitask", "multistage", "cpift")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
FUSION_BASES: tuple[str, ...] = ("pretrained", "last_stage")
MULTISTAGE_ORDERS: tuple[str, ...] = ("random", "heuristic")
TINY_MODEL = "tiny"
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_LR_FACTOR = 10.0  # lora.lr defaults to this × train.lr

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")  # as cpift.checkpoint
_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt")


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


# -- lazily read choices from the modules that own them (they import torch / scipy) --------------


def _stage_orders() -> tuple[str, ...]:
    from .grouping import STAGE_ORDERS

    return tuple(STAGE_ORDERS)


def _overlap_rules() -> tuple[str, ...]:
    from .fusion import OVERLAP_RULES

    return tuple(OVERLAP_RULES)


def _folds() -> tuple[str, ...]:
    from .fusion import FOLDS

    return tuple(FOLDS)


def _scopes() -> tuple[str, ...]:
    from .selection import SCOPES

    return tuple(SCOPES)


def _normalisations() -> tuple[str, ...]:
    from .sparse import NORMALISATIONS

    return tuple(NORMALISATIONS)


# -- field specifications ------------------------------------------------------------------------

_REQUIRED: Any = dataclasses.MISSING


def _spec(default: Any = _REQUIRED, *, kind: str, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None,
          choices: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None,
          derived: bool = False) -> Any:
    """A dataclass field carrying its validation rules in ``metadata``.

    kind: ``str``, ``int``, ``float``, ``bool``, ``strs`` (list of unique strings), ``floats`` (list of
    distinct numbers, each within the bounds) or ``datasets``.
    derived: the default (``None`` here) is computed from other keys after parsing.
    """
    meta = {"kind": kind, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "derived": derived}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: what to run and where."""

    name: str = _spec(kind="str")
    seed: int = _spec(0, kind="int", ge=0, lt=2**32)
    methods: tuple[str, ...] = _spec(METHODS, kind="strs", choices=METHODS)
    device: str = _spec("auto", kind="str")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the base model."""

    name: str = _spec("smollm2-135m", kind="str")
    dtype: str = _spec("auto", kind="str", choices=DTYPES)


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: tasks and how much of each."""

    tasks: tuple[str, ...] = _spec(kind="strs")
    n_train: int = _spec(64, kind="int", ge=1)
    n_eval: int = _spec(32, kind="int", ge=1)
    seed: int = _spec(0, kind="int", ge=0, lt=2**32)
    max_length: int = _spec(256, kind="int", ge=1)
    datasets: tuple[dict[str, Any], ...] = _spec((), kind="datasets")

    def task_specs(self) -> list[tuple[str, str | dict[str, Any]]]:
        """What to load for each task, in ``tasks`` order: ``(key, spec)`` where ``spec`` is the
        ``[[data.datasets]]`` dict of that name (``key`` = ``"data.datasets[i]"``) or else the name
        itself (``key`` = ``"data.tasks[i]"``), ready for :func:`cpift.data.get_task`."""
        by_name = {spec["name"]: (f"data.datasets[{i}]", json.loads(json.dumps(spec)))
                   for i, spec in enumerate(self.datasets)}
        return [by_name.get(name, (f"data.tasks[{i}]", name)) for i, name in enumerate(self.tasks)]


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: the SFT loop every method uses, and the per-method step budget."""

    lr: float = _spec(1e-4, kind="float", gt=0)
    weight_decay: float = _spec(0.0, kind="float", ge=0)
    warmup_steps: int = _spec(2, kind="int", ge=0)
    batch_size: int = _spec(4, kind="int", ge=1)
    grad_accum: int = _spec(1, kind="int", ge=1)
    steps: int = _spec(30, kind="int", ge=1)
    checkpoint_every: int = _spec(10, kind="int", ge=0)
    max_grad_norm: float = _spec(1.0, kind="float", ge=0)
    # Stage checkpoints are deleted once the method's final model is saved (a 135M model's
    # checkpoint with AdamW state is 1.6 GB); true keeps them, e.g. to inspect stages.
    keep_checkpoints: bool = _spec(False, kind="bool")


@dataclass(frozen=True)
class ProbeConfig:
    """``[probe]``: the short per-task fine-tunes of CPI-FT stage 1."""

    steps: int = _spec(10, kind="int", ge=1)
    lr: float = _spec(None, kind="float", gt=0, derived=True)  # default: train.lr


@dataclass(frozen=True)
class CpiftConfig:
    """``[cpift]``: the method's hyper-parameters (see the module docstring for ``fusion_base``)."""

    p: float = _spec(1.0, kind="float", gt=0, le=100)
    tau: float = _spec(0.1, kind="float", ge=0, le=1)
    order: str = _spec("random", kind="str", choices=_stage_orders)
    omega: float = _spec(0.5, kind="float", ge=0, le=1)
    overlap: str = _spec("max_delta", kind="str", choices=_overlap_rules)
    fold: str = _spec("mean", kind="str", choices=_folds)
    fusion_base: str = _spec("pretrained", kind="str", choices=FUSION_BASES)
    samples_per_task: int = _spec(None, kind="int", ge=1, derived=True)  # default: data.n_train


@dataclass(frozen=True)
class MultistageConfig:
    """``[multistage]``: the multi-stage SFT baseline."""

    k: int = _spec(None, kind="int", ge=1, derived=True)  # default: min(3, number of tasks)
    order: str = _spec("random", kind="str", choices=MULTISTAGE_ORDERS)


@dataclass(frozen=True)
class SequentialConfig:
    """``[sequential]``: the A → B forgetting experiment."""

    first: str | None = _spec(None, kind="str", derived=True)  # default: data.tasks[0]
    second: str | None = _spec(None, kind="str", derived=True)  # default: data.tasks[1]
    methods: tuple[str, ...] = _spec(SEQUENTIAL_METHODS, kind="strs", choices=SEQUENTIAL_METHODS)


@dataclass(frozen=True)
class LoraConfig:
    """``[lora]``: the LoRA / DoRA adapters (``peft``) and their learning rate."""

    rank: int = _spec(8, kind="int", ge=1)
    alpha: float = _spec(16.0, kind="float", gt=0)
    dropout: float = _spec(0.05, kind="float", ge=0, lt=1)
    target_modules: tuple[str, ...] = _spec(LORA_TARGETS, kind="strs")
    lr: float = _spec(None, kind="float", gt=0, derived=True)  # default: LORA_LR_FACTOR × train.lr


@dataclass(frozen=True)
class SparseConfig:
    """``[sparse]``: GaLLoP / SAFT / PaFi sparse fine-tuning (selection and densities)."""

    density: tuple[float, ...] = _spec((1.0,), kind="floats", gt=0, le=100)
    grad_fraction: float = _spec(1.0, kind="float", gt=0, le=1)
    grad_examples: int = _spec(0, kind="int", ge=0)
    scope: str = _spec("global", kind="str", choices=_scopes)


@dataclass(frozen=True)
class EpiConfig:
    """``[epi]``: evolving parameter isolation (the stages are multistage's)."""

    p: float = _spec(1.0, kind="float", gt=0, le=100)
    interval: int = _spec(10, kind="int", ge=1)
    beta: float = _spec(0.9, kind="float", ge=0, lt=1)
    normalise: str = _spec("tensor", kind="str", choices=_normalisations)


@dataclass(frozen=True)
class EvalConfig:
    """``[eval]``: scoring the models."""

    max_new_tokens: int = _spec(32, kind="int", ge=1)
    batch_size: int = _spec(8, kind="int", ge=1)
    retention: bool = _spec(True, kind="bool")
    n_retention_chunks: int = _spec(16, kind="int", ge=1)


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration (build it with :func:`load_config` or :func:`parse_config`)."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    probe: ProbeConfig
    cpift: CpiftConfig
    multistage: MultistageConfig
    sequential: SequentialConfig
    lora: LoraConfig
    sparse: SparseConfig
    epi: EpiConfig
    eval: EvalConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The configuration as plain dicts and lists (JSON- and TOML-ready); ``None`` values
        are left out. ``parse_config(config.to_dict()) == config``."""
        out: dict[str, dict[str, Any]] = {}
        for section, cls in SECTIONS.items():
            values = {}
            for f in dataclasses.fields(cls):
                value = getattr(getattr(self, section), f.name)
                if value is None:
                    continue
                if f.metadata["kind"] == "datasets":
                    value = [json.loads(json.dumps(spec)) for spec in value]
                elif isinstance(value, tuple):
                    value = list(value)
                values[f.name] = value
            out[section] = values
        return out

    def to_toml(self) -> str:
        """The configuration as TOML text that :func:`load_config` reads back to an equal config."""
        lines: list[str] = []
        tree = self.to_dict()
        for section, values in tree.items():
            tables = values.pop("datasets", None) if section == "data" else None
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            for spec in tables or ():
                lines += ["", f"[[{section}.datasets]]"]
                lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in spec.items()]
            lines.append("")
        return "\n".join(lines)


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "probe": ProbeConfig,
    "cpift": CpiftConfig,
    "multistage": MultistageConfig,
    "sequential": SequentialConfig,
    "lora": LoraConfig,
    "sparse": SparseConfig,
    "epi": EpiConfig,
    "eval": EvalConfig,
}
"""Section name → its dataclass, in file order."""

# Types of the dataset-spec keys this module checks; the set of keys allowed and the formats are
# cpift.data.hub's SPEC_KEYS and FORMATS (the loader checks the rest, e.g. `columns` only with
# format "custom").
_DATASET_TYPES: dict[str, str] = {
    "name": "str", "source": "path", "format": "str", "config": "str", "split": "str", "train_split": "str",
    "eval_split": "str", "eval_source": "path", "n_train": "count", "n_eval": "count", "seed": "seed",
    "columns": "table", "scorer": "str", "family": "str", "description": "str", "system": "str",
    "max_turns": "count", "eval_task": "str",
}
_DATASET_REQUIRED = ("name", "source", "format")


def _dataset_schema() -> tuple[frozenset[str], tuple[str, ...]]:
    from .data.hub import FORMATS, SPEC_KEYS

    return frozenset(SPEC_KEYS), tuple(FORMATS)


# -- TOML output ---------------------------------------------------------------------------------


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    return json.dumps(text).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# -- value checks --------------------------------------------------------------------------------

_TOML_TYPE = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
              tuple: "array", dict: "table"}


def _describe(value: Any) -> str:
    name = next((n for t, n in _TOML_TYPE.items() if type(value) is t), type(value).__name__)
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return f"{name} {shown}"


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _check_number(key: str, value: float, meta: Mapping[str, Any]) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}")
    bounds = [("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)]
    for name, symbol, ok in bounds:
        limit = meta.get(name)
        if limit is not None and not ok(value, limit):
            raise ConfigError(key, f"must be {symbol} {limit}, got {value!r}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = _suggest(value, choices)
        tip = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(key, f"{value!r} is not one of {', '.join(choices)}{tip}")


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {_describe(value)}")
    return value


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"expected a number, got {_describe(value)}")
    return float(value)


def _as_str(key: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {_describe(value)}")
    if not empty and not value.strip():
        raise ConfigError(key, "must not be empty")
    return value


def _plain_name(key: str, name: str) -> str:
    """``name`` if it may name files (:mod:`cpift.names`), else a ConfigError at ``key``."""
    try:
        return check_name(name)
    except ParameterError as exc:
        raise ConfigError(key, str(exc)) from None


def _as_strs(key: str, value: Any, *, plain: bool = False) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected a list of strings, got {_describe(value)}")
    if not value:
        raise ConfigError(key, "must not be empty")
    seen: set[str] = set()
    for i, item in enumerate(value):
        _as_str(f"{key}[{i}]", item)
        if plain:
            _plain_name(f"{key}[{i}]", item)
        if item in seen:
            raise ConfigError(key, f"{item!r} is listed twice")
        seen.add(item)
    return tuple(value)


def _as_floats(key: str, value: Any, meta: Mapping[str, Any]) -> tuple[float, ...]:
    """A non-empty list of distinct numbers, each within the field's bounds; a bare number is a list of one."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ConfigError(key, "must not be empty")
    out: list[float] = []
    for i, item in enumerate(items):
        number = _as_float(f"{key}[{i}]", item)
        _check_number(f"{key}[{i}]", number, meta)
        if number in out:
            raise ConfigError(key, f"{number!r} is listed twice")
        out.append(number)
    return tuple(out)


def _as_table(key: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a table, got {_describe(value)}")
    return value


def _value(key: str, value: Any, f: dataclasses.Field, base_dirs: tuple[Path, ...]) -> Any:
    meta = f.metadata
    kind = meta["kind"]
    if kind == "int":
        value = _as_int(key, value)
        _check_number(key, value, meta)
    elif kind == "float":
        value = _as_float(key, value)
        _check_number(key, value, meta)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {_describe(value)}")
    elif kind == "str":
        value = _as_str(key, value)
    elif kind == "strs":
        value = _as_strs(key, value, plain=True)
    elif kind == "floats":
        value = _as_floats(key, value, meta)
    elif kind == "datasets":
        value = _datasets(key, value, base_dirs)
    choices = meta.get("choices")
    if choices is not None:
        choices = choices() if callable(choices) else choices
        for i, item in enumerate(value if kind == "strs" else [value]):
            _check_choice(f"{key}[{i}]" if kind == "strs" else key, item, choices)
    return value


# -- paths ---------------------------------------------------------------------------------------


def _find_local(text: str, base_dirs: tuple[Path, ...]) -> Path | None:
    """The existing path ``text`` names, relative paths tried against each base directory."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for base in base_dirs:
        if (base / path).exists():
            return (base / path).absolute()
    return None


def _looks_like_path(text: str) -> bool:
    return (text.startswith((".", "~", "/")) or os.path.isabs(text) or "\\" in text
            or text.lower().endswith(_FILE_SUFFIXES))


def _tried(text: str, base_dirs: tuple[Path, ...]) -> str:
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    return " or ".join(str((base / path).absolute()) for base in base_dirs)


def _model_name(key: str, name: str, base_dirs: tuple[Path, ...]) -> str:
    from .models import EMBEDDED_MODEL, is_embedded_name

    if name == TINY_MODEL or is_embedded_name(name):
        return name
    local = _find_local(name, base_dirs)
    if local is not None:
        if not local.is_dir():
            raise ConfigError(key, f"{str(local)!r} is a file; expected a model directory (with config.json)")
        if not (local / "config.json").is_file():
            raise ConfigError(key, f"{str(local)!r} is not a model directory: it has no config.json")
        return str(local)
    if _HUB_ID.match(name) and not _looks_like_path(name):
        return name  # a hub id: resolved (cache or download) when the model is loaded
    raise ConfigError(
        key,
        f"model path {name!r} does not exist (looked for {_tried(name, base_dirs)}); a model is "
        f"{TINY_MODEL!r}, the embedded {EMBEDDED_MODEL!r}, a local model directory or a hub id 'org/name'",
    )


def _datasets(key: str, value: Any, base_dirs: tuple[Path, ...]) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected an array of tables ([[data.datasets]]), got {_describe(value)}")
    spec_keys, formats = _dataset_schema()
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, spec in enumerate(value):
        where = f"{key}[{i}]"
        spec = dict(_as_table(where, spec))
        for name in spec:
            if name not in spec_keys:
                raise _unknown(f"{where}.{name}", name, sorted(spec_keys), "data.datasets")
        for name in _DATASET_REQUIRED:
            if name not in spec or spec[name] is None:
                raise ConfigError(f"{where}.{name}", "required key is missing")
        for name, item in list(spec.items()):
            sub = f"{where}.{name}"
            kind = _DATASET_TYPES.get(name)
            if item is None or kind is None:
                continue  # None: the loader's default; unchecked keys go to the loader as they are
            if kind == "str":
                _as_str(sub, item)
            elif kind in ("count", "seed"):
                _check_number(sub, _as_int(sub, item), {"ge": 1} if kind == "count" else {"ge": 0})
            elif kind == "table":
                columns = dict(_as_table(sub, item))
                for column, target in columns.items():
                    _as_str(f"{sub}.{column}", target)
                spec[name] = columns
            elif kind == "path":
                spec[name] = _dataset_source(sub, _as_str(sub, item), base_dirs)
        _check_choice(f"{where}.format", spec["format"], formats)
        _plain_name(f"{where}.name", spec["name"])
        if spec["name"] in names:
            raise ConfigError(f"{where}.name", f"dataset name {spec['name']!r} is used twice")
        names.add(spec["name"])
        out.append(json.loads(json.dumps(spec)))  # a deep, plain copy
    return tuple(out)


def _dataset_source(key: str, source: str, base_dirs: tuple[Path, ...]) -> str:
    """A local file or directory (made absolute; it must exist) or a hub dataset id (unchecked)."""
    local = _find_local(source, base_dirs)
    if local is not None:
        return str(local)
    if _looks_like_path(source):
        raise ConfigError(key, f"file {source!r} does not exist (looked for {_tried(source, base_dirs)})")
    return source


# -- parsing -------------------------------------------------------------------------------------


def _where_else(key: str, section: str | None) -> str | None:
    """``other.key`` (or ``a.key or b.key``) for the other sections that have ``key``."""
    homes = [s for s, cls in SECTIONS.items() if s != section and key in {f.name for f in dataclasses.fields(cls)}]
    if section == "data.datasets":
        return None
    return " or ".join(f"{home}.{key}" for home in homes) or None


def _unknown(key: str, name: str, valid: Iterable[str], section: str | None) -> ConfigError:
    valid = list(valid)
    hint = _suggest(name, valid)
    if hint is not None:
        return ConfigError(key, f"unknown key; did you mean {hint!r}?")
    elsewhere = _where_else(name, section)
    if elsewhere is not None:
        return ConfigError(key, f"unknown key; did you mean {elsewhere}?")
    return ConfigError(key, f"unknown key; valid keys are {', '.join(valid)}")


def _section(name: str, raw: Any, base_dirs: tuple[Path, ...]) -> dict[str, Any]:
    cls = SECTIONS[name]
    table = _as_table(name, raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise _unknown(f"{name}.{key}", key, fields, name)
    values: dict[str, Any] = {}
    for key, f in fields.items():
        path = f"{name}.{key}"
        if key not in table or table[key] is None:
            if f.default is _REQUIRED:
                raise ConfigError(path, "required key is missing")
            values[key] = f.default
            continue
        values[key] = _value(path, table[key], f, base_dirs)
    return values


def _device(key: str, device: str) -> str:
    if device in DEVICES:
        return device
    hint = "; choose the GPU with CUDA_VISIBLE_DEVICES" if device.startswith("cuda:") else (
        f"; did you mean {_suggest(device, DEVICES)!r}?" if _suggest(device, DEVICES) else "")
    raise ConfigError(key, f"{device!r} is not one of {', '.join(DEVICES)}{hint}")


def parse_config(data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate a configuration given as nested dicts (the TOML structure) and fill in defaults.

    Args:
        data: ``{"run": {...}, "data": {...}, ...}``; missing sections take their defaults.
        base_dir: where relative local paths are looked up first (then the current directory);
            :func:`load_config` passes the config file's directory.

    Raises:
        ConfigError: the first problem found, naming its key path.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(None, f"a configuration is a table of sections, got {_describe(data)}")
    base_dirs = tuple(dict.fromkeys(
        ([Path(base_dir).expanduser().absolute()] if base_dir is not None else []) + [Path.cwd()]))
    for key in data:
        if key not in SECTIONS:
            raise _unknown(key, key, SECTIONS, None)
    sections = {name: _section(name, data.get(name, {}), base_dirs) for name in SECTIONS}

    run, model, dat = sections["run"], sections["model"], sections["data"]
    _plain_name("run.name", run["name"])
    run["device"] = _device("run.device", run["device"])
    model["name"] = _model_name("model.name", model["name"], base_dirs)
    tasks: tuple[str, ...] = dat["tasks"]

    for i, spec in enumerate(dat["datasets"]):
        if spec["name"] not in tasks:
            raise ConfigError(f"data.datasets[{i}].name", f"{spec['name']!r} is not in data.tasks "
                              f"({', '.join(tasks)}); list it there to use the dataset")

    probe = sections["probe"]
    if probe["lr"] is None:
        probe["lr"] = sections["train"]["lr"]

    cp = sections["cpift"]
    if cp["samples_per_task"] is None:
        cp["samples_per_task"] = dat["n_train"]
    elif cp["samples_per_task"] > dat["n_train"]:
        raise ConfigError("cpift.samples_per_task", f"{cp['samples_per_task']} is more than data.n_train "
                          f"({dat['n_train']}): the consolidation sample is drawn from each task's training data")

    lora = sections["lora"]
    if lora["lr"] is None:
        lora["lr"] = LORA_LR_FACTOR * sections["train"]["lr"]

    ms = sections["multistage"]
    if ms["k"] is None:
        ms["k"] = min(3, len(tasks))
    elif ms["k"] > len(tasks):
        raise ConfigError("multistage.k", f"{ms['k']} stages for {len(tasks)} task(s) in data.tasks; "
                          f"k must be at most {len(tasks)}")

    seq = sections["sequential"]
    if "sequential" in run["methods"] and len(tasks) < 2:
        raise ConfigError("run.methods", "'sequential' needs at least two tasks in data.tasks")
    for i, slot in enumerate(("first", "second")):
        key = f"sequential.{slot}"
        if seq[slot] is None:
            seq[slot] = tasks[i] if i < len(tasks) else None
        elif seq[slot] not in tasks:
            hint = _suggest(seq[slot], tasks)
            tip = f"; did you mean {hint!r}?" if hint else ""
            raise ConfigError(key, f"{seq[slot]!r} is not in data.tasks ({', '.join(tasks)}){tip}")
    if seq["first"] is not None and seq["first"] == seq["second"]:
        raise ConfigError("sequential.second", f"must differ from sequential.first ({seq['first']!r})")

    built = {name: SECTIONS[name](**values) for name, values in sections.items()}
    return Config(**built)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """The keys whose values differ between two configs given as plain dicts (``Config.to_dict()``,
    or a run manifest's copy of one), as ``(section.key, old value, new value)`` in ``new``'s order;
    a key only one side has shows ``None`` on the other."""
    def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
        return {f"{section}.{key}": value for section, table in tree.items() for key, value in
                (table.items() if isinstance(table, Mapping) else [("", table)])}

    before, after = flat(json.loads(json.dumps(old))), flat(json.loads(json.dumps(new)))
    keys = [*after, *(k for k in before if k not in after)]
    return [(key, before.get(key), after.get(key)) for key in keys if before.get(key) != after.get(key)]


def load_config(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> Config:
    """Read and validate a TOML configuration file, with optional ``section.key=value``
    overrides (see :func:`apply_overrides`).

    Raises:
        ConfigError: the file is missing or not valid TOML, or a value is invalid; the message
            starts with the file name, then the key path.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(None, "config file does not exist", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(None, f"cannot read the config file: {exc}", path) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(None, f"invalid TOML: {exc}", path) from exc
    try:
        return parse_config(apply_overrides(data, overrides), base_dir=path.parent)
    except ConfigError as exc:
        raise ConfigError(exc.key, exc.reason, path) from None


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``section.key=value`` overrides applied, e.g. ``"train.lr=3e-4"``,
    ``'data.tasks=["math", "code"]'``, ``"model.name=tiny"``. Values are TOML (numbers, booleans,
    quoted strings, arrays); a value that is not valid TOML is taken as a plain string. The result
    still needs :func:`parse_config`.

    Raises:
        ConfigError: an override is not of the form ``section.key=value``.
    """
    out = json.loads(json.dumps(data, default=str))
    for item in overrides:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(key or str(item), f"override {item!r} is not of the form section.key=value")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        section = out.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError(parts[0], f"expected a table, got {_describe(section)}")
        section[parts[1]] = value
    return out
