"""Supervised fine-tuning on chat examples: the one training loop behind every CPI-FT stage.

Probe runs (one task alone), consolidation stages (frozen cores) and baselines all call
:func:`train`. It is a plain loop in the style of nanoGPT: tokenize, cycle through a seeded order,
forward, backward, clip, step, log, checkpoint.

Data. :func:`cpift.data.chat.tokenize_chat` renders an :class:`~cpift.data.tasks.Example`'s
messages with the tokenizer's chat template (as evaluation renders prompts) and puts the loss on
the assistant tokens only (each assistant reply and its end-of-turn token); the prompt, the
system message and padding get label ``-100``. Sequences are cut to ``max_length`` tokens (the
start is kept); an example whose answer lies wholly beyond the cut would train on nothing, so it
is dropped and counted in :attr:`TrainResult.examples_skipped`. Batches are padded on the right.

Order. Training samples come from an endless stream: epoch ``e`` is a permutation of the examples
drawn from ``numpy.random.default_rng([seed, e])``, grouped by length (windows of 16 batches
sorted by length, the window's batches shuffled), and optimizer step ``s`` takes the stream's
positions ``s·B·A … (s+1)·B·A − 1`` (B = batch size, A = gradient accumulation; with several
processes each takes its own slice). The batch of any step is therefore a pure function of the
seed and the step number, which is what makes resuming exact.

Loss. Cross-entropy summed over the assistant tokens of the whole accumulation window and
divided by their number (the LM head runs at those tokens only), so every answer token weighs the same however the tokens fall into
micro-batches (with several processes each normalises by its own count, and gradients are
averaged). The ``loss`` reported per step is that token-weighted mean.

Optimizer. AdamW from torch (betas 0.9/0.999; the fused kernel on CPU and CUDA), or plain SGD
(``optimizer = "sgd"``, e.g. for probes whose update should be a sum of gradients); weight decay
on matrices only — 1-D parameters (norm weights, biases) are not decayed, as in nanoGPT and the
Hugging Face Trainer. It is always
wrapped in :class:`~cpift.freezing.MaskedOptimizer` (with no masks the wrapper does nothing), so
frozen elements stay bit-identical through the AdamW update *and* its weight decay. Gradient
clipping uses the norm of the full gradient, frozen elements included: the mask multiplies the
final update (θ ← θ + Δθ ⊙ M), as the CPI-FT paper writes it. The learning rate warms up
linearly for ``warmup_steps`` (the first step has lr 0, as in ``transformers``) then decays
with a half cosine to 0 at ``steps`` (``transformers.get_cosine_schedule_with_warmup``).

Devices. :class:`accelerate.Accelerator` places the model and batches: ``device="auto"`` picks
CUDA, then MPS, then CPU. CUDA trains in bf16 autocast (fp32 master weights; plain fp32 on GPUs
without bf16), CPU and MPS in fp32 (bf16 on CPU is hundreds of times slower). The same code runs
data-parallel under ``torchrun``/``accelerate launch`` as ``config.distributed`` says: ``"ddp"``
(a whole model per process, gradient sync only on the last micro-batch) or ``"fsdp"`` (FSDP2:
parameters, gradients and optimizer state sharded, :mod:`cpift.fsdp`); checkpoints are published
by the main process, and both paths are tested on two CPU processes
(``tests/test_distributed.py``). ``accelerate`` keeps one device/precision setting per process: train on one kind of
device per process.

Checkpoints. With ``checkpoint_dir``, every ``checkpoint_every`` steps and at the end
``checkpoint_dir/step-XXXXXX/`` is published atomically with accelerate's saved state (model,
optimizer, scheduler, RNGs, the hook's state) and a ``trainer_state.json`` (step, losses, tokens
seen, config, fingerprints of the data and frozen set); only the last two are kept.
``resume=True`` continues from the newest complete checkpoint, after checking that the config,
data and frozen set match; on CPU the final weights are bit-identical to an uninterrupted run.
:mod:`cpift.train_state` has the file layout and the rules.

Progress. After each optimizer step ``on_event`` receives ``{"event": "step", "stage", "step",
"steps", "loss", "lr", "tokens_per_s", "eta_s", "grad_norm", "tokens", "examples_per_step"}``
(``tokens``: non-padding tokens seen since step 1); it also gets
``{"event": "checkpoint", "stage", "step", "path"}`` after each checkpoint and
``{"event": "resume", "stage", "step", "path"}`` when a run continues from one. A tqdm bar shows
the same (``progress=None``: only on a terminal).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from cpift import fsdp
from cpift.data.chat import IGNORE_INDEX, collate, pad_token_id, tokenize_chat, tokenize_examples
from cpift.errors import CpiftError, ParameterError
from cpift.freezing import MaskedOptimizer
from cpift.settings import DEVICES, TrainConfig
from cpift.train_state import (
    check_resumable,
    checkpoint_path,
    checkpoint_to_resume,
    load_checkpoint,
    read_trainer_state,
    register_state,
    run_fingerprint,
    save_checkpoint,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cpift.data.tasks import Example

# IGNORE_INDEX, collate and tokenize_chat are re-exported from cpift.data.chat, where they live.
__all__ = [
    "IGNORE_INDEX",
    "TrainConfig",
    "TrainHook",
    "TrainResult",
    "collate",
    "estimate_gradients",
    "resolve_device",
    "tokenize_chat",
    "train",
]

_log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------
# Batches and loss
# --------------------------------------------------------------------------------------------


def _n_targets(batch: Mapping[str, torch.Tensor]) -> int:
    """Number of tokens that carry loss in a collated batch (labels are shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _loss_sum(model: torch.nn.Module, head: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy summed over the assistant tokens of a batch on the model's device.

    The LM head and the cross-entropy run only at the positions that carry loss (about a quarter
    of a padded chat batch): the model's forward returns its last hidden states (keeping the
    logits of one position only), and ``head`` — its output embedding — is applied to the
    gathered positions. The forward still goes through ``model`` itself, so a DDP wrapper syncs.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = head(out.hidden_states[-1][:, :-1][keep]).float()
    return F.cross_entropy(logits, labels[keep], reduction="sum")


# Examples per window of the stream sorted by length: batches pad little, and the order within
# an epoch stays random at the scale of windows.
_LENGTH_WINDOW_BATCHES = 16


@functools.lru_cache(maxsize=4)
def _epoch_order(lengths: tuple[int, ...], seed: int, epoch: int, batch_size: int) -> tuple[int, ...]:
    """Epoch ``epoch`` of the stream: a seeded permutation, cut into windows of
    :data:`_LENGTH_WINDOW_BATCHES` batches; within a window the examples are sorted by length and
    its batches shuffled. A pure function of its arguments, so resuming stays exact."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    window = batch_size * _LENGTH_WINDOW_BATCHES
    out: list[int] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lengths.__getitem__)
        batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        out += [i for b in rng.permutation(len(batches)).tolist() for i in batches[b]]
    return tuple(out)


def _stream_indices(lengths: tuple[int, ...], seed: int, batch_size: int, first: int, count: int) -> list[int]:
    """Example indices at positions ``first … first+count−1`` of the endless seeded stream."""
    out = []
    for k in range(first, first + count):
        epoch, pos = divmod(k, len(lengths))
        out.append(_epoch_order(lengths, seed, epoch, batch_size)[pos])
    return out


def _micro_batches(data: Sequence[Mapping[str, list[int]]], lengths: tuple[int, ...], pad_id: int,
                   config: TrainConfig, step: int, world: int, rank: int) -> list[dict[str, torch.Tensor]]:
    """The collated micro-batches process ``rank`` of ``world`` trains on at optimizer step ``step``
    (0-based): its slices of the seeded stream, a pure function of (seed, step). ``lengths`` are
    the examples' token counts (computed once per call of :func:`train`)."""
    # The stream is cut into global batches (every micro-batch of every process of one step), so
    # a step trains on the same examples whatever the number of processes and accumulation steps.
    global_batch = config.batch_size * config.grad_accum * world
    batches = []
    for micro in range(config.grad_accum):
        first = ((step * config.grad_accum + micro) * world + rank) * config.batch_size
        indices = _stream_indices(lengths, config.seed, global_batch, first, config.batch_size)
        batches.append(collate([data[i] for i in indices], pad_id))
    return batches


def _forward_backward(accelerator: Any, model: torch.nn.Module, head: torch.nn.Module,
                      batches: Sequence[Mapping[str, torch.Tensor]]) -> tuple[float, int]:
    """Accumulate one optimizer step's gradient over its micro-batches.

    Each micro-batch's summed loss is divided by the step's number of target tokens over all
    processes (and multiplied by their number, which DDP's gradient averaging divides out), so
    every assistant token of the global batch weighs the same and the gradient is the one a
    single process would compute on the whole global batch; DDP syncs gradients on the last
    micro-batch only. Returns the step's token-weighted mean loss and its non-padding tokens,
    both over all processes.
    """
    world = accelerator.num_processes
    n_local = sum(_n_targets(b) for b in batches)
    n_targets = int(accelerator.reduce(torch.tensor(n_local, device=accelerator.device), reduction="sum")) \
        if world > 1 else n_local
    loss_sum = torch.zeros((), device=accelerator.device)
    n_tokens = 0
    for micro, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        sync = micro == len(batches) - 1
        with contextlib.nullcontext() if sync else fsdp.no_sync(accelerator, model):
            micro_sum = _loss_sum(model, head, batch)
            accelerator.backward(micro_sum / n_targets * world)
        loss_sum += micro_sum.detach()
        n_tokens += int(batch["attention_mask"].sum())
    totals = torch.tensor([float(loss_sum), n_tokens], dtype=torch.float32, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0] / n_targets), int(totals[1])


