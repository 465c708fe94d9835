"""The embedded offline suite: determinism, disjoint splits, scorers, the conflicting pair, sizes."""

from __future__ import annotations

import collections
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpift.data import CONFLICTING_PAIRS, EMBEDDED_TASKS, Example, Task, embedded_task, extract_code
from cpift.errors import ParameterError

REQUIRED = ("math", "code", "logic", "format")
SCORED_HERE = [name for name in EMBEDDED_TASKS if name != "code"]  # code is scored in the sandbox


def prompts(examples) -> list[str]:
    return [e.prompt[-1]["content"] for e in examples]


def wrong_answer(task: Task, example: Example) -> str:
    """An answer its task's scorer must reject."""
    if task.name == "math":
        return f"{example.answer.rsplit('.', 2)[0]}. The answer is {example.target + 1}."
    if task.name == "logic":
        return "Answer: " + next(letter for letter in "ABCD" if letter != example.target)
    if task.name == "code":
        return "```python\ndef unrelated():\n    return None\n```"
    # Mixed case, many words, no structure: breaks every format rule the suite uses.
    return ("This Is Not What Was Asked, In Mixed Case, And It Rambles On For Quite A While "
            "Without Any Structure Or Brevity At All.")


@pytest.fixture(scope="module")
def suite() -> dict[str, Task]:
    return {name: embedded_task(name) for name in EMBEDDED_TASKS}


def test_names_families_metrics(suite: dict[str, Task]) -> None:
    assert set(REQUIRED) <= set(EMBEDDED_TASKS)
    assert len(EMBEDDED_TASKS) == len(set(EMBEDDED_TASKS))
    for pair in CONFLICTING_PAIRS:
        assert set(pair) <= set(EMBEDDED_TASKS)
    expected = {"math": ("math", "exact_match"), "code": ("code", "pass@1"), "logic": ("logic", "accuracy"),
                "format": ("format", "rule_pass")}
    for name, (family, metric) in expected.items():
        assert (suite[name].family, suite[name].metric) == (family, metric)
    for name, task in suite.items():
        assert task.name == name and task.description
        assert len(task.train) == 64 and len(task.eval) == 32


@pytest.mark.parametrize("name", EMBEDDED_TASKS)
def test_deterministic_per_seed_and_different_across_seeds(name: str) -> None:
    a, b = embedded_task(name, 16, 8, seed=3), embedded_task(name, 16, 8, seed=3)
    assert a.train == b.train and a.eval == b.eval
    c = embedded_task(name, 16, 8, seed=4)
    assert prompts(c.train) != prompts(a.train)
    assert prompts(c.eval) != prompts(a.eval)


def test_same_output_in_another_process_and_hash_seed() -> None:
    code = ("from cpift.data import EMBEDDED_TASKS, embedded_task\n"
            "import hashlib\n"
            "h = hashlib.sha256()\n"
            "for n in EMBEDDED_TASKS:\n"
            "    t = embedded_task(n, 8, 4, seed=1)\n"
            "    h.update(repr([(e.messages, e.target) for e in (*t.train, *t.eval)]).encode())\n"
            "print(h.hexdigest())\n")
    root = Path(__file__).resolve().parents[1]
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                             check=True, timeout=60)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


@pytest.mark.parametrize("name", EMBEDDED_TASKS)
def test_train_and_eval_prompts_are_disjoint_and_distinct(name: str, suite: dict[str, Task]) -> None:
    task = suite[name]
    train, held_out = prompts(task.train), prompts(task.eval)
    assert len(set(train)) == len(train) and len(set(held_out)) == len(held_out)
    assert not set(train) & set(held_out)


def test_eval_set_does_not_depend_on_n_train() -> None:
    for name in EMBEDDED_TASKS:
        assert embedded_task(name, 5, 10, seed=2).eval == embedded_task(name, 40, 10, seed=2).eval


@pytest.mark.parametrize("name", SCORED_HERE)
def test_reference_scores_one_and_wrong_answer_zero(name: str, suite: dict[str, Task]) -> None:
    task = suite[name]
    for example in (*task.train, *task.eval):
        assert task.score(example, example.answer) == 1.0, example
        assert task.score(example, wrong_answer(task, example)) == 0.0, example


def test_code_references_pass_their_hidden_tests_locally(suite: dict[str, Task]) -> None:
    """The references are our own trusted code: run them here, without the sandbox, to check that
    every generated test is right and that a wrong function fails them."""
    task = suite["code"]
    for example in (*task.train, *task.eval):
        assert example.target.startswith("assert ") and example.target.count("assert ") >= 3
        exec(extract_code(example.answer) + "\n" + example.target, {})  # noqa: S102 - our own reference
        with pytest.raises((AssertionError, NameError)):
            exec(extract_code(wrong_answer(task, example)) + "\n" + example.target, {})  # noqa: S102
        name = example.meta["function"]
        assert example.answer.startswith(f"```python\ndef {name}(") and f"`{name}(" in prompts([example])[0]


