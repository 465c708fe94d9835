"""Supervised fine-tuning on chat examples: the one training loop behind every CPI-FT stage.

Probe runs (one task alone), consolidation stages (frozen cores) and baselines all call
:func:`train`. It is a plain loop in the style of nanoGPT: tokenize, cycle through a seeded order,
forward, backward, clip, step, log, checkpoint.

Data. :func:`tokenize_chat` renders an :class:`~cpift.data.tasks.Example`'s messages with the
tokenizer's chat template and puts the loss on the assistant tokens only (each assistant reply
and its end-of-turn token); the prompt, the system message and padding get label ``-100``.
Sequences are cut to ``max_length`` tokens (the start is kept); an example whose answer lies
wholly beyond the cut would train on nothing, so it is dropped and counted in
:attr:`TrainResult.examples_skipped`. :func:`collate` pads on the right.

Order. Training samples come from an endless stream: epoch ``e`` is a permutation of the examples
drawn from ``numpy.random.default_rng([seed, e])``, and optimizer step ``s`` takes the stream's
positions ``s·B·A … (s+1)·B·A − 1`` (B = batch size, A = gradient accumulation; with several
processes each takes its own slice). The batch of any step is therefore a pure function of the
seed and the step number, which is what makes resuming exact.

Loss. Cross-entropy summed over the assistant tokens of the whole accumulation window and
divided by their number, so every answer token weighs the same however the tokens fall into
micro-batches (with several processes each normalises by its own count, and gradients are
averaged). The ``loss`` reported per step is that token-weighted mean.

Optimizer. AdamW from torch (betas 0.9/0.999); weight decay on matrices only — 1-D parameters
(norm weights, biases) are not decayed, as in nanoGPT and the Hugging Face Trainer. It is always
wrapped in :class:`~cpift.freezing.MaskedOptimizer` (with no masks the wrapper does nothing), so
frozen elements stay bit-identical through the AdamW update *and* its weight decay. Gradient
clipping uses the norm of the full gradient, frozen elements included: the mask multiplies the
final update (θ ← θ + Δθ ⊙ M), as the CPI-FT paper writes it. The learning rate warms up
linearly for ``warmup_steps`` (the first step has lr 0, as in ``transformers``) then decays
with a half cosine to 0 at ``steps`` (``transformers.get_cosine_schedule_with_warmup``).

Devices. :class:`accelerate.Accelerator` places the model and batches: ``device="auto"`` picks
CUDA, then MPS, then CPU. CUDA trains in bf16 autocast (fp32 master weights; plain fp32 on GPUs
without bf16), CPU and MPS in fp32 (bf16 on CPU is hundreds of times slower). The same code runs
data-parallel under ``accelerate launch`` (DDP, gradient sync only on the last micro-batch,
checkpoints written by the main process) — a path not exercised by the test suite, which runs on
one CPU. ``accelerate`` keeps one device/precision setting per process: train on one kind of
device per process.

Checkpoints. With ``checkpoint_dir``, every ``checkpoint_every`` steps and at the end
``checkpoint_dir/step-XXXXXX/`` is published atomically (:func:`cpift.atomic.atomic_dir`) with

* ``model.safetensors`` — ``model.state_dict()``; tensors sharing memory (tied input/output
  embeddings) are stored once and their other names listed in the file's metadata;
* ``optimizer.pt``, ``scheduler.pt`` — the AdamW and LR-scheduler state dicts;
* ``rng.pt`` — torch CPU (and CUDA) generator states, Python's ``random`` and numpy's global
  state (the data order does not use them; dropout does);
* ``hook.pt`` — with a :class:`TrainHook` only: its state (EPI's importance and current mask);
* ``trainer_state.json`` — written last: step, losses so far, tokens seen, the config and a
  fingerprint of the tokenized data and of the frozen set.

Only the last two are kept (older ones are renamed to a hidden name, then deleted, so a kill
mid-deletion never leaves a visible half checkpoint). ``resume=True`` loads the newest complete
checkpoint — hidden temporary directories of an interrupted write are never considered, and
those of dead processes are removed — and continues; on CPU the final weights are bit-identical
to an uninterrupted run. Resuming checks that the config, data and frozen set match.

Progress. After each optimizer step ``on_event`` receives ``{"event": "step", "stage", "step",
"steps", "loss", "lr", "tokens_per_s", "eta_s", "grad_norm", "tokens", "examples_per_step"}``
(``tokens``: non-padding tokens seen since step 1); it also gets
``{"event": "checkpoint", "stage", "step", "path"}`` after each checkpoint and
``{"event": "resume", "stage", "step", "path"}`` when a run continues from one. A tqdm bar shows
the same (``progress=None``: only on a terminal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from cpift.atomic import atomic_dir, remove_stale_temps
from cpift.errors import CheckpointError, CpiftError, MismatchError, ParameterError
from cpift.freezing import MaskedOptimizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cpift.data.tasks import Example

__all__ = [
    "IGNORE_INDEX",
    "TrainConfig",
    "TrainHook",
    "TrainResult",
    "collate",
    "estimate_gradients",
    "latest_checkpoint",
    "list_checkpoints",
    "resolve_device",
    "tokenize_chat",
    "train",
]

_log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, system message, padding)."""

