"""Typed run configuration, read from TOML and validated with errors that name the key.

:func:`load_config` reads a TOML file, :func:`parse_config` a dict (the same structure); both
return a :class:`Config` (pydantic models, frozen, every default filled in) or raise one
:class:`ConfigError` whose message starts with the key path (``train.lr: must be > 0, got -1.0``;
with the file name in front when read from a file). :meth:`Config.to_dict` gives the plain dict
back (``parse_config(c.to_dict()) == c``), :meth:`Config.to_toml` the TOML text. Presets live in
``configs/`` (``tiny.toml`` for tests, ``quick.toml`` for a CPU run of about 20 minutes,
``paper.toml`` for the paper's setting).

Sections: ``[run]``, ``[model]``, ``[data]`` (with ``[[data.datasets]]``, see
:mod:`cpift.data.spec`), ``[train]`` (:class:`~cpift.settings.TrainConfig`), ``[probe]`` and
``[eval]`` are defined here; each method's settings section (``[cpift]``, ``[multistage]``,
``[sequential]``, ``[lora]``, ``[epi]``, ``[sparse]``) is declared in the method's own file and
found through the method registry (:mod:`cpift.methods.registry`). Every field, its default and
its bounds are in those classes; ``python -c "import cpift.config as c; print(c.Config.model_json_schema())"``
prints the whole schema.

Derived defaults (a key left out takes its value from another): ``probe.lr`` = ``train.lr``,
``cpift.samples_per_task`` = ``data.n_train``, ``multistage.k`` = min(3, number of tasks),
``sequential.first`` / ``.second`` = the first two of ``data.tasks``, ``lora.lr`` = 10 ×
``train.lr``. The training loop's ``max_length``, ``seed`` and ``device`` come from
``data.max_length``, ``run.seed`` and ``run.device``.

Choices of this module: an integer is accepted where a float is expected (``lr = 1`` is 1.0), never
the reverse, and booleans are not numbers. Relative local paths (``model.name``, a dataset's
``source``) are looked up relative to the config file's directory first, then the current
directory, and stored absolute. A key in the wrong section is pointed to the right one
(``train.p: unknown key; did you mean cpift.p or epi.p?``).

:func:`apply_overrides` applies ``section.key=value`` strings (values in TOML syntax, bare words as
strings) for a command line's ``--set``.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import tomli_w
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, create_model
from pydantic import field_validator, model_validator

from .data.spec import DatasetSpecs, find_local, looked_for
from .methods.registry import METHODS as _REGISTRY
from .methods.registry import sections as _method_sections
from .methods.sequential import VARIANTS as SEQUENTIAL_METHODS
from .settings import DEVICES, ConfigError, Float, Name, Section, Seed, Seeds, TaskNames, Text, TrainConfig
from .settings import OPTIMIZERS, choice, config_error
from .settings import describe, names_of, suggest, task_names
from .sources import EMBEDDED_MODEL, is_embedded_name, is_hub_id

__all__ = [
    "DEVICES",
    "DTYPES",
    "METHODS",
    "SEQUENTIAL_METHODS",
    "TINY_MODEL",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "ProbeConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_changes",
    "cpu_threads",
    "load_config",
    "parse_config",
    "read_config",
]

METHODS: tuple[str, ...] = tuple(_REGISTRY)
"""Every registered method's name, in registration order."""
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
TINY_MODEL = "tiny"


def _device(device: str) -> str:
    if device in DEVICES:
        return device
    hint = suggest(device, DEVICES)
    tip = "; choose the GPU with CUDA_VISIBLE_DEVICES" if device.startswith("cuda:") else (
        f"; did you mean {hint!r}?" if hint else "")
    raise ValueError(f"{device!r} is not one of {', '.join(DEVICES)}{tip}")


class RunConfig(Section):
    """``[run]``: what to run — the run's name, the seed or seeds, the methods (any registered
    method; default all), the device (choose a GPU with CUDA_VISIBLE_DEVICES), and the CPU threads
    torch uses (default: :func:`cpu_threads`).

    ``seeds = [0, 1, 2]`` runs every method once per seed in one run directory (the seed drives
    the data order, the probes, the random stage orders and the LoRA init; the evaluation items
    and the base model are shared); its first seed is the primary one, whose artifacts the pages
    show, and ``seed`` is then that first seed. Without ``seeds``, the run has the one ``seed``.
    """

    name: Name
    seed: Seed = 0
    seeds: Seeds | None = None
    methods: names_of(lambda: tuple(_REGISTRY)) = METHODS
    device: Annotated[str, AfterValidator(_device)] = "auto"
    threads: int | None = Field(None, ge=1)  # CPU threads for torch; default: cores not busy (see cpu_threads)

    @model_validator(mode="after")
    def _primary_seed(self) -> RunConfig:
        if self.seeds is not None and self.seed != self.seeds[0]:
            if "seed" in self.model_fields_set:
                raise ValueError(f"seed is the first of seeds when seeds is given: seed = {self.seed}, "
                                 f"seeds = {list(self.seeds)}")
            object.__setattr__(self, "seed", self.seeds[0])  # frozen; derived here, once
        return self

    @property
    def all_seeds(self) -> tuple[int, ...]:
        """The run's seeds in order, the primary first: ``seeds``, else ``(seed,)``."""
        return self.seeds if self.seeds is not None else (self.seed,)


