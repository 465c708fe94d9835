"""The CUDA path: training, exact freezing and the quick preset on a GPU.

Every test here needs CUDA and skips with that reason elsewhere; run them on a GPU machine with
``pytest -m gpu``. `device = "auto"` picks CUDA with bf16 autocast where the GPU supports it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from cpift.config import load_config
from cpift.data import get_task
from cpift.freezing import MaskedOptimizer
from cpift.models import tiny_llama, tiny_tokenizer
from cpift.settings import TrainConfig
from cpift.train import train

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible here")]


def test_a_training_step_on_cuda_moves_the_weights() -> None:
    model = tiny_llama(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(lr=1e-2, batch_size=2, steps=2, warmup_steps=0, checkpoint_every=0, max_length=256,
                         seed=0, device="cuda")
    result = train(model, tiny_tokenizer(), get_task("math", n_train=8, n_eval=0).train, config, progress=False)
    assert result.steps_run == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert next(model.parameters()).device.type == "cuda"
    assert any(not torch.equal(p.detach().cpu(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_masked_freezing_is_exact_on_cuda(fused: bool) -> None:
    model = tiny_llama(0).cuda()
    frozen = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.5
              for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MaskedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused),
                                model, frozen)
    for _ in range(3):
        ids = torch.randint(0, 99, (2, 16), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        mask = frozen[name].cuda()
        assert torch.equal(p.detach()[mask], before[name][mask]), name
        assert not torch.equal(p.detach()[~mask], before[name][~mask]), name


def test_the_quick_preset_runs_end_to_end_on_cuda(tmp_path: Path) -> None:
    from cpift.pipeline import run_config

    config = load_config(ROOT / "configs" / "quick.toml", ['run.device="cuda"'])
    started = time.perf_counter()
    run = run_config(config, tmp_path / "quick", progress=False)
    assert run.status == "done"
    print(f"quick preset on {torch.cuda.get_device_name()}: {time.perf_counter() - started:.0f} s")
