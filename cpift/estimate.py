"""What a run will do, and what it costs on a CPU, predicted from its config before launch.

:func:`planned_work` counts a run's optimizer steps and scored models from each method's declared
plan; :func:`estimate_cpu_seconds` turns them into CPU time from costs measured on the project's
2-core machine (see its docstring). The app's launcher shows the estimate before a run starts;
:func:`cpift.explore.run_progress` uses the planned steps for a run's ETA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config

__all__ = ["CpuEstimate", "estimate_cpu_seconds", "planned_work"]


def planned_work(config: Config) -> tuple[dict[str, int], dict[str, int]]:
    """Optimizer steps and scored models per method of ``config`` (all its seeds together), from
    each method's declared :class:`~cpift.methods.registry.Plan`, and the base model (under
    ``"base"``: 0 steps, scored once)."""
    from .methods import METHODS

    seeds = len(config.run.all_seeds)
    plans = {method: METHODS[method].plan(config) for method in config.run.methods}
    return ({"base": 0, **{m: p.steps * seeds for m, p in plans.items()}},
            {"base": 1, **{m: p.models * seeds for m, p in plans.items()}})


@dataclass(frozen=True)
class CpuEstimate:
    """A run's predicted CPU time (seconds), by part; ``total_s`` is their sum."""

    steps: int
    models: int
    train_s: float
    eval_s: float
    overhead_s: float
    basis: str

    @property
    def total_s(self) -> float:
        """The whole predicted time: training, scoring and overhead."""
        return self.train_s + self.eval_s + self.overhead_s


# Measured on the project's 2-core x86_64 CPU machine with SmolLM2-135M-Instruct in float32 (the
# numbers in configs/quick.toml's header): one AdamW step at batch 4 × 128 tokens ≈ 8 s; greedy
# generation of 32 new tokens for a batch of 8 prompts ≈ 7 s; a forward pass over 32 × 128
# tokens ≈ 17 s; loading the model, core regions and fusion together ≈ 60 s.
_STEP_S, _STEP_TOKENS = 8.0, 4 * 128
_GENERATE_S, _GENERATE_TOKENS = 7.0, 8 * 32
_FORWARD_S, _FORWARD_TOKENS = 17.0, 32 * 128
_OVERHEAD_S = 60.0
_RETENTION_CHUNK_TOKENS = 110  # cpift.data.retention_text's 512-character chunks, in SmolLM2 tokens


def estimate_cpu_seconds(config: Config) -> CpuEstimate | None:
    """Predicted CPU time of a run of ``config`` on a 2-core machine, or ``None`` for a model
    whose costs were not measured (only the embedded SmolLM2-135M's are).

    The costs (measured on the project's 2-core x86_64 machine, float32, see configs/quick.toml):
    an optimizer step of 4 × 128 tokens ≈ 8 s, generating 32 tokens for 8 prompts ≈ 7 s, a
    forward pass over 32 × 128 tokens ≈ 17 s, and ≈ 60 s of loading, core regions and fusion.
    Each scales linearly with its tokens: a step with ``batch_size × grad_accum × max_length``,
    a generation batch with ``eval.batch_size × max_new_tokens``, retention with its prose chunks
    (≈ 110 tokens each) and its zero-shot questions (generated in batches like a task). For
    ``configs/quick.toml`` this predicts 17.5 min; the measured run took 19 min. Steps and scored
    models come from :func:`planned_work`; each scored model generates ``⌈n_eval / eval.batch_size⌉``
    batches per task.
    """
    from .models import is_embedded_name

    if not is_embedded_name(config.model.name):
        return None
    plan_steps, plan_models = planned_work(config)
    steps, models = sum(plan_steps.values()), sum(plan_models.values())
    t, e = config.train, config.eval
    step_s = _STEP_S * t.batch_size * t.grad_accum * config.data.max_length / _STEP_TOKENS
    batches = len(config.data.tasks) * math.ceil(config.data.n_eval / e.batch_size)
    generate_s = batches * _GENERATE_S * e.batch_size * e.max_new_tokens / _GENERATE_TOKENS
    # Retention: a forward pass over the prose chunks, and the zero-shot questions generated like a task.
    from .data import retention_task

    questions = len(retention_task().eval)
    retention_s = (_FORWARD_S * e.n_retention_chunks * _RETENTION_CHUNK_TOKENS / _FORWARD_TOKENS
                   + math.ceil(questions / e.batch_size) * _GENERATE_S * e.batch_size * e.max_new_tokens
                   / _GENERATE_TOKENS if e.retention else 0.0)
    return CpuEstimate(
        steps=steps, models=models, train_s=steps * step_s, eval_s=models * (generate_s + retention_s),
        overhead_s=_OVERHEAD_S,
        basis=(f"{steps} optimizer steps × {step_s:.1f} s and {models} scored models × "
               f"{generate_s + retention_s:.0f} s, from costs measured on a 2-core CPU"),
    )
