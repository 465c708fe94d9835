"""Shared fixtures: a tiny random Llama and task models made from it by sparse, seeded edits."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach for a model hub: set before huggingface_hub is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' models are tiny: one thread each is fastest, and OpenMP threads that spin while another
# process holds the other core slow a tiny forward pass 20-fold. Inherited by subprocesses too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cpift.models import tiny_llama  # noqa: E402


def perturbed(base: torch.nn.Module, seed: int, density: float = 0.05, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' state dict: the base's parameters with a seeded random subset moved."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, param in base.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * scale
        keep = torch.rand(param.shape, generator=generator) < density
        out[name] = param.detach() + noise * keep
    return out


@pytest.fixture(scope="session")
def tiny_base() -> torch.nn.Module:
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_tasks(tiny_base: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {task: perturbed(tiny_base, seed) for seed, task in enumerate(("math", "code", "logic"), start=1)}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A finished run of ``configs/tiny.toml`` (every method, probes kept), built once per session."""
    from cpift.pipeline import run_config  # only sessions that use the run import the whole pipeline

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
    return run_config(config, tmp_path_factory.mktemp("tiny_run") / "run", progress=False)
