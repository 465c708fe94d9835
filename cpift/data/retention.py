"""The retention suite: out-of-distribution material that is never trained on.

It measures what fine-tuning costs the model's general ability (forgetting, collapse):

* :func:`retention_text` — chunks of plain English prose about Python, taken from the help topics
  that ship with CPython (:mod:`pydoc_data.topics`), to be scored by next-token accuracy and
  perplexity (the scoring lives in the evaluation code; this module only provides the texts).
  Only prose paragraphs are kept: headings, grammar rules, code samples, tables and bullet lists
  are dropped, and paragraphs are re-flowed to single spaces. The texts are deterministic for a
  given Python version (the topics change between CPython releases).
* :func:`zero_shot_questions` / :func:`retention_task` — a dozen very easy factual and
  common-sense questions a 135M-parameter instruct model answers correctly, scored by
  :func:`~cpift.data.scoring.contains_any` (any acceptable answer, as a whole word,
  case-insensitively).
"""

from __future__ import annotations

import re
from functools import lru_cache

from cpift.data.embedded import derive_rng
from cpift.data.scoring import contains_any
from cpift.data.tasks import Example, Task
from cpift.errors import CpiftError, ParameterError

__all__ = ["RETENTION_TASK", "prose_paragraphs", "retention_task", "retention_text", "zero_shot_questions"]

RETENTION_TASK = "retention_qa"
"""Name of the zero-shot retention task."""

_MIN_WORDS = 12
_MIN_LETTER_SHARE = 0.85  # letters and spaces among the characters of a prose paragraph
_UNDERLINE = re.compile(r"[*=\-~^\"#+]{3,}")
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z\"(])")


def _is_prose(lines: list[str]) -> bool:
    if any(line[:1] in (" ", "\t") for line in lines):  # code samples and grammar are indented
        return False
    if any(_UNDERLINE.fullmatch(line.strip()) for line in lines):  # headings
        return False
    if lines[0].lstrip().startswith(("*", "+", "|", "-", ">>>", "•")):  # lists and tables
        return False
    text = " ".join(lines)
    if len(text.split()) < _MIN_WORDS or not text.rstrip().endswith((".", "?", "!")):
        return False
    return _letter_share(text) >= _MIN_LETTER_SHARE


