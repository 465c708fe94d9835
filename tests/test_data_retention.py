"""The retention suite: pydoc prose chunks and the zero-shot questions."""

from __future__ import annotations

import re

import pytest

from cpift.data import RETENTION_TASK, contains_any, retention_task, retention_text, zero_shot_questions
from cpift.errors import ParameterError


def test_texts_are_deterministic_and_seeded() -> None:
    a = retention_text()
    assert a == retention_text(n_chunks=32, chunk_chars=512, seed=0)
    assert len(a) == 32 and len(set(a)) == 32
    b = retention_text(seed=1)
    assert b != a and len(b) == 32
    assert retention_text(n_chunks=5, seed=3) == retention_text(n_chunks=5, seed=3)


@pytest.mark.parametrize("chunk_chars", [256, 512, 1024])
def test_texts_are_prose_of_the_asked_size(chunk_chars: int) -> None:
    for text in retention_text(n_chunks=16, chunk_chars=chunk_chars, seed=2):
        assert chunk_chars // 2 <= len(text) <= chunk_chars
        assert text == text.strip() and text[-1] in ".?!"
        assert "::=" not in text and "***" not in text and ">>>" not in text
        for paragraph in text.split("\n\n"):
            assert "\n" not in paragraph and "  " not in paragraph  # re-flowed
            words = paragraph.split()
            assert len(words) >= 3
        letters = sum(c.isalpha() or c.isspace() for c in text)
        assert letters / len(text) >= 0.85
        assert re.search(r"\b(the|a|is|of)\b", text)  # English sentences, not tokens


def test_text_errors() -> None:
    for kwargs, key in (({"n_chunks": 0}, "n_chunks"), ({"chunk_chars": 10}, "chunk_chars"),
                        ({"seed": 1.5}, "seed"), ({"n_chunks": 100_000}, "n_chunks")):
        with pytest.raises(ParameterError, match=key):
            retention_text(**kwargs)


def test_zero_shot_questions() -> None:
    questions = zero_shot_questions()
    assert 10 <= len(questions) <= 16
    assert questions == zero_shot_questions()
    assert len({q.prompt[-1]["content"] for q in questions}) == len(questions)
    for q in questions:
        assert isinstance(q.target, list) and q.target
        assert len(q.prompt[-1]["content"]) <= 80
        assert contains_any(q, q.answer) == 1.0
        assert contains_any(q, "I am not sure.") == 0.0
    paris = next(q for q in questions if "France" in q.prompt[-1]["content"])
    assert contains_any(paris, "It's Paris!") == 1.0 and contains_any(paris, "Lyon") == 0.0


def test_retention_task() -> None:
    task = retention_task()
    assert (task.name, task.metric, task.family) == (RETENTION_TASK, "accuracy", "retention")
    assert task.name == "retention_qa"
    assert len(task.train) == 0 and len(task.eval) == len(zero_shot_questions())
    assert all(task.score(e, e.answer) == 1.0 for e in task.eval)
