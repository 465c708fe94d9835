"""Tests of cpift.sources: one rule for "embedded model, local path or hub id", and the import layering."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import cpift
from cpift import sources
from cpift.data import hub
from cpift.sources import EMBEDDED_MODEL, is_embedded_name, is_hub_id, looks_like_path

HUB_IDS = ["openai/gsm8k", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-2-7b-hf", "a/b",
           "org_1/name.v2"]
PATHS = ["./org/name", "../org/name", ".hidden/x", "~/x", "~", "/abs/model", "a/b/c", "org/name/", "/org/name",
         "org/name.json", "org/NAME.JSONL", "org/data.parquet", "org/weights.safetensors", "org/model.gguf",
         "name", "gsm8k", "", "org/", "/name", "-org/name", "org/-name", "org name/x", "C:\\models\\m",
         "C:/models/m", "org\\name"]


@pytest.mark.parametrize("text", HUB_IDS)
def test_hub_ids(text: str) -> None:
    assert is_hub_id(text) and not looks_like_path(text)


@pytest.mark.parametrize("text", PATHS)
def test_paths(text: str) -> None:
    assert looks_like_path(text) and not is_hub_id(text)


def test_embedded_names() -> None:
    assert EMBEDDED_MODEL == "smollm2-135m"
    for name in ("smollm2-135m", " SmolLM2-135M ", "default", "DEFAULT", "SmolLM2-135M-Instruct"):
        assert is_embedded_name(name), name
    for name in ("smollm2", "gpt2", "", "HuggingFaceTB/SmolLM2-135M-Instruct", Path("default"), None):
        assert not is_embedded_name(name), name
    # the embedded names are bare names, so the path/hub rule alone never takes them for hub ids
    assert all(looks_like_path(name) for name in sources.EMBEDDED_ALIASES)


def test_old_homes_reexport_the_same_objects() -> None:
    from cpift import models

    assert models.is_embedded_name is is_embedded_name
    assert models.EMBEDDED_MODEL == cpift.EMBEDDED_MODEL == EMBEDDED_MODEL
    assert models.EMBEDDED_ALIASES is sources.EMBEDDED_ALIASES


def test_dataset_sources_follow_the_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not hub._looks_local("openai/gsm8k")
    for text in ("gsm8k", "a/b/c", "org/name.json", "./org/name", "~/x"):
        assert hub._looks_local(text), text
    (tmp_path / "openai" / "gsm8k").mkdir(parents=True)
    assert hub._looks_local("openai/gsm8k")  # an existing directory wins over the hub id


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_sources_imports_no_torch() -> None:
    _run("import sys, cpift.sources; assert 'torch' not in sys.modules, 'torch imported'")


def test_importing_checkpoint_does_not_import_models() -> None:
    _run("import sys, cpift.checkpoint; assert 'cpift.models' not in sys.modules, 'cpift.models imported'")


def _imports_models(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name == "cpift.models" or alias.name.startswith("cpift.models.") for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        module = node.module or ""
        if module in {"models", "cpift.models"} or module.startswith(("models.", "cpift.models.")):
            return node.level > 0 or module.startswith("cpift")
        parent = node.level > 0 and module == "" or node.level == 0 and module == "cpift"
        return parent and any(alias.name == "models" for alias in node.names)
    return False


def test_checkpoint_never_imports_models() -> None:
    """Not even lazily, inside a function: cpift.models builds on cpift.checkpoint, not the reverse."""
    tree = ast.parse(Path(cpift.__file__).with_name("checkpoint.py").read_text(encoding="utf-8"))
    assert not [ast.unparse(node) for node in ast.walk(tree) if _imports_models(node)]


@pytest.mark.parametrize("line", ["from . import models", "from .models import load_model", "import cpift.models",
                                  "from cpift import models", "from cpift.models import x"])
def test_import_check_catches(line: str) -> None:
    assert any(_imports_models(node) for node in ast.walk(ast.parse(line)))