# --------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------


# Fields that change the training trajectory: a checkpoint resumes only under the same values.
_TRAJECTORY_FIELDS = ("lr", "weight_decay", "warmup_steps", "steps", "batch_size", "grad_accum",
                      "max_length", "max_grad_norm", "seed", "optimizer")


def resolve_device(device: str) -> str:
    """The concrete device kind for ``device`` (``"auto"`` → cuda, mps or cpu).

    Raises:
        ParameterError: unknown name, or the named device is not available here.
    """
    if device not in DEVICES:
        raise ParameterError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device='cuda' but CUDA is not available here (use 'auto' or 'cpu')")
    if device == "mps" and not mps_ok:
        raise ParameterError("device='mps' but MPS is not available here (use 'auto' or 'cpu')")
    return device


@dataclass
class TrainResult:
    """What :func:`train` did.

    ``losses`` lists the loss of every optimizer step from step 1 on, those restored from a
    checkpoint included, so a resumed run reports the same as an uninterrupted one;
    ``tokens_seen`` (non-padding input tokens, all processes) likewise counts from step 1.
    ``seconds`` and ``steps_run`` cover this call only.
    """

    stage: str
    final_loss: float
    losses: list[float]
    tokens_seen: int
    seconds: float
    steps_run: int
    step: int
    examples_skipped: int
    resumed_from: int | None = None
    checkpoint: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class TrainHook:
    """Extension points of :func:`train` for methods whose frozen set changes while training (EPI).

    Subclass and override what you need; the defaults do nothing. :func:`train` calls, per
    optimizer step ``step`` (1-based, counted within the call):

    * :meth:`after_backward` once the step's gradients are complete (all micro-batches, before
      clipping and before frozen elements' gradients are zeroed);
    * :meth:`after_step` after the update; a mapping it returns becomes the frozen set from the
      next step on (``{}`` unfreezes all, ``None`` keeps the current one).

    For exact resume, :meth:`state_dict` is saved in each checkpoint (the hook is registered
    for accelerate's checkpointing, which writes it with ``torch.save``); on resume
    :meth:`load_state_dict` restores it and :meth:`frozen` gives the frozen set that was in
    force at the checkpoint. With several processes every process calls the hook.
    """

    def after_backward(self, model: torch.nn.Module, step: int) -> None:
        """Called with the gradients of step ``step`` in ``model``'s parameters' ``.grad``."""

    def after_step(self, step: int) -> Mapping[str, torch.Tensor] | None:
        """Called after step ``step``'s update; may return the frozen set for the following steps."""
        return None

    def frozen(self) -> Mapping[str, torch.Tensor] | None:
        """The frozen set in force (read after :meth:`load_state_dict` on resume)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The hook's state, saved with each checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (on resume)."""


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


