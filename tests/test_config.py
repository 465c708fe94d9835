"""Typed configuration: presets, defaults, round trips, and errors that name their key."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import tomllib

from cpift.config import (
    METHODS,
    SEQUENTIAL_METHODS,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    parse_config,
)
from cpift.errors import CpiftError, ParameterError
from cpift.fusion import FOLDS, OVERLAP_RULES
from cpift.grouping import STAGE_ORDERS
from cpift.settings import DISTRIBUTED

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = {"run": {"name": "t"}, "data": {"tasks": ["math", "code", "logic"]}}
DELETE = object()


def with_value(data: dict, key: str, value: Any) -> dict:
    """A deep copy of ``data`` with the dotted ``key`` set to ``value`` (or removed: ``DELETE``)."""
    out = copy.deepcopy(data)
    *parents, last = key.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return out


# -- presets and round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(path.stem for path in CONFIGS.glob("*.toml")))
def test_presets_parse_and_round_trip(name: str, tmp_path: Path) -> None:
    config = load_config(CONFIGS / f"{name}.toml")
    assert isinstance(config, Config) and config.run.name == name
    assert parse_config(config.to_dict()) == config
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()
    assert parse_config(tomllib.loads(config.to_toml())) == config
    (tmp_path / "again.toml").write_text(config.to_toml())
    assert load_config(tmp_path / "again.toml") == config


def test_preset_contents() -> None:
    tiny = load_config(CONFIGS / "tiny.toml")
    assert tiny.model.name == "tiny" and tiny.data.tasks == ("math", "code", "logic", "format")
    assert set(tiny.run.methods) == set(METHODS)
    assert (tiny.train.steps, tiny.data.n_train, tiny.data.n_eval, tiny.probe.steps,
            tiny.eval.max_new_tokens) == (4, 8, 4, 3, 8)
    quick = load_config(CONFIGS / "quick.toml")
    assert quick.model.name == "smollm2-135m" and quick.data.tasks == ("math", "logic", "format")
    n = len(quick.data.tasks)
    total = (n * quick.probe.steps + 3 * quick.train.steps
             + 2 * len(quick.sequential.methods) * quick.train.steps)
    assert 80 <= total <= 110  # about 100 optimizer steps ≈ 8 s each on 2 CPU cores
    every = load_config(CONFIGS / "all_methods.toml")
    assert set(every.run.methods) == set(METHODS) - {"sequential"}
    assert every.cpift.samples_per_task == every.data.n_train  # consolidation sees the same mixture
    total = len(every.run.methods) * every.train.steps + len(every.data.tasks) * every.probe.steps
    assert 70 <= total <= 90  # about 80 optimizer steps ≈ 8 s each on 2 CPU cores (see its header)
    paper = load_config(CONFIGS / "paper.toml")
    assert paper.model.name == "meta-llama/Llama-2-7b-hf" and paper.model.dtype == "bfloat16"
    assert (paper.cpift.p, paper.cpift.tau, paper.run.device) == (1.0, 0.1, "cuda")
    assert [d.name for d in paper.data.datasets] == list(paper.data.tasks)
    assert paper.data.datasets[0].to_dict() == {"name": "gsm8k", "source": "openai/gsm8k", "config": "main",
                                      "format": "gsm8k", "eval_split": "test"}


def test_paper_datasets_are_the_data_modules_presets() -> None:
    from cpift.data.registry import HUB_PRESETS

    paper = load_config(CONFIGS / "paper.toml")
    for i, (key, spec) in enumerate(paper.data.task_specs()):
        assert key == f"data.datasets[{i}]"
        name = spec.pop("name")
        assert spec == dict(HUB_PRESETS[name])


def test_task_specs_mix_names_and_datasets() -> None:
    data = with_value(MINIMAL, "data.datasets", [{**DATASET, "name": "code"}])
    specs = parse_config(data).data.task_specs()
    assert specs == [("data.tasks[0]", "math"), ("data.datasets[0]", {**DATASET, "name": "code"}),
                     ("data.tasks[2]", "logic")]


def test_defaults_filled() -> None:
    config = parse_config(MINIMAL)
    assert config.run.seed == 0 and config.run.methods == METHODS and config.run.device == "auto"
    assert config.model.name == "smollm2-135m" and config.model.dtype == "auto"
    assert (config.data.n_train, config.data.n_eval, config.data.seed, config.data.max_length) == (64, 32, 0, 256)
    assert config.data.datasets == ()
    assert config.train.lr == 1e-4 and config.train.steps == 30 and config.train.batch_size == 4
    assert (config.train.weight_decay, config.train.warmup_steps, config.train.grad_accum) == (0.0, 2, 1)
    assert (config.train.checkpoint_every, config.train.max_grad_norm) == (10, 1.0)
    assert config.probe.steps == 10 and config.probe.lr == config.train.lr
    c = config.cpift
    assert (c.p, c.tau, c.order, c.omega, c.overlap, c.fold, c.fusion_base) == (
        1.0, 0.1, "random", 0.5, "max_delta", "mean", "pretrained")
    assert c.samples_per_task == 64
    assert config.multistage.k == 3 and config.multistage.order == "random"
    assert (config.sequential.first, config.sequential.second) == ("math", "code")
    assert config.sequential.methods == SEQUENTIAL_METHODS
    assert (config.eval.max_new_tokens, config.eval.batch_size, config.eval.retention,
            config.eval.n_retention_chunks) == (32, 8, True, 16)


def test_derived_defaults_follow_other_keys() -> None:
    data = {"run": {"name": "t", "methods": ["cpift"]}, "data": {"tasks": ["math"], "n_train": 10},
            "train": {"lr": 3e-4}}
    config = parse_config(data)
    assert config.probe.lr == 3e-4 and config.cpift.samples_per_task == 10 and config.multistage.k == 1
    assert config.lora.lr == pytest.approx(3e-3) and config.lora.target_modules[0] == "q_proj"
    assert config.sequential.first == "math" and config.sequential.second is None
    assert "second" not in config.to_dict()["sequential"]
    assert parse_config(config.to_dict()) == config


def test_int_accepted_where_float_is_and_lists_become_tuples() -> None:
    config = parse_config(with_value(MINIMAL, "train.lr", 1))
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert isinstance(config.data.tasks, tuple)
    assert isinstance(config.to_dict()["data"]["tasks"], list)


def test_enums_come_from_the_library() -> None:
    for order in STAGE_ORDERS:
        assert parse_config(with_value(MINIMAL, "cpift.order", order)).cpift.order == order
    for rule in OVERLAP_RULES:
        assert parse_config(with_value(MINIMAL, "cpift.overlap", rule)).cpift.overlap == rule
    for fold in FOLDS:
        assert parse_config(with_value(MINIMAL, "cpift.fold", fold)).cpift.fold == fold
    assert parse_config(with_value(MINIMAL, "cpift.fusion_base", "last_stage")).cpift.fusion_base == "last_stage"
    assert parse_config(with_value(MINIMAL, "run.device", "cuda")).run.device == "cuda"
    with pytest.raises(ConfigError, match=r"run\.device: 'cuda:1' .*CUDA_VISIBLE_DEVICES"):
        parse_config(with_value(MINIMAL, "run.device", "cuda:1"))
    for strategy in DISTRIBUTED:
        assert parse_config(with_value(MINIMAL, "train.distributed", strategy)).train.distributed == strategy
    with pytest.raises(ConfigError, match=r"train\.distributed: .*'zero3'"):
        parse_config(with_value(MINIMAL, "train.distributed", "zero3"))


# -- errors name their key -----------------------------------------------------------------------

DATASET = {"name": "gsm", "source": "openai/gsm8k", "format": "gsm8k"}

CASES: list[tuple[str, Any, str, str]] = [
    # (key to set, value, key path the error names, fragment of its message)
    ("trian", {"lr": 1.0}, "trian", "did you mean 'train'?"),
    ("train.lrr", 0.1, "train.lrr", "did you mean 'lr'?"),
    ("train.p", 1.0, "train.p", "did you mean cpift.p or epi.p?"),
    ("name", "x", "name", "run.name or model.name"),
    ("train.zzz", 1, "train.zzz", "valid keys are lr, weight_decay"),
    ("train", 3, "train", "expected a table"),
    ("train.lr", "fast", "train.lr", "expected a number, got string 'fast'"),
    ("train.lr", True, "train.lr", "expected a number, got boolean"),
    ("train.lr", 0, "train.lr", "must be > 0"),
    ("train.lr", -1e-4, "train.lr", "must be > 0"),
    ("train.lr", float("nan"), "train.lr", "finite"),
    ("train.lr", float("inf"), "train.lr", "finite"),
    ("train.steps", 3.0, "train.steps", "expected an integer, got float 3.0"),
    ("train.steps", 0, "train.steps", "must be >= 1"),
    ("train.batch_size", 0, "train.batch_size", "must be >= 1"),
    ("train.grad_accum", 0, "train.grad_accum", "must be >= 1"),
    ("train.weight_decay", -0.1, "train.weight_decay", "must be >= 0"),
    ("train.warmup_steps", -1, "train.warmup_steps", "must be >= 0"),
    ("train.checkpoint_every", -1, "train.checkpoint_every", "must be >= 0"),
    ("train.max_grad_norm", -1, "train.max_grad_norm", "must be >= 0"),
    ("probe.steps", 0, "probe.steps", "must be >= 1"),
    ("probe.lr", 0.0, "probe.lr", "must be > 0"),
    ("cpift.p", 0, "cpift.p", "must be > 0"),
    ("cpift.p", 100.5, "cpift.p", "must be <= 100"),
    ("cpift.tau", -0.1, "cpift.tau", "must be >= 0"),
    ("cpift.tau", 1.5, "cpift.tau", "must be <= 1"),
    ("cpift.omega", 2, "cpift.omega", "must be <= 1"),
    ("cpift.order", "alphabetical", "cpift.order", "is not one of given, random, least_overlap_first"),
    ("cpift.order", "randon", "cpift.order", "did you mean 'random'?"),
    ("cpift.overlap", "first", "cpift.overlap", "is not one of max_delta, last, mean"),
    ("cpift.fold", "median", "cpift.fold", "is not one of mean, sequential"),
    ("cpift.fusion_base", "last", "cpift.fusion_base", "is not one of pretrained, last_stage"),
    ("cpift.samples_per_task", 65, "cpift.samples_per_task", "more than data.n_train (64)"),
    ("cpift.samples_per_task", 0, "cpift.samples_per_task", "must be >= 1"),
    ("run.name", DELETE, "run.name", "required key is missing"),
    ("run.name", "", "run.name", "must not be empty"),
    ("run.name", "my run/1", "run.name", "may hold only letters"),
    ("run.seed", -1, "run.seed", "must be >= 0"),
    ("run.seed", 2**32, "run.seed", "must be < 4294967296"),
    ("run.methods", ["cpift", "qlora"], "run.methods[1]", "'qlora' is not one of cpift, multitask"),
    ("run.methods", [], "run.methods", "must not be empty"),
    ("run.methods", ["cpift", "cpift"], "run.methods", "'cpift' is listed twice"),
    ("run.methods", "cpift", "run.methods", "expected a list, got"),
    ("run.device", "gpu", "run.device", "is not one of auto, cpu, cuda, mps"),
    ("model.dtype", "float16", "model.dtype", "is not one of auto, float32, bfloat16"),
    ("model.name", "./no-such-model", "model.name", "does not exist"),
    ("model.name", "gpt2", "model.name", "does not exist"),
    ("model.name", "a/b/c", "model.name", "does not exist"),
    ("model.name", 3, "model.name", "expected a string"),
    ("data.tasks", DELETE, "data.tasks", "required key is missing"),
    ("data.tasks", [], "data.tasks", "must not be empty"),
    ("data.tasks", ["math", "math"], "data.tasks", "'math' is listed twice"),
    ("data.tasks", ["math", 1], "data.tasks[1]", "expected a string, got integer 1"),
    ("data.tasks", "math", "data.tasks", "expected a list, got"),
    ("data.tasks", ["math", "../x"], "data.tasks[1]", "may hold only letters"),
    ("data.n_train", 0, "data.n_train", "must be >= 1"),
    ("data.n_eval", 0, "data.n_eval", "must be >= 1"),
    ("data.max_length", 0, "data.max_length", "must be >= 1"),
    ("data.datasets", {"name": "x"}, "data.datasets", "expected an array of tables"),
    ("data.datasets", [3], "data.datasets[0]", "expected a table"),
    ("data.datasets", [{"name": "gsm", "format": "gsm8k"}], "data.datasets[0].source", "required key is missing"),
    ("data.datasets", [{**DATASET, "source": "data/missing.jsonl"}], "data.datasets[0].source", "does not exist"),
    ("data.datasets", [{**DATASET, "source": "./missing"}], "data.datasets[0].source", "does not exist"),
    ("data.datasets", [DATASET, {**DATASET, "n_trian": 3}], "data.datasets[1].n_trian", "did you mean 'n_train'?"),
    ("data.datasets", [{**DATASET, "n_train": 0}], "data.datasets[0].n_train", "must be >= 1"),
    ("data.datasets", [{**DATASET, "n_eval": 2.5}], "data.datasets[0].n_eval", "expected an integer"),
    ("data.datasets", [{**DATASET, "columns": "question"}], "data.datasets[0].columns", "expected a table"),
    ("data.datasets", [{**DATASET, "columns": {"q": 1}}], "data.datasets[0].columns.q", "expected a string"),
    ("data.datasets", [DATASET, DATASET], "data.datasets[1].name", "used twice"),
    ("data.datasets", [{**DATASET, "format": ""}], "data.datasets[0].format", "must not be empty"),
    ("data.datasets", [{**DATASET, "format": "chat"}], "data.datasets[0].format", "is not one of gsm8k, codealpaca"),
    ("data.datasets", [{**DATASET, "subset": "main"}], "data.datasets[0].subset", "unknown key; valid keys are"),
    ("data.datasets", [{**DATASET, "eval_source": "data/eval.jsonl"}], "data.datasets[0].eval_source",
     "does not exist"),
    ("data.datasets", [{**DATASET, "seed": -1}], "data.datasets[0].seed", "must be >= 0"),
    ("data.datasets", [{**DATASET, "max_turns": 0}], "data.datasets[0].max_turns", "must be >= 1"),
    ("data.datasets", [{**DATASET, "split": 3}], "data.datasets[0].split", "expected a string"),
    ("data.datasets", [DATASET], "data.datasets[0].name", "'gsm' is not in data.tasks (math, code, logic)"),
    ("multistage.k", 4, "multistage.k", "4 stages for 3 task(s)"),
    ("multistage.k", 0, "multistage.k", "must be >= 1"),
    ("multistage.order", "greedy", "multistage.order", "is not one of random, heuristic"),
    ("sequential.first", "mth", "sequential.first", "did you mean 'math'?"),
    ("sequential.second", "math", "sequential.second", "must differ from sequential.first"),
    ("sequential.methods", ["sequential"], "sequential.methods[0]", "is not one of multitask, multistage, cpift"),
    ("lora.rank", 0, "lora.rank", "must be >= 1"),
    ("lora.alpha", 0, "lora.alpha", "must be > 0"),
    ("lora.dropout", 1.0, "lora.dropout", "must be < 1"),
    ("lora.target_modules", [], "lora.target_modules", "must not be empty"),
    ("lora.target_modules", ["q_proj", "q_proj"], "lora.target_modules", "'q_proj' is listed twice"),
    ("lora.lr", -1e-3, "lora.lr", "must be > 0"),
    ("lora.ranks", 8, "lora.ranks", "unknown key; did you mean 'rank'?"),
    ("eval.retention", "yes", "eval.retention", "expected true or false"),
    ("eval.max_new_tokens", 0, "eval.max_new_tokens", "must be >= 1"),
    ("eval.batch_size", 0, "eval.batch_size", "must be >= 1"),
    ("eval.n_retention_chunks", 0, "eval.n_retention_chunks", "must be >= 1"),
]


@pytest.mark.parametrize(("key", "value", "path", "fragment"), CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_error_names_its_key(key: str, value: Any, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(with_value(MINIMAL, key, value))
    error = info.value
    assert error.key == path
    assert str(error).startswith(f"{path}: ")
    assert fragment in str(error)
    assert isinstance(error, ParameterError) and isinstance(error, CpiftError) and isinstance(error, ValueError)


def test_sequential_needs_two_tasks() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"run": {"name": "t"}, "data": {"tasks": ["math"]}})
    assert info.value.key == "run.methods" and "at least two tasks" in str(info.value)


def test_not_a_table() -> None:
    with pytest.raises(ConfigError, match="a configuration is a table"):
        parse_config([1, 2])  # type: ignore[arg-type]


def test_error_from_one_message() -> None:
    error = ConfigError("data.tasks[0]: unknown task 'x'")
    assert (error.key, error.reason, str(error)) == ("data.tasks[0]", "unknown task 'x'", "data.tasks[0]: unknown task 'x'")
    plain = ConfigError("something went wrong")
    assert (plain.key, plain.reason) == (None, "something went wrong")


def test_error_pickles() -> None:
    error = ConfigError("train.lr", "must be > 0", "x.toml")
    again = pickle.loads(pickle.dumps(error))
    assert (again.key, again.reason, again.file, str(again)) == ("train.lr", "must be > 0", "x.toml", str(error))


# -- files and paths -----------------------------------------------------------------------------


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname = 'x'\n")
    with pytest.raises(ConfigError, match="invalid TOML") as info:
        load_config(bad)
    assert str(bad) in str(info.value)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[run]\nname = "x"\n[data]\ntasks = ["math"]\n[train]\nlr = -1\n')
    with pytest.raises(ConfigError) as info:
        load_config(wrong)
    assert str(info.value) == f"{wrong}: train.lr: must be > 0, got -1.0"
    assert info.value.key == "train.lr" and info.value.file == str(wrong)


def test_local_paths_resolve_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "configs"
    (folder / "models" / "m").mkdir(parents=True)
    (folder / "models" / "m" / "config.json").write_text("{}")
    (folder / "models" / "empty").mkdir()
    (folder / "data").mkdir()
    (folder / "data" / "math.jsonl").write_text("{}\n")
    text = ('[run]\nname = "x"\nmethods = ["cpift"]\n[model]\nname = "{model}"\n[data]\ntasks = ["mine"]\n'
            '[[data.datasets]]\nname = "mine"\nsource = "data/math.jsonl"\nformat = "custom"\n'
            'columns = {{ prompt = "q", answer = "a" }}\nscorer = "exact"\n')
    (folder / "ok.toml").write_text(text.format(model="models/m"))
    config = load_config(folder / "ok.toml")
    assert config.model.name == str(folder / "models" / "m")
    spec = config.data.datasets[0]
    assert spec.source == str(folder / "data" / "math.jsonl")
    assert spec.scorer == "exact" and spec.columns == {"prompt": "q", "answer": "a"}  # passed through
    assert load_config(folder / "ok.toml") == parse_config(config.to_dict())

    (folder / "empty.toml").write_text(text.format(model="models/empty"))
    with pytest.raises(ConfigError, match="no config.json") as info:
        load_config(folder / "empty.toml")
    assert info.value.key == "model.name"
    (folder / "gone.toml").write_text(text.format(model="./models/gone"))
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(folder / "gone.toml")
    assert info.value.key == "model.name" and str(folder / "models" / "gone") in str(info.value)


def test_model_names_that_need_no_file() -> None:
    for name in ("tiny", "smollm2-135m", "SmolLM2-135M-Instruct", "default", "meta-llama/Llama-2-7b-hf"):
        assert parse_config(with_value(MINIMAL, "model.name", name)).model.name == name


def test_overrides(tmp_path: Path) -> None:
    data = apply_overrides(MINIMAL, ["train.lr=3e-4", 'data.tasks=["math", "code"]', "model.name=tiny",
                                     "eval.retention=false"])
    config = parse_config(data)
    assert config.train.lr == 3e-4 and config.data.tasks == ("math", "code")
    assert config.model.name == "tiny" and config.eval.retention is False
    assert MINIMAL["data"]["tasks"] == ["math", "code", "logic"]  # the input is not changed
    for bad in ("train.lr", "lr=3", "a.b.c=1", "=3"):
        with pytest.raises(ConfigError, match="section.key=value"):
            apply_overrides(MINIMAL, [bad])
    path = tmp_path / "c.toml"
    path.write_text('[run]\nname = "x"\n[data]\ntasks = ["math", "code"]\n')
    assert load_config(path, ["train.steps=5"]).train.steps == 5
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.steps=0"])
    assert info.value.key == "train.steps"


def test_cpu_threads_follow_the_setting_or_the_free_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from cpift.config import cpu_threads

    assert parse_config(MINIMAL).run.threads is None
    assert parse_config(with_value(MINIMAL, "run.threads", 3)).run.threads == 3
    with pytest.raises(ConfigError, match=r"run\.threads: must be >= 1"):
        parse_config(with_value(MINIMAL, "run.threads", 0))
    assert cpu_threads(5) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (1.2, 0.0, 0.0))
    assert cpu_threads() == 1
    monkeypatch.setattr("os.getloadavg", lambda: (0.1, 0.0, 0.0))
    assert cpu_threads() == 2
    monkeypatch.setattr("os.getloadavg", lambda: (7.0, 0.0, 0.0))
    assert cpu_threads() == 1