def cpu_threads(threads: int | None = None) -> int:
    """The number of CPU threads to compute with: ``threads`` if given, else ``$OMP_NUM_THREADS`` if
    set, else the cores that are not busy — the CPU count minus the 1-minute load average, at least
    one. On a shared machine, torch's default of one thread per core makes every step wait for
    threads a busy neighbour holds (a step measured 2.9× slower with 2 threads beside one busy
    process, 1.7× with 1)."""
    if threads is not None:
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = os.cpu_count() or 1
    return max(1, cores - round(os.getloadavg()[0])) if hasattr(os, "getloadavg") else cores


class ModelConfig(Section):
    """``[model]``: the base model — the embedded model (or an alias), ``"tiny"`` (a tiny random
    Llama for tests), a local model directory (it must hold config.json) or a Hugging Face hub id
    "org/name" (not checked here) — and its dtype (auto: float32 on CPU, bfloat16 on GPUs that
    support it)."""

    name: Text = "smollm2-135m"
    dtype: Annotated[str, choice(DTYPES)] = "auto"

    @field_validator("name")
    @classmethod
    def _resolve(cls, name: str, info: ValidationInfo) -> str:
        if name == TINY_MODEL or is_embedded_name(name):
            return name
        base_dirs = (info.context or {}).get("base_dirs", (Path.cwd(),))
        local = find_local(name, base_dirs)
        if local is not None:
            if not local.is_dir():
                raise ValueError(f"{str(local)!r} is a file; expected a model directory (with config.json)")
            if not (local / "config.json").is_file():
                raise ValueError(f"{str(local)!r} is not a model directory: it has no config.json")
            return str(local)
        if is_hub_id(name):
            return name  # a hub id: resolved (cache or download) when the model is loaded
        raise ValueError(f"model path {name!r} does not exist (looked for {looked_for(name, base_dirs)}); a model "
                         f"is {TINY_MODEL!r}, the embedded {EMBEDDED_MODEL!r}, a local model directory or a hub id "
                         "'org/name'")


class DataConfig(Section):
    """``[data]``: the run's tasks, in order (embedded tasks, BIG-bench tasks ``bigbench:<path>``, hub
    presets of :mod:`cpift.data` or the names of ``[[data.datasets]]`` tables; resolved by the
    pipeline), examples per task, the sampling seed, tokens per training example, and the dataset
    specs."""

    tasks: TaskNames
    n_train: int = Field(64, ge=1)
    n_eval: int = Field(32, ge=1)
    seed: Seed = 0
    max_length: int = Field(256, ge=1)
    datasets: DatasetSpecs = ()

    def task_specs(self) -> list[tuple[str, str | dict[str, Any]]]:
        """What to load for each task, in ``tasks`` order: ``(key, spec)`` where ``spec`` is the
        ``[[data.datasets]]`` dict of that name (``key`` = ``"data.datasets[i]"``) or else the name
        itself (``key`` = ``"data.tasks[i]"``), ready for :func:`cpift.data.get_task`."""
        by_name = {spec.name: (f"data.datasets[{i}]", spec.to_dict()) for i, spec in enumerate(self.datasets)}
        return [by_name.get(name, (f"data.tasks[{i}]", name)) for i, name in enumerate(self.tasks)]

    def resolve(self, config: Any) -> DataConfig:
        for i, spec in enumerate(self.datasets):
            if spec.name not in self.tasks:
                raise ConfigError(f"data.datasets[{i}].name", f"{spec.name!r} is not in data.tasks "
                                  f"({', '.join(self.tasks)}); list it there to use the dataset")
        return self


class ProbeConfig(Section):
    """``[probe]``: the per-task fine-tunes that find the core regions — their length, learning
    rate (default ``train.lr``) and optimizer (AdamW, or plain SGD, whose |Δθ| is a sum of
    gradients rather than AdamW's sign-like steps); ``repeats``: probes per task, the first making
    its core, every further one (another data order) kept to measure how reproducible the core is
    (test–retest Jaccard, :func:`cpift.probes.reliability`); ``snapshot_every``: keep the top-p set
    every that many steps to measure how far the core still moves (:func:`cpift.probes.stability`;
    0: not measured)."""

    steps: int = Field(10, ge=1)
    lr: Float | None = Field(None, gt=0)
    optimizer: Annotated[str, choice(OPTIMIZERS)] = "adamw"
    repeats: int = Field(1, ge=1)
    snapshot_every: int = Field(0, ge=0)

    def resolve(self, config: Any) -> ProbeConfig:
        return self if self.lr is not None else self.model_copy(update={"lr": config.train.lr})