def _make_accelerator(device: str) -> Any:
    from accelerate import Accelerator

    mixed = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    try:
        accelerator = Accelerator(mixed_precision=mixed, cpu=device == "cpu")
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        raise ParameterError(
            f"this process already trained with another device or precision; accelerate keeps "
            f"one setting per process, so train on {device!r} in a new process ({exc})"
        ) from exc
    if accelerator.device.type != device:
        raise ParameterError(
            f"asked to train on {device!r} but accelerate's process-wide state is on "
            f"{accelerator.device.type!r}: train on one kind of device per process"
        )
    return accelerator


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for param in model.parameters():  # a tied weight is listed once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _optimizer(name: str, groups: list[dict[str, Any]], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """``"adamw"``: torch's AdamW, fused into one kernel where the device has it (CPU and CUDA:
    several times faster than the per-tensor loop, same update), the default implementation
    elsewhere. ``"sgd"``: plain SGD (no momentum; weight decay as the groups say), whose update is
    the gradient itself rather than Adam's sign-like step."""
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if device.type in ("cpu", "cuda"):
        with contextlib.suppress(RuntimeError, ValueError):
            return torch.optim.AdamW(groups, lr=lr, fused=True)
    return torch.optim.AdamW(groups, lr=lr)


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    frozen: Mapping[str, torch.Tensor] | None = None,
    stage: str = "train",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
    hook: TrainHook | None = None,
) -> TrainResult:
    """Fine-tune ``model`` in place on the assistant replies of ``examples``.

    See the module docstring for the data order, loss, optimizer, devices and checkpoints. The
    same code runs data-parallel on several processes (``torchrun``/``accelerate launch``: only the
    main process calls ``on_event``, shows progress and publishes checkpoints); a step trains on
    the same global batch with the same gradient as one process would, frozen elements exact
    (tested with two CPU processes over gloo, ``tests/test_distributed.py``).

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``); trained in place, left
            on the training device (under FSDP: where it was, the trained weights gathered into
            it) and in eval mode.
        tokenizer: its tokenizer, with a chat template.
        examples: training examples (:class:`~cpift.data.tasks.Example` or message sequences);
            each needs an assistant reply within ``config.max_length`` tokens, others are
            skipped and counted.
        config: hyper-parameters.
        frozen: parameter name → bool mask of elements kept bit-identical (CPI-FT's protected
            cores), keyed as ``model.named_parameters()`` lists them.
        stage: name used in events, the progress bar and error messages.
        checkpoint_dir: where ``step-XXXXXX`` checkpoints go (None: no checkpoints).
        resume: continue from the newest complete checkpoint in ``checkpoint_dir`` (start fresh
            if there is none).
        on_event: called with a dict after each optimizer step and checkpoint (see the module
            docstring); an exception it raises stops training (checkpoints already written stay).
        progress: show a tqdm bar: True, False, or None for "only on a terminal".
        hook: a :class:`TrainHook` that sees each step's gradients and may change the frozen
            set between steps (EPI); its state is checkpointed and restored on resume.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ParameterError: a config field out of range, no training examples (or none with an
            answer within ``max_length``), ``resume`` without ``checkpoint_dir``, or a
            ``checkpoint_dir`` holding checkpoints while ``resume`` is False.
        MismatchError: a frozen mask does not fit the model, or the checkpoint to resume was
            written with other settings, data or frozen set.
        CheckpointError: the checkpoint to resume cannot be read.
        CpiftError: the loss or gradient norm became NaN/inf (names the stage and step).
    """
    started = time.perf_counter()
    if not isinstance(config, TrainConfig):
        raise ParameterError(f"config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(model, torch.nn.Module):
        raise ParameterError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if examples is None or len(examples) == 0:
        raise ParameterError(f"stage {stage!r}: no training examples")
    device = resolve_device(config.device)
    ckpt_root = Path(checkpoint_dir).expanduser().absolute() if checkpoint_dir is not None else None
    if resume and ckpt_root is None:
        raise ParameterError("resume=True needs a checkpoint_dir to resume from")

    # ---- data
    data, skipped = tokenize_examples(tokenizer, examples, config.max_length, stage)
    pad_id = pad_token_id(tokenizer)

    # ---- processes (one, or those of a distributed launch)
    accelerator = _make_accelerator(device)
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    if world > 1 and config.distributed == "none":
        raise ParameterError(
            f"stage {stage!r}: launched on {world} processes but train.distributed is 'none'; "
            "set it to 'ddp' or 'fsdp', or launch one process")
    fingerprint = run_fingerprint(data, frozen, hook, world)

    # ---- the checkpoint to resume, checked before the model moves
    resume_from = checkpoint_to_resume(ckpt_root, resume, stage) if ckpt_root is not None else None
    saved: dict[str, Any] = {}
    if resume_from is not None:
        saved = read_trainer_state(resume_from)
        check_resumable(resume_from, saved, {name: getattr(config, name) for name in _TRAJECTORY_FIELDS},
                        fingerprint)

    # ---- model, optimizer, schedule
    from transformers import get_cosine_schedule_with_warmup

    sharded = world > 1 and config.distributed == "fsdp"
    whole_model = model
    # FSDP trains a sharded copy and writes the weights back at the end; DDP wraps the model.
    model = fsdp.shard(model, accelerator.device, accelerator.mixed_precision) if sharded \
        else accelerator.prepare(model)
    raw_model = model if sharded else accelerator.unwrap_model(model)
    trainable = {n for n, p in raw_model.named_parameters() if p.requires_grad}
    known = dict(raw_model.named_parameters())

    def trainable_only(masks: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        # Masks of parameters that do not train at all are moot; unknown names still fail.
        return {n: m for n, m in (masks or {}).items() if n not in known or n in trainable}

    head = raw_model.get_output_embeddings()
    optimizer = _optimizer(config.optimizer, _param_groups(raw_model, config.weight_decay), config.lr, accelerator.device)
    masked = MaskedOptimizer(optimizer, raw_model, trainable_only(frozen))
    scheduler = get_cosine_schedule_with_warmup(masked.optimizer, config.warmup_steps, config.steps)
    register_state(accelerator, None if sharded else optimizer, scheduler, hook)
    shards = (model, optimizer) if sharded else None

    # ---- resume (model, optimizer, schedule, hook and RNGs as they were), or seed a fresh run
    step, losses, tokens_before = 0, [], 0
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, shards)
        step, losses = int(saved["step"]), [float(x) for x in saved["losses"]]
        tokens_before = int(saved["tokens_seen"])
        if hook is not None:
            masked.set_frozen(trainable_only(hook.frozen()))
        _log.info("stage %r: resuming from %s (step %d of %d)", stage, resume_from, step, config.steps)
        if main and on_event is not None:
            on_event({"event": "resume", "stage": stage, "step": step, "path": str(resume_from)})
    else:
        from accelerate.utils import set_seed

        set_seed(config.seed)
    start_step = step

    # ---- loop
    from tqdm.auto import tqdm

    per_step = config.batch_size * config.grad_accum * world
    tokens_run = 0
    last_checkpoint = resume_from
    bar = tqdm(total=config.steps, initial=step, desc=stage, unit="step",
               disable=(not main) or (None if progress is None else not progress))
    lengths = tuple(len(example["input_ids"]) for example in data)
    try:
        model.train()
        while step < config.steps:
            # forward and backward
            batches = _micro_batches(data, lengths, pad_id, config, step, world, rank)
            loss, tokens = _forward_backward(accelerator, model, head, batches)
            tokens_run += tokens
            if not math.isfinite(loss):
                raise CpiftError(
                    f"stage {stage!r}: the loss is {loss} at step {step + 1} of {config.steps}; "
                    "training stopped (lower the learning rate, or check the model's weights)"
                )
            if hook is not None:
                hook.after_backward(raw_model, step + 1)
            grad_norm = None
            if config.max_grad_norm:  # 0: no clipping
                grad_norm = float(fsdp.full(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)))
                if not math.isfinite(grad_norm):
                    raise CpiftError(
                        f"stage {stage!r}: the gradient norm is {grad_norm} at step {step + 1} of "
                        f"{config.steps}; training stopped before the update"
                    )

            # update
            lr = float(scheduler.get_last_lr()[0])  # the rate this step uses
            masked.step()
            scheduler.step()
            masked.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            if hook is not None and (changed := hook.after_step(step)) is not None:
                masked.set_frozen(trainable_only(changed))

            # log
            elapsed = time.perf_counter() - started
            tokens_per_s = tokens_run / elapsed if elapsed > 0 else 0.0
            eta_s = (config.steps - step) * elapsed / (step - start_step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if main and on_event is not None:
                on_event({
                    "event": "step", "stage": stage, "step": step, "steps": config.steps,
                    "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, "eta_s": eta_s,
                    "grad_norm": grad_norm, "tokens": tokens_before + tokens_run,
                    "examples_per_step": per_step,
                })

            # checkpoint
            if ckpt_root is not None and (
                step == config.steps
                or (config.checkpoint_every and step % config.checkpoint_every == 0)
            ):
                path = checkpoint_path(ckpt_root, step)
                save_checkpoint(accelerator, path, {
                    "stage": stage, "step": step, "steps": config.steps, "losses": losses,
                    "tokens_seen": tokens_before + tokens_run, "examples_skipped": skipped,
                    "config": {name: getattr(config, name) for name in TrainConfig.model_fields}, **fingerprint,
                }, sharded=shards)
                if main and on_event is not None:
                    on_event({"event": "checkpoint", "stage": stage, "step": step, "path": str(path)})
                last_checkpoint = path
    finally:
        bar.close()
        model.eval()
        if not sharded:
            # Drop the autocast wrapper accelerate puts on forward for mixed precision.
            accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if sharded:
        fsdp.gather_into(model, whole_model)
        whole_model.eval()

    seconds = time.perf_counter() - started
    _log.info("stage %r: %d steps in %.1f s, final loss %.4f", stage, step - start_step, seconds,
              losses[-1] if losses else float("nan"))
    return TrainResult(
        stage=stage,
        final_loss=losses[-1] if losses else float("nan"),
        losses=list(losses),
        tokens_seen=tokens_before + tokens_run,
        seconds=seconds,
        steps_run=step - start_step,
        step=step,
        examples_skipped=skipped,
        resumed_from=start_step if resume_from is not None else None,
        checkpoint=last_checkpoint if ckpt_root is not None else None,
        extra={"device": device, "mixed_precision": accelerator.mixed_precision,
               "examples_used": len(data), "examples_per_step": per_step},
    )


# --------------------------------------------------------------------------------------------
# Gradient estimate (sparse fine-tuning's selection)
# --------------------------------------------------------------------------------------------


def estimate_gradients(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    config: TrainConfig,
    *,
    stage: str = "gradients",
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """The gradient of the training loss averaged over ``examples``, accumulated batch by batch.

    The loss is :func:`train`'s: cross-entropy on the assistant tokens only, every token weighted
    the same. The examples are tokenized as :func:`train` does them (``config.max_length``; those
    without an answer token are skipped), cut in order into batches of ``config.batch_size``, and
    each batch's summed loss is back-propagated divided by the total number of answer tokens, so
    the gradients accumulate in one ``.grad`` buffer per parameter and the result is the gradient
    of the mean token loss over all ``examples`` — the same whatever the batch size (which only
    bounds memory). The model runs in eval mode (no dropout) on ``config.device`` (bf16 autocast
    on CUDA, as in training) and is left there, in eval mode, its ``.grad`` cleared.

    Returns:
        Parameter name (as ``model.named_parameters()`` lists it; tied weights once) → float32
        CPU gradient, for every parameter that requires a gradient.

    Raises:
        ParameterError: no usable example, a config field out of range.
        CpiftError: the loss is not finite (names the stage and batch).
    """
    config.validate()
    data, _ = tokenize_examples(tokenizer, examples, config.max_length, stage)
    pad_id = pad_token_id(tokenizer)
    batches = [collate(data[i : i + config.batch_size], pad_id) for i in range(0, len(data), config.batch_size)]
    n_targets = sum(_n_targets(b) for b in batches)
    accelerator = _make_accelerator(resolve_device(config.device))
    prepared = accelerator.prepare(model)
    raw_model = accelerator.unwrap_model(prepared)
    raw_model.zero_grad(set_to_none=True)
    raw_model.eval()
    from tqdm.auto import tqdm

    try:
        for i, batch in enumerate(tqdm(batches, desc=stage, unit="batch",
                                       disable=None if progress is None else not progress)):
            loss_sum = _loss_sum(prepared, accelerator.unwrap_model(prepared).get_output_embeddings(),
                                 {k: v.to(accelerator.device) for k, v in batch.items()})
            if not torch.isfinite(loss_sum):
                raise CpiftError(f"stage {stage!r}: the loss is {float(loss_sum)} on batch {i + 1} of {len(batches)}")
            accelerator.backward(loss_sum / n_targets)
        grads = {}
        for name, param in raw_model.named_parameters():
            if param.requires_grad:
                grad = param.grad if param.grad is not None else torch.zeros_like(param)
                grads[name] = grad.detach().float().cpu()
                param.grad = None
    finally:
        raw_model.zero_grad(set_to_none=True)
        accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
    return grads