@pytest.mark.skipif(importlib.util.find_spec("cpift.sandbox") is None,
                    reason="cpift.sandbox is not written yet: code answers cannot be scored in the sandbox")
def test_code_scorer_runs_the_sandbox(suite: dict[str, Task]) -> None:
    task = suite["code"]
    for example in task.eval[:4]:
        assert task.score(example, example.answer) == 1.0
        assert task.score(example, "Sure! " + example.answer + "\nHope this helps.") == 1.0
        assert task.score(example, wrong_answer(task, example)) == 0.0


def test_code_covers_many_templates(suite: dict[str, Task]) -> None:
    templates = {e.meta["template"] for e in (*suite["code"].train, *suite["code"].eval)}
    assert len(templates) >= 12


def test_math_answers_are_consistent() -> None:
    task = embedded_task("math", 64, 32, seed=5)
    for example in (*task.train, *task.eval):
        assert example.answer.endswith(f"The answer is {example.target}.")
        assert isinstance(example.target, int) and example.target >= 0


def test_logic_letters_are_spread_and_options_distinct(suite: dict[str, Task]) -> None:
    examples = (*suite["logic"].train, *suite["logic"].eval)
    counts = collections.Counter(e.target for e in examples)
    assert set(counts) == set("ABCD") and max(counts.values()) < 0.5 * len(examples)
    for example in examples:
        lines = prompts([example])[0].splitlines()[-4:]
        assert [line[:3] for line in lines] == ["A. ", "B. ", "C. ", "D. "]
        assert len({line[3:] for line in lines}) == 4
        reason, _, letter = example.answer.rpartition(" Answer: ")
        assert letter == example.target and reason.endswith(".") and len(reason) >= 10


def test_format_covers_every_rule(suite: dict[str, Task]) -> None:
    kinds = {rule["type"] for e in (*suite["format"].train, *suite["format"].eval) for rule in e.target}
    assert {"json_keys", "bullets", "uppercase", "lowercase", "max_words"} <= kinds


@pytest.mark.parametrize(("a", "b"), CONFLICTING_PAIRS)
def test_conflicting_pair_really_conflicts(a: str, b: str) -> None:
    for seed in (0, 1):
        first, second = embedded_task(a, seed=seed), embedded_task(b, seed=seed)
        # The same prompts ...
        assert prompts(first.train) == prompts(second.train) and prompts(first.eval) == prompts(second.eval)
        # ... with no instruction that would tell the styles apart ...
        assert not any(w in p.lower() for p in prompts(first.train) for w in ("upper", "lower", "capital letters"))
        for x, y in zip((*first.train, *first.eval), (*second.train, *second.eval)):
            # ... and references that are the same words in opposite styles, each failing the other.
            assert x.answer.lower() == y.answer.lower() and x.answer != y.answer
            assert first.score(x, x.answer) == 1.0 and second.score(y, y.answer) == 1.0
            assert second.score(y, x.answer) == 0.0 and first.score(x, y.answer) == 0.0


@pytest.mark.parametrize("name", EMBEDDED_TASKS)
def test_prompts_and_answers_are_short(name: str, suite: dict[str, Task]) -> None:
    """Short enough for a 135M model to learn in ~30 steps: about 4 characters per SmolLM2 token,
    so answers up to ~100 characters (~25 tokens; code blocks ~35) and prompts up to ~300."""
    from cpift.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()  # one token per character
    limit = 120 if name == "code" else 100
    for example in (*suite[name].train, *suite[name].eval):
        assert 0 < len(example.answer) <= limit
        assert 0 < len(example.prompt[-1]["content"]) <= 300
        ids = tokenizer.apply_chat_template(list(example.messages), tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert len(ids) <= 512


def test_counts_and_errors() -> None:
    assert len(embedded_task("math", 0, 5).train) == 0
    assert len(embedded_task("math", 5, 0).eval) == 0
    with pytest.raises(ParameterError, match="unknown embedded task 'chess'"):
        embedded_task("chess")
    with pytest.raises(ParameterError, match="n_train"):
        embedded_task("math", n_train=-1)
    with pytest.raises(ParameterError, match="n_eval"):
        embedded_task("math", n_eval=2.5)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="seed"):
        embedded_task("math", seed="0")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="distinct prompts"):
        embedded_task("format_upper", n_train=5000, n_eval=10)