def _letter_share(text: str) -> float:
    return sum(c.isalpha() or c.isspace() for c in text) / max(len(text), 1)


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[tuple[str, str], ...]:
    """``(topic, paragraph)`` for every prose paragraph of :data:`pydoc_data.topics.topics`, topics
    in sorted order, paragraphs in document order, whitespace collapsed to single spaces.

    Raises:
        CpiftError: this Python has no ``pydoc_data`` (some minimal builds strip it).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - every standard CPython ships it
        raise CpiftError(f"the retention texts come from CPython's pydoc_data, which cannot be imported: {exc}") from exc
    out = []
    for topic in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[topic]):
            lines = [line for line in block.split("\n") if line.strip()]
            if lines and _is_prose(lines):
                out.append((topic, " ".join(" ".join(lines).split())))
    return tuple(out)


def _pieces(paragraph: str, limit: int) -> list[str]:
    """Split a paragraph longer than ``limit`` into runs of whole consecutive sentences, each at
    most ``limit`` long; a sentence longer than ``limit`` is left out (and ends the run before it,
    so no piece joins sentences that were not adjacent)."""
    if len(paragraph) <= limit:
        return [paragraph]
    pieces: list[str] = []
    run = ""
    for sentence in _SENTENCE_END.split(paragraph):
        if len(sentence) > limit:
            if run:
                pieces.append(run)
            run = ""
        elif run and len(run) + 1 + len(sentence) <= limit:
            run = f"{run} {sentence}"
        else:
            if run:
                pieces.append(run)
            run = sentence
    if run:
        pieces.append(run)
    return pieces


@lru_cache(maxsize=8)
def _chunks(chunk_chars: int) -> tuple[str, ...]:
    """Every candidate chunk: consecutive prose paragraphs (or runs of whole sentences of a long
    one) of one topic packed up to ``chunk_chars`` characters, joined by blank lines, keeping the
    chunks at least half that long."""
    chunks: list[str] = []
    current: list[str] = []
    topic_of_current = None

    def flush() -> None:
        text = "\n\n".join(current)
        if len(text) >= chunk_chars // 2:
            chunks.append(text)
        current.clear()

    for topic, paragraph in prose_paragraphs():
        if topic != topic_of_current:
            flush()
            topic_of_current = topic
        for piece in _pieces(paragraph, chunk_chars):
            if _letter_share(piece) < _MIN_LETTER_SHARE:  # a run of sentences that is mostly code names
                continue
            if current and len("\n\n".join([*current, piece])) > chunk_chars:
                flush()
            current.append(piece)
    flush()
    return tuple(chunks)


def retention_text(n_chunks: int = 32, chunk_chars: int = 512, seed: int = 0) -> list[str]:
    """``n_chunks`` prose chunks of at most ``chunk_chars`` characters (and at least half that)
    about Python, from CPython's help topics, picked at random by ``seed`` and returned in document
    order. The default 512 characters is roughly 110 tokens of SmolLM2's tokenizer.

    Raises:
        ParameterError: ``n_chunks`` < 1, ``chunk_chars`` < 64, a non-integer seed, or more
            chunks asked for than the topics hold at that size (several hundred at 512).
    """
    for key, value, low in (("n_chunks", n_chunks, 1), ("chunk_chars", chunk_chars, 64)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ParameterError(f"{key} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParameterError(f"seed must be an integer, got {seed!r}")
    candidates = _chunks(chunk_chars)
    if n_chunks > len(candidates):
        raise ParameterError(
            f"n_chunks={n_chunks} is more than the {len(candidates)} prose chunks of "
            f"chunk_chars={chunk_chars} that pydoc_data holds; ask for fewer or shorter chunks"
        )
    picked = sorted(derive_rng("retention_text", seed).sample(range(len(candidates)), n_chunks))
    return [candidates[i] for i in picked]


# Each checked against SmolLM2-135M-Instruct (greedy decoding, 40 new tokens): it answers all of
# them. Questions it got wrong (what bees make, the colour of grass, the largest planet, …) are not
# here: a retention probe must start near 100 % so that any drop is forgetting.
_QUESTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", "The capital of France is Paris.", ("Paris",)),
    ("What is 2 + 2?", "2 + 2 = 4.", ("4", "four")),
    ("What colour is the sky on a clear day?", "The sky is blue.", ("blue",)),
    ("What is the opposite of hot?", "The opposite of hot is cold.", ("cold",)),
    ("How many days are there in a week?", "There are 7 days in a week.", ("7", "seven")),
    ('Which animal says "meow"?', "A cat says meow.", ("cat", "cats", "kitten")),
    ("How many legs does a dog have?", "A dog has four legs.", ("4", "four")),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", ("Tokyo",)),
    ("What is the opposite of day?", "The opposite of day is night.", ("night",)),
    ("What is the boiling point of water in Celsius?", "Water boils at 100 degrees Celsius.", ("100",)),
    ("How many hours are in a day?", "There are 24 hours in a day.", ("24", "twenty-four")),
    ("What gas do humans need to breathe?", "Humans need oxygen.", ("oxygen",)),
    ("What is the capital of England?", "The capital of England is London.", ("London",)),
)


def zero_shot_questions() -> list[Example]:
    """Thirteen very easy questions; ``target`` lists the acceptable answers (any one suffices,
    matched as a whole word, case-insensitively); the last message is a reference answer."""
    return [
        Example(
            messages=({"role": "user", "content": q}, {"role": "assistant", "content": a}),
            target=list(accept),
            meta={"task": RETENTION_TASK, "index": i},
        )
        for i, (q, a, accept) in enumerate(_QUESTIONS)
    ]


def retention_task() -> Task:
    """The zero-shot retention questions as a task with no training examples: name
    ``"retention_qa"``, family ``"retention"``, metric ``"accuracy"`` (:func:`contains_any`)."""
    return Task(
        name=RETENTION_TASK,
        family="retention",
        train=(),
        eval=tuple(zero_shot_questions()),
        score=contains_any,
        metric="accuracy",
        description="Very easy factual and common-sense questions, never trained on; a drop in "
        "accuracy after fine-tuning measures forgetting.",
    )
