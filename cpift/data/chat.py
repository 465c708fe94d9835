"""Chat examples as the model sees them: rendered with the tokenizer's chat template, tokenized.

One implementation for training and evaluation:

* :func:`render_chat` — a conversation rendered with the tokenizer's chat template; with
  ``generation_prompt=True`` it ends where the assistant's reply starts (what
  :func:`cpift.evaluate.generate` feeds the model).
* :func:`tokenize_chat` — token ids and labels that put the loss on the assistant tokens only
  (each assistant reply and its end-of-turn token); the prompt, the system message and padding
  get label :data:`IGNORE_INDEX`. Sequences are cut to ``max_length`` tokens (the start is kept).
* :func:`tokenize_examples` — a training set tokenized, dropping (and counting) the examples whose
  answer lies wholly beyond the cut, since they would train on nothing.
* :func:`collate` — tokenized examples padded on the right into tensors; :func:`pad_token_id` picks
  the padding token.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cpift.errors import ParameterError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from cpift.data.tasks import Example

__all__ = ["IGNORE_INDEX", "collate", "pad_token_id", "render_chat", "tokenize_chat", "tokenize_examples"]

_log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt, system message, padding)."""


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


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], *,
                generation_prompt: bool = False) -> str:
    """``messages`` rendered as text by the tokenizer's chat template.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: ``{"role", "content"}`` mappings.
        generation_prompt: end with the template's assistant header, where a reply starts
            (a prompt to generate from) instead of after the last message.

    Raises:
        ParameterError: the template rendered something other than text.
    """
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
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
        prompt_ids = _encode(tokenizer, render_chat(tokenizer, messages[:i], generation_prompt=True))
        turn_ids = input_ids if i == last else _encode(tokenizer, render_chat(tokenizer, messages[:i + 1]))
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
        prompt_text = render_chat(tokenizer, messages[:i], generation_prompt=True)
        turn_text = render_chat(tokenizer, messages[:i + 1])
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
    tokens; a reply beyond the cut then has no labels (:func:`tokenize_examples` drops such
    examples).

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
    text = render_chat(tokenizer, messages)
    input_ids = _encode(tokenizer, text)
    spans = _token_spans(tokenizer, messages, input_ids)
    if spans is None:
        _log.debug("chat template prefixes do not match token-wise; locating replies by offsets")
        spans = _offset_spans(tokenizer, messages, text)
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def tokenize_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int,
                      stage: str) -> tuple[list[dict[str, list[int]]], int]:
    """The examples tokenized (:func:`tokenize_chat`), those without an assistant token within
    ``max_length`` dropped.

    Returns:
        ``(data, number dropped)``.

    Raises:
        ParameterError: no example is left (names ``stage``), or as :func:`tokenize_chat`.
    """
    data, skipped = [], 0
    for example in examples:
        item = tokenize_chat(tokenizer, example, max_length)
        # Labels are shifted by one for next-token prediction: the first token is never a target.
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


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else _end_token(tokenizer)[0] or 0


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