DEVICES = ("auto", "cpu", "cuda", "mps")
KEEP_CHECKPOINTS = 2

_CKPT_RE = re.compile(r"^step-(\d{6,})$")
_CKPT_TEMP_RE = re.compile(r"^\.(step-\d{6,})\.(?:tmp|old)-\d+-")
_MODEL_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.pt"
_SCHEDULER_FILE = "scheduler.pt"
_RNG_FILE = "rng.pt"
_HOOK_FILE = "hook.pt"  # only with a TrainHook
_STATE_FILE = "trainer_state.json"  # written last
_CKPT_FILES = (_MODEL_FILE, _OPTIMIZER_FILE, _SCHEDULER_FILE, _RNG_FILE, _STATE_FILE)
_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Data: chat examples → token ids with assistant-only labels
# --------------------------------------------------------------------------------------------


def _messages_of(example: Any) -> list[dict[str, str]]:
    messages = getattr(example, "messages", example)
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ParameterError(
            "tokenize_chat needs an Example (or a sequence of {'role', 'content'} messages), got "
            f"{type(example).__name__}"
        )
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ParameterError(
                f"message {i} must be a mapping with 'role' and 'content', got {message!r:.80}"
            )
        out.append(dict(message))
    return out


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
            generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):
        raise ParameterError(
            f"the tokenizer's chat template rendered {type(text).__name__}, expected text"
        )
    return text


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template writes the special tokens (bos, turn markers) itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _end_token(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, str | None]:
    eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos, tokenizer.eos_token


def _token_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                 input_ids: list[int]) -> list[tuple[int, int]] | None:
    """Assistant token spans from prefix tokenizations, or None if some prefix does not match.

    For assistant turn i: the conversation up to turn i rendered with ``add_generation_prompt``
    ends exactly where the reply starts, and the conversation through turn i ends where the turn
    ends. Both must tokenize to prefixes of the whole conversation's tokens.
    """
    eos_id, _ = _end_token(tokenizer)
    spans = []
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_ids = _encode(tokenizer, _render(tokenizer, messages[:i], generation_prompt=True))
        turn_ids = input_ids if i == last else _encode(tokenizer, _render(tokenizer, messages[:i + 1]))
        if turn_ids != input_ids[:len(turn_ids)] or prompt_ids != turn_ids[:len(prompt_ids)]:
            return None
        start, end = len(prompt_ids), len(turn_ids)
        # Stop after the end-of-turn token: what the template writes after it (ChatML's "\n") is
        # never generated, since generation stops at that token.
        reply = turn_ids[start:end]
        if eos_id is not None and eos_id in reply:
            end = start + len(reply) - reply[::-1].index(eos_id)
        spans.append((start, end))
    return spans


