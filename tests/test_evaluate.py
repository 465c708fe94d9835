"""Scoring: multiple choice by log-likelihood (against one forward per option), generation in
order, per-item results."""

from __future__ import annotations

import pytest
import torch

from cpift.data import get_task
from cpift.data.chat import render_chat
from cpift.data.tasks import Example, Task
from cpift.errors import ParameterError
from cpift.evaluate import choice_logprobs, generate, score_task
from cpift.models import tiny_llama, tiny_tokenizer

PROMPTS = [[{"role": "user", "content": "What is 2+2?"}],
           [{"role": "user", "content": "Pick a colour for the long wall in the hall, please"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yes or no?"}]]
OPTIONS = [["4", "five", "22"], ["red", "green"], ["yes", "no", "maybe", "n"]]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_llama(seed=0).eval(), tiny_tokenizer()


def _one_forward_per_option(model, tokenizer, prompt, option) -> float:
    context = tokenizer.encode(render_chat(tokenizer, prompt, generation_prompt=True), add_special_tokens=False)
    tokens = tokenizer.encode(option, add_special_tokens=False)
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([context + tokens])).logits.log_softmax(-1)[0]
    return sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(tokens))


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_choice_logprobs_equal_one_forward_per_option(model_and_tokenizer, batch_size: int) -> None:
    model, tokenizer = model_and_tokenizer
    got = choice_logprobs(model, tokenizer, PROMPTS, OPTIONS, batch_size=batch_size)
    for prompt, options, values in zip(PROMPTS, OPTIONS, got):
        expected = [_one_forward_per_option(model, tokenizer, prompt, option) for option in options]
        assert values == pytest.approx(expected, abs=1e-4)


def test_choice_logprobs_refuses_bad_input(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ParameterError, match="2 prompts but 1 option lists"):
        choice_logprobs(model, tokenizer, PROMPTS[:2], OPTIONS[:1])
    with pytest.raises(ParameterError, match="item 0: every option must be a non-empty text"):
        choice_logprobs(model, tokenizer, PROMPTS[:1], [["a", ""]])


def test_multiple_choice_task_scores_per_item(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    examples = tuple(Example(messages=(*prompt, {"role": "assistant", "content": options[0]}), options=tuple(options),
                             correct=(0,)) for prompt, options in zip(PROMPTS, OPTIONS))
    task = Task("mc", "test", (), examples, lambda e, c: 0.0, "accuracy")
    result = score_task(model, tokenizer, task, batch_size=2)
    logprobs = choice_logprobs(model, tokenizer, PROMPTS, OPTIONS)
    chosen = [max(range(len(lp)), key=lp.__getitem__) for lp in logprobs]
    assert result.scores == tuple(float(c == 0) for c in chosen)
    assert result.predictions == tuple(o[c] for o, c in zip(OPTIONS, chosen))
    assert result.score == pytest.approx(sum(result.scores) / 3) and result.n == 3
    normalised = [max(range(len(lp)), key=lambda j: lp[j] / len(o[j])) for lp, o in zip(logprobs, OPTIONS)]
    assert result.score_norm == pytest.approx(sum(c == 0 for c in normalised) / 3)


def test_the_embedded_logic_task_is_multiple_choice(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    task = get_task("logic", n_train=1, n_eval=5)
    assert all(len(e.options) == 4 and len(e.correct) == 1 for e in task.eval)
    assert all(f"{'ABCD'[e.correct[0]]}. {e.options[e.correct[0]]}" in e.prompt[0]["content"] for e in task.eval)
    result = score_task(model, tokenizer, task)
    assert len(result.scores) == 5 and set(result.predictions) <= {o for e in task.eval for o in e.options}


def test_generation_keeps_the_prompts_order_whatever_the_batching(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    one_by_one = [generate(model, tokenizer, [p], max_new_tokens=4, batch_size=1)[0] for p in PROMPTS]
    assert generate(model, tokenizer, PROMPTS, max_new_tokens=4, batch_size=2) == one_by_one
    math = get_task("math", n_train=1, n_eval=3)
    result = score_task(model, tokenizer, math, max_new_tokens=4)
    assert len(result.scores) == len(result.predictions) == 3 and result.score_norm is None