class EvalConfig(Section):
    """``[eval]``: scoring the models — new tokens per answer, batch size, whether to measure
    general-ability retention, on how many prose chunks, and on which out-of-distribution tasks
    (never trained on: e.g. BIG-bench tasks, ``data.n_eval`` items each), as the GaLLoP paper
    measures forgetting; ``probes = false`` leaves CPI-FT's probe models unscored (a study that
    compares methods needs only their cores)."""

    max_new_tokens: int = Field(32, ge=1)
    batch_size: int = Field(8, ge=1)
    probes: bool = True
    retention: bool = True
    n_retention_chunks: int = Field(16, ge=1)
    retention_tasks: task_names(min_length=0) = ()

    def resolve(self, config: Any) -> EvalConfig:
        for i, name in enumerate(self.retention_tasks):
            if name in config.data.tasks:
                raise ConfigError(f"eval.retention_tasks[{i}]", f"{name!r} is trained on (it is in data.tasks); "
                                  "a retention task measures what training did not teach")
        return self


class _ConfigBase(BaseModel):
    """The whole config's behaviour; :class:`Config` adds the sections as fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _every_section(cls, data: Any) -> Any:
        """A missing section takes its defaults (so a missing required key is named)."""
        if not isinstance(data, Mapping):
            raise ConfigError(None, f"a configuration is a table of sections, got {type(data).__name__}")
        train = data.get("train")
        for key, home in TrainConfig.FROM_ELSEWHERE.items():
            if isinstance(train, Mapping) and key in train:
                raise ConfigError(f"train.{key}", f"unknown key; did you mean {home}?")
        return {**{name: {} for name in cls.model_fields}, **data}

    @model_validator(mode="after")
    def _resolve(self) -> Any:
        """Fill in derived defaults and check the rules that span sections, section by section."""
        resolved = dict(self)
        resolved["train"] = self.train.model_copy(update={"seed": self.run.seed, "device": self.run.device,
                                                          "max_length": self.data.max_length})
        view = self.model_construct(**resolved)
        for name in type(self).model_fields:
            resolved[name] = getattr(view, name).resolve(view)
            view = self.model_construct(**resolved)
        return view

    def for_seed(self, seed: int) -> Any:
        """This config as the methods of one of its seeds run it: ``run.seed`` and the training
        loop's seed set to ``seed`` (everything else, the evaluation items included, unchanged)."""
        return self.model_copy(update={"run": self.run.model_copy(update={"seed": seed}),
                                       "train": self.train.model_copy(update={"seed": seed})})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The configuration as plain dicts and lists (JSON- and TOML-ready); ``None`` values
        are left out. ``parse_config(config.to_dict()) == config``."""
        return {name: getattr(self, name).model_dump(mode="json", exclude_none=True) for name in type(self).model_fields}

    def to_toml(self) -> str:
        """The configuration as TOML text that :func:`load_config` reads back to an equal config."""
        return tomli_w.dumps(self.to_dict())


def _section_field(model: type[Section]) -> Any:
    return (model, Field(default_factory=dict, validate_default=True))


Config = create_model(
    "Config",
    __base__=_ConfigBase,
    __module__=__name__,
    __doc__="A whole, validated configuration (build it with :func:`load_config` or :func:`parse_config`).",
    run=_section_field(RunConfig),
    model=_section_field(ModelConfig),
    data=_section_field(DataConfig),
    train=_section_field(TrainConfig),
    probe=_section_field(ProbeConfig),
    **{name: _section_field(model) for name, model in _method_sections().items()},
    eval=_section_field(EvalConfig),
)


def parse_config(data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None) -> Config:
    """Validate a configuration given as nested dicts (the TOML structure) and fill in defaults.

    Args:
        data: ``{"run": {...}, "data": {...}, ...}``; missing sections take their defaults.
        base_dir: where relative local paths are looked up first (then the current directory);
            :func:`load_config` passes the config file's directory.

    Raises:
        ConfigError: the first problem found, naming its key path.
    """
    base_dirs = tuple(dict.fromkeys(
        ([Path(base_dir).expanduser().absolute()] if base_dir is not None else []) + [Path.cwd()]))
    try:
        return Config.model_validate(data, context={"base_dirs": base_dirs})
    except ValidationError as exc:
        raise config_error(exc, Config) from None


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
            raise ConfigError(parts[0], f"expected a table, got {describe(section)}")
        section[parts[1]] = value
    return out


def read_config(config: Config | str | os.PathLike[str]) -> Config:
    """A validated :class:`Config` from a ``Config``, a TOML file path, or TOML text.

    A :class:`~pathlib.Path`, or a one-line string naming an existing file, is read as a file;
    any other string is TOML text (relative local paths in it are looked up from the current
    directory).

    Raises:
        ConfigError: invalid TOML or an invalid value, naming the key (and the file).
    """
    if isinstance(config, Config):
        return config
    if isinstance(config, os.PathLike) or ("\n" not in config and Path(config).expanduser().is_file()):
        return load_config(config)
    if "\n" not in config and config.strip().endswith(".toml"):
        return load_config(config)  # a path that does not exist: load_config says so, naming it
    try:
        data = tomllib.loads(config)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(None, f"invalid TOML: {exc}") from exc
    return parse_config(data)