def _offset_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                  text: str) -> list[tuple[int, int]]:
    """Assistant spans located in the text, mapped to tokens through offsets (the fallback).

    Used when a template renders a conversation differently from its prefixes (it drops earlier
    reasoning, stamps a date, merges tokens across the turn boundary). Each reply is first sought
    as the text between the rendered prompt and the rendered turn, else as its content searched
    left to right; its end-of-turn token is included when it follows directly. Tokens
    overlapping a reply's characters get the loss. Needs a fast tokenizer (offset mappings).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ParameterError(
            "the chat template renders conversations differently from their prefixes, and "
            f"locating assistant replies then needs a fast tokenizer ({type(tokenizer).__name__} "
            "gives no offset mappings)"
        )
    _, eos_text = _end_token(tokenizer)
    char_spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:i], generation_prompt=True)
        turn_text = _render(tokenizer, messages[:i + 1])
        if text.startswith(turn_text) and turn_text.startswith(prompt_text) \
                and len(prompt_text) >= cursor:
            start, end = len(prompt_text), len(turn_text)
            if eos_text and eos_text in text[start:end]:
                end = text.rindex(eos_text, start, end) + len(eos_text)
        else:
            content = message["content"]
            start = text.find(content, cursor) if content else -1
            if start < 0:
                raise ParameterError(
                    f"cannot find assistant message {i} in the text the chat template renders"
                )
            end = start + len(content)
            if eos_text and text.startswith(eos_text, end):
                end += len(eos_text)
        char_spans.append((start, end))
        cursor = end
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = []
    for cs, ce in char_spans:
        inside = [t for t, (a, b) in enumerate(offsets) if a < ce and b > cs]
        if inside:
            spans.append((inside[0], inside[-1] + 1))
    return spans


def tokenize_chat(tokenizer: PreTrainedTokenizerBase, example: Example | Sequence[Mapping[str, str]],
                  max_length: int) -> dict[str, list[int]]:
    """Token ids of a chat example and labels that train on the assistant replies only.

    The messages are rendered with the tokenizer's chat template and tokenized (the template
    writes the special tokens). ``labels`` equals ``input_ids`` on each assistant reply and its
    end-of-turn token (the tokenizer's eos, ``<|im_end|>`` for ChatML) and is
    :data:`IGNORE_INDEX` elsewhere. Reply spans come from tokenizing each prompt with
    ``add_generation_prompt=True`` and the conversation through that reply, and checking both
    are token prefixes of the whole; if a template breaks that, character offsets locate the
    replies instead (see :func:`_offset_spans`). Both lists are cut to the first ``max_length``
    tokens; a reply beyond the cut then has no labels (:func:`train` skips such examples).

    Args:
        tokenizer: a tokenizer with a chat template.
        example: an :class:`~cpift.data.tasks.Example` or a sequence of message mappings.
        max_length: maximum number of tokens kept (from the start).

    Returns:
        ``{"input_ids": [...], "labels": [...]}``, two lists of equal length.

    Raises:
        ParameterError: no chat template, a malformed message, ``max_length`` < 1, or a reply
            that cannot be located in the rendered text.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ParameterError(f"max_length must be a positive integer, got {max_length!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ParameterError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template; set "
            "tokenizer.chat_template (e.g. cpift.models.CHATML_TEMPLATE)"
        )
    messages = _messages_of(example)
    text = _render(tokenizer, messages)
    input_ids = _encode(tokenizer, text)
    spans = _token_spans(tokenizer, messages, input_ids)
    if spans is None:
        _log.debug("chat template prefixes do not match token-wise; locating replies by offsets")
        spans = _offset_spans(tokenizer, messages, text)
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad tokenized examples on the right into ``input_ids``, ``attention_mask`` and ``labels``
    tensors of shape ``(len(batch), longest)``; padding has label :data:`IGNORE_INDEX`."""
    if not batch:
        raise ParameterError("collate needs at least one example")
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _tokenized(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int,
               stage: str) -> tuple[list[dict[str, list[int]]], int]:
    """The examples tokenized (:func:`tokenize_chat`), those without an assistant token within
    ``max_length`` dropped; returns ``(data, number dropped)``. Raises if none is left."""
    data, skipped = [], 0
    for example in examples:
        item = tokenize_chat(tokenizer, example, max_length)
        if any(label != IGNORE_INDEX for label in item["labels"][1:]):
            data.append(item)
        else:
            skipped += 1
    if skipped:
        _log.warning("stage %r: %d of %d examples have no assistant tokens within max_length=%d; "
                     "skipped", stage, skipped, len(examples), max_length)
    if not data:
        raise ParameterError(
            f"stage {stage!r}: none of the {len(examples)} training examples has an assistant "
            f"reply within max_length={max_length} tokens: no training examples"
        )
    return data, skipped


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad_id = tokenizer.pad_token_id
    return pad_id if pad_id is not None else _end_token(tokenizer)[0] or 0


def _n_targets(batch: Mapping[str, torch.Tensor]) -> int:
    """Number of tokens that carry loss in a collated batch (labels are shifted by one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _loss_sum(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy summed over the assistant tokens of a batch on the model's device."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(np.random.default_rng([seed, epoch]).permutation(n).tolist())


def _stream_indices(n: int, seed: int, first: int, count: int) -> list[int]:
    """Example indices at positions ``first … first+count−1`` of the endless seeded stream."""
    out = []
    for k in range(first, first + count):
        epoch, pos = divmod(k, n)
        out.append(_epoch_order(n, seed, epoch)[pos])
    return out


# --------------------------------------------------------------------------------------------
# Configuration and result
# --------------------------------------------------------------------------------------------


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ParameterError(f"TrainConfig.{name} must be {what}, got {value!r}")


def _real(name: str, value: Any, *, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        what = "a finite number > 0" if positive else "a finite number ≥ 0"
        raise ParameterError(f"TrainConfig.{name} must be {what}, got {value!r}")


@dataclass
class TrainConfig:
    """Hyper-parameters of one :func:`train` call (validated on creation and again by train).

    Attributes:
        lr: peak learning rate of AdamW (> 0).
        weight_decay: AdamW's decoupled weight decay on matrices (≥ 0; 1-D parameters never).
        warmup_steps: steps of linear warm-up before the cosine decay (≥ 0).
        steps: number of optimizer steps (≥ 1).
        batch_size: examples per micro-batch, per process.
        grad_accum: micro-batches per optimizer step.
        max_length: tokens kept per example (the start is kept).
        max_grad_norm: clip the gradient's global L2 norm to this (> 0); ``None`` disables it.
        checkpoint_every: write a checkpoint every this many steps (with a ``checkpoint_dir``);
            0 means only at the end.
        seed: seeds the data order and the global RNGs (≥ 0).
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``.
    """

    lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 10
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ParameterError` naming the first field out of range."""
        _real("lr", self.lr, positive=True)
        _real("weight_decay", self.weight_decay, positive=False)
        _positive_int("warmup_steps", self.warmup_steps, minimum=0)
        _positive_int("steps", self.steps)
        _positive_int("batch_size", self.batch_size)
        _positive_int("grad_accum", self.grad_accum)
        _positive_int("max_length", self.max_length, minimum=2)
        if self.max_grad_norm is not None:
            _real("max_grad_norm", self.max_grad_norm, positive=True)
        _positive_int("checkpoint_every", self.checkpoint_every, minimum=0)
        _positive_int("seed", self.seed, minimum=0)
        if self.device not in DEVICES:
            raise ParameterError(
                f"TrainConfig.device must be one of {', '.join(DEVICES)}, got {self.device!r}"
            )

    @property
    def mixed_precision(self) -> str:
        """Accelerate's ``mixed_precision`` for this device: ``"bf16"`` on CUDA (when the GPU
        supports it), else ``"no"`` (fp32)."""
        device = resolve_device(self.device)
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "no"


# Fields that change the training trajectory: a checkpoint resumes only under the same values.
_TRAJECTORY_FIELDS = ("lr", "weight_decay", "warmup_steps", "steps", "batch_size", "grad_accum",
                      "max_length", "max_grad_norm", "seed")


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

    For exact resume, :meth:`state_dict` is saved in each checkpoint (``hook.pt``, loadable with
    ``torch.load(weights_only=True)``); on resume :meth:`load_state_dict` restores it and
    :meth:`frozen` gives the frozen set that was in force at the checkpoint. With several
    processes every process calls the hook.
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
# Checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints ``(step, path)`` in ``checkpoint_dir``, oldest first.

    Only visible ``step-XXXXXX`` directories holding every checkpoint file count; the hidden
    temporary directories of a write in progress (or killed) never do.
    """
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _CKPT_RE.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        if all((entry / name).is_file() for name in _CKPT_FILES):
            found.append((int(match.group(1)), entry))
        else:
            _log.warning("ignoring incomplete checkpoint %s", entry)
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir``, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def _remove_stale_checkpoint_temps(checkpoint_dir: Path) -> None:
    if not checkpoint_dir.is_dir():
        return
    names = {m.group(1) for e in checkpoint_dir.iterdir() if (m := _CKPT_TEMP_RE.match(e.name))}
    for name in names:
        remove_stale_temps(checkpoint_dir / name)


def _prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step directories (complete or not)."""
    steps = sorted(
        (int(m.group(1)), e) for e in checkpoint_dir.iterdir() if (m := _CKPT_RE.match(e.name))
    )
    for _, path in steps[:-keep]:
        # Rename first: a kill during rmtree leaves a hidden directory, never a visible half.
        trash = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def _save_model_weights(model: torch.nn.Module, path: Path) -> None:
    """``model.state_dict()`` as safetensors; tensors sharing memory are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    exact: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr()
        key = (ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and key in exact:
            aliases[name] = exact[key]  # tied: same memory, same view
            continue
        if tensor.numel() and ptr in storages:
            tensor = tensor.clone()  # a different view of shared memory: store a copy
        exact[key] = name
        storages.add(ptr)
        tensors[name] = tensor.to("cpu").contiguous()
    save_file(tensors, str(path), metadata={"format": "pt", "cpift_aliases": json.dumps(aliases)})


def _load_model_weights(model: torch.nn.Module, path: Path) -> None:
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        aliases = json.loads((fh.metadata() or {}).get("cpift_aliases", "{}"))
        state = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (not a dict)
    for alias, name in aliases.items():
        state[alias] = state[name]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the model: {exc}") from exc


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: Any, trainer_state: dict[str, Any], hook_state: dict[str, Any] | None) -> None:
    with atomic_dir(path, overwrite=True) as tmp:
        _save_model_weights(model, tmp / _MODEL_FILE)
        torch.save(optimizer.state_dict(), tmp / _OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / _SCHEDULER_FILE)
        torch.save(_rng_state(), tmp / _RNG_FILE)
        if hook_state is not None:
            torch.save(hook_state, tmp / _HOOK_FILE)
        (tmp / _STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n", encoding="utf-8")


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / _STATE_FILE}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path / _STATE_FILE} is not a cpift trainer state (format {_FORMAT})")
    return state


def _check_resumable(path: Path, saved: Mapping[str, Any], config: TrainConfig,
                     fingerprint: Mapping[str, Any]) -> None:
    differ = [
        f"{name}: checkpoint {saved['config'].get(name)!r}, now {getattr(config, name)!r}"
        for name in _TRAJECTORY_FIELDS
        if saved["config"].get(name) != getattr(config, name)
    ]
    differ += [
        f"{name}: checkpoint {saved.get(name)!r}, now {value!r}"
        for name, value in fingerprint.items() if saved.get(name) != value
    ]
    if differ:
        raise MismatchError(
            f"cannot resume from {path}: it was written with other settings ("
            + "; ".join(differ) + "); resume with the settings it was written with, or start a new run"
        )


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


def _data_fingerprint(data: Sequence[Mapping[str, list[int]]]) -> str:
    digest = hashlib.sha256()
    for item in data:
        digest.update(np.asarray(item["input_ids"], dtype=np.int64).tobytes())
        digest.update(np.asarray(item["labels"], dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def _frozen_fingerprint(frozen: Mapping[str, torch.Tensor] | None) -> str:
    digest = hashlib.sha256()
    for name in sorted(frozen or {}):
        mask = frozen[name]  # type: ignore[index]
        count = int(mask.sum()) if isinstance(mask, torch.Tensor) else -1
        digest.update(f"{name}:{count};".encode())
    return digest.hexdigest()[:16]


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
    same code runs on several GPUs under ``accelerate launch`` (data-parallel; only the main
    process calls ``on_event``, shows progress and writes checkpoints) — untested here.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``); trained in place, left
            on the training device and in eval mode.
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
    data, skipped = _tokenized(tokenizer, examples, config.max_length, stage)
    pad_id = _pad_id(tokenizer)
    fingerprint = {"data": _data_fingerprint(data), "frozen": _frozen_fingerprint(frozen),
                   "hook": type(hook).__qualname__ if hook is not None else None}

    # ---- checkpoint to resume
    resume_from: Path | None = None
    saved: dict[str, Any] | None = None
    if ckpt_root is not None:
        _remove_stale_checkpoint_temps(ckpt_root)
        latest = latest_checkpoint(ckpt_root)
        if latest is not None and not resume:
            raise ParameterError(
                f"checkpoint_dir {ckpt_root} already holds checkpoints (newest {latest.name}); "
                "pass resume=True to continue from it, or use another directory"
            )
        if resume and latest is None:
            _log.info("stage %r: no checkpoint in %s; starting from step 0", stage, ckpt_root)
        if resume and latest is not None:
            resume_from = latest
            saved = _read_trainer_state(latest)
            _check_resumable(latest, saved, config, fingerprint)
            _load_model_weights(model, latest / _MODEL_FILE)

    # ---- model, optimizer, schedule
    from transformers import get_cosine_schedule_with_warmup

    accelerator = _make_accelerator(device)
    main = accelerator.is_main_process
    model = accelerator.prepare(model)
    raw_model = accelerator.unwrap_model(model)
    trainable = {n for n, p in raw_model.named_parameters() if p.requires_grad}
    known = dict(raw_model.named_parameters())

    def trainable_only(masks: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        # Masks of parameters that do not train at all are moot; unknown names still fail.
        return {n: m for n, m in (masks or {}).items() if n not in known or n in trainable}

    optimizer = torch.optim.AdamW(_param_groups(raw_model, config.weight_decay), lr=config.lr)
    masked = MaskedOptimizer(optimizer, raw_model, trainable_only(frozen))
    scheduler = get_cosine_schedule_with_warmup(masked.optimizer, config.warmup_steps, config.steps)

    step, losses, tokens_before = 0, [], 0
    if saved is not None and resume_from is not None:
        optimizer.load_state_dict(_load_torch(resume_from / _OPTIMIZER_FILE))
        scheduler.load_state_dict(_load_torch(resume_from / _SCHEDULER_FILE))
        _set_rng_state(_load_torch(resume_from / _RNG_FILE))
        step, losses = int(saved["step"]), [float(x) for x in saved["losses"]]
        tokens_before = int(saved["tokens_seen"])
        if hook is not None:
            hook.load_state_dict(_load_torch(resume_from / _HOOK_FILE))
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

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = config.batch_size * config.grad_accum * world
    tokens_run = 0
    last_checkpoint = resume_from
    bar = tqdm(total=config.steps, initial=step, desc=stage, unit="step",
               disable=(not main) or (None if progress is None else not progress))

    def checkpoint(at: int) -> None:
        nonlocal last_checkpoint
        path = ckpt_root / f"step-{at:06d}"  # type: ignore[operator]
        if main:
            state = {
                "format": _FORMAT, "stage": stage, "step": at, "steps": config.steps,
                "losses": losses, "tokens_seen": tokens_before + tokens_run,
                "examples_skipped": skipped, "config": dataclasses.asdict(config), **fingerprint,
            }
            _save_checkpoint(path, raw_model, optimizer, scheduler, state,
                             hook.state_dict() if hook is not None else None)
            _prune_checkpoints(ckpt_root, KEEP_CHECKPOINTS)  # type: ignore[arg-type]
            if on_event is not None:
                on_event({"event": "checkpoint", "stage": stage, "step": at, "path": str(path)})
        accelerator.wait_for_everyone()
        last_checkpoint = path

    try:
        model.train()
        while step < config.steps:
            # The micro-batches of this step, as a pure function of (seed, step).
            batches = []
            for micro in range(config.grad_accum):
                first = ((step * config.grad_accum + micro) * world + rank) * config.batch_size
                indices = _stream_indices(len(data), config.seed, first, config.batch_size)
                batches.append(collate([data[i] for i in indices], pad_id))
            n_targets = sum(_n_targets(b) for b in batches)

            loss_sum = torch.zeros((), device=accelerator.device)
            n_tokens = 0
            for micro, batch in enumerate(batches):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = micro == len(batches) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    micro_sum = _loss_sum(model, batch)
                    accelerator.backward(micro_sum / n_targets)
                loss_sum += micro_sum.detach()
                n_tokens += int(batch["attention_mask"].sum())

            totals = torch.tensor([float(loss_sum), n_targets, n_tokens],
                                  dtype=torch.float32, device=accelerator.device)
            totals = accelerator.reduce(totals, reduction="sum")
            loss = float(totals[0] / totals[1])
            tokens_run += int(totals[2])
            if not math.isfinite(loss):
                raise CpiftError(
                    f"stage {stage!r}: the loss is {loss} at step {step + 1} of {config.steps}; "
                    "training stopped (lower the learning rate, or check the model's weights)"
                )
            if hook is not None:
                hook.after_backward(raw_model, step + 1)
            grad_norm = None
            if config.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm))
                if not math.isfinite(grad_norm):
                    raise CpiftError(
                        f"stage {stage!r}: the gradient norm is {grad_norm} at step {step + 1} of "
                        f"{config.steps}; training stopped before the update"
                    )
            lr = float(scheduler.get_last_lr()[0])  # the rate this step uses
            masked.step()
            scheduler.step()
            masked.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            if hook is not None and (changed := hook.after_step(step)) is not None:
                masked.set_frozen(trainable_only(changed))

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
            if ckpt_root is not None and (
                step == config.steps
                or (config.checkpoint_every and step % config.checkpoint_every == 0)
            ):
                checkpoint(step)
    finally:
        bar.close()
        model.eval()
        # Drop the autocast wrapper accelerate puts on forward for mixed precision.
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)

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
        resumed_from=int(saved["step"]) if saved is not None else None,
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
    data, _ = _tokenized(tokenizer, examples, config.max_length, stage)
    pad_id = _pad_id(tokenizer)
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
            loss_sum = _loss_sum(prepared, {k: v.to(accelerator.device) for k, v in batch.items()})
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
