"""The embedded offline task suite: small chat tasks generated procedurally from a seed.

Sized for a small chat model (SmolLM2-135M-Instruct) to improve measurably within about thirty
optimizer steps: one short user prompt (at most about 75 SmolLM2 tokens), a short reference answer
(at most about 25 tokens; code blocks up to about 35) in one consistent format per task, and an
automatic scorer. Nothing is downloaded; the same
``(name, n_train, n_eval, seed)`` always gives the same examples (Python's :mod:`random` seeded
from a SHA-256 of the task's generator key and the seed), another seed gives other examples.

=================  ========  ============  ============================================================
task               family    metric        what it asks, and how an answer is scored
=================  ========  ============  ============================================================
``math``           math      exact_match   two-step arithmetic word problems (+, −, ×; small numbers);
                                           answers like "3*4=12, 12-2=10. The answer is 10."; scored
                                           by the last number in the completion
                                           (:func:`~cpift.data.scoring.final_number`)
``code``           code      pass@1        "Write a Python function `name(args)` that …" (one-line
                                           bodies: reverse, sum of evens, count vowels, …); target =
                                           hidden ``assert`` tests run in :mod:`cpift.sandbox`
``logic``          logic     accuracy      multiple choice A–D (orderings, syllogisms with nonsense
                                           words, number and quantity comparisons, weekdays);
                                           answers are one short reason ending with the chosen
                                           option, then the letter ("Monday + 3 days = Thursday.
                                           Answer: C"); scored by log-likelihood over the four
                                           option texts (the example's ``options``), or, for a
                                           generated answer, by the letter
                                           (:func:`~cpift.data.scoring.choice_letter`). The hardest
                                           family for a 135M model: letter choice is near chance
                                           and 30 steps teach the format before the reasoning
``format``         format    rule_pass     explicit format instructions: a JSON object with given
                                           keys, a bullet list of exactly N items, all upper / all
                                           lower case, at most N words; target = the rules
``format_upper``   format    rule_pass     short factual questions, answered in ALL CAPITALS
``format_lower``   format    rule_pass     the *same* questions, answered in all lowercase
=================  ========  ============  ============================================================

**The conflicting pair.** ``format_upper`` and ``format_lower`` draw their prompts from one
generator (key ``"case_style"``), so for the same seed they hold *identical* prompts, and the
prompts carry no case instruction: the style is a property of the task, not of the prompt. Their
reference answers are the same sentence in opposite cases, and each scorer (``uppercase`` or
``lowercase`` plus a word limit) gives 0 to the other's reference. Training on one therefore
pulls the model's behaviour on the very same inputs away from the other: a real seesaw, which
multi-task SFT cannot resolve and parameter isolation has to arbitrate.

Train and evaluation prompts are disjoint: examples are drawn until ``n_eval + n_train`` distinct
prompts exist; the first ``n_eval`` are the evaluation set, so changing ``n_train`` leaves the
evaluation set unchanged.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from cpift.data import scoring
from cpift.data.tasks import Example, Scorer, Task
from cpift.errors import ParameterError
from cpift.settings import validated

__all__ = ["CONFLICTING_PAIRS", "EMBEDDED_TASKS", "derive_rng", "embedded_task", "is_embedded_task"]

# A generator draws one (prompt, reference answer, target, meta) from a random source.
Drawn = tuple[str, str, Any, dict[str, Any]]
Generator = Callable[[random.Random], Drawn]

# How many draws per wanted example before concluding the generator cannot give that many
# distinct prompts.
_DRAWS_PER_EXAMPLE = 60


def derive_rng(key: str, seed: int) -> random.Random:
    """A :class:`random.Random` determined by ``key`` and ``seed`` alone (not by ``hash()``)."""
    digest = hashlib.sha256(f"cpift.data|{key}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# ==============================================================================================
# Shared vocabulary
# ==============================================================================================

_PEOPLE = (
    ("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Eva", "she"), ("Finn", "he"),
    ("Gina", "she"), ("Hugo", "he"), ("Iris", "she"), ("Jack", "he"), ("Kate", "she"), ("Leo", "he"),
    ("Mia", "she"), ("Noah", "he"), ("Olga", "she"), ("Paul", "he"), ("Rosa", "she"), ("Sam", "he"),
    ("Tara", "she"), ("Tom", "he"),
)
_NAMES = tuple(name for name, _ in _PEOPLE)

_COUNTRIES = (
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
    ("Poland", "Warsaw"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("China", "Beijing"),
    ("Canada", "Ottawa"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Cuba", "Havana"),
)
_COLOURS = (
    ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a ripe tomato", "red"), ("the clear sky", "blue"), ("milk", "white"), ("a lemon", "yellow"),
    ("a carrot", "orange"), ("a strawberry", "red"), ("chocolate", "brown"), ("a lime", "green"),
)
_OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("day", "night"), ("open", "closed"), ("full", "empty"), ("wet", "dry"), ("old", "new"),
    ("early", "late"), ("light", "dark"), ("loud", "quiet"), ("hard", "soft"), ("win", "lose"),
)
_LEGS = (
    ("dog", "four"), ("cat", "four"), ("spider", "eight"), ("bird", "two"), ("horse", "four"),
    ("ant", "six"), ("cow", "four"), ("duck", "two"), ("bee", "six"), ("chicken", "two"),
)
_SOUNDS = (("moo", "a cow"), ("woof", "a dog"), ("meow", "a cat"), ("quack", "a duck"), ("oink", "a pig"),
           ("baa", "a sheep"), ("neigh", "a horse"), ("hiss", "a snake"))
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                 "eighteen", "nineteen", "twenty")


# ==============================================================================================
# math
# ==============================================================================================

_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "coins", "eggs",
          "shells", "stamps", "balloons")


def _math(rng: random.Random) -> Drawn:
    name, pron = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:  # a + b - c
        a, b = rng.randint(3, 15), rng.randint(2, 12)
        c = rng.randint(1, a + b - 1)
        s, r = a + b, a + b - c
        prompt = (f"{name} has {a} {item}. {pron.capitalize()} buys {b} more and then gives {c} to a "
                  f"friend. How many {item} does {pron} have now?")
        work = f"{a}+{b}={s}, {s}-{c}={r}."
    elif kind == 1:  # a * b + c
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 12)
        s, r = a * b, a * b + c
        prompt = (f"{name} buys {a} bags with {b} {item} in each bag. {pron.capitalize()} also finds "
                  f"{c} more {item}. How many {item} does {pron} have in total?")
        work = f"{a}*{b}={s}, {s}+{c}={r}."
    elif kind == 2:  # a * b - c
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(2, a * b - 1)
        s, r = a * b, a * b - c
        prompt = (f"{name} has {a} boxes with {b} {item} in each box. {pron.capitalize()} gives away "
                  f"{c} {item}. How many {item} are left?")
        work = f"{a}*{b}={s}, {s}-{c}={r}."
    elif kind == 3:  # a - b + c
        a = rng.randint(6, 20)
        b, c = rng.randint(1, a - 1), rng.randint(2, 12)
        s, r = a - b, a - b + c
        prompt = (f"There are {a} {item} on a table. {name} takes {b} of them, then puts {c} new "
                  f"{item} on the table. How many {item} are on the table now?")
        work = f"{a}-{b}={s}, {s}+{c}={r}."
    else:  # (a + b) * k
        a, b, k = rng.randint(2, 9), rng.randint(1, 6), rng.randint(2, 5)
        s, r = a + b, (a + b) * k
        prompt = (f"Each of {k} friends has {a} {item} and then gets {b} more. How many {item} do the "
                  f"friends have altogether?")
        work = f"{a}+{b}={s}, {s}*{k}={r}."
    return prompt, f"{work} The answer is {r}.", r, {"template": kind}


# ==============================================================================================
# code
# ==============================================================================================


@dataclass(frozen=True)
class _CodeTemplate:
    """One kind of small function: names to choose from, the prompt, the body, test inputs."""

    names: tuple[str, ...]
    args: tuple[tuple[str, ...], ...]  # alternative parameter-name tuples
    describe: str  # format fields: the parameters by position ({0}, {1}) and constants ({k}, {c})
    body: str  # a return expression with the same fields
    inputs: Callable[[random.Random, dict[str, Any]], list[tuple[Any, ...]]]
    consts: Callable[[random.Random], dict[str, Any]] = lambda rng: {}


_LETTERS_POOL = "abcdefghijklmnopqrstuvwxyz"
_WORDS = ("apple", "banana", "level", "python", "rotor", "sky", "tree", "hello", "kayak", "moon",
          "queue", "radar", "data", "code", "civic", "stone", "eye", "noon", "bird", "music")


def _word(rng: random.Random) -> str:
    return rng.choice(_WORDS)


def _ints(rng: random.Random, lo: int = -9, hi: int = 20, n: tuple[int, int] = (3, 6)) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(rng.randint(*n))]


_CODE_TEMPLATES: tuple[_CodeTemplate, ...] = (
    _CodeTemplate(("reverse_string", "reverse_text", "flip_text", "backwards", "rev_str"),
                  (("s",), ("text",), ("word",)), "returns the string {0} reversed", "{0}[::-1]",
                  lambda rng, c: [(_word(rng),), (_word(rng),), ("",)]),
    _CodeTemplate(("sum_evens", "sum_of_evens", "even_total", "add_evens"),
                  (("nums",), ("xs",), ("values",)), "returns the sum of the even numbers in the list {0}",
                  "sum(x for x in {0} if x % 2 == 0)",
                  lambda rng, c: [(_ints(rng),), (_ints(rng),), ([1, 3, 5],)]),
    _CodeTemplate(("count_vowels", "vowel_count", "num_vowels"),
                  (("s",), ("text",), ("word",)), "returns how many vowels (a, e, i, o, u) the lowercase "
                  "string {0} contains", "sum(ch in 'aeiou' for ch in {0})",
                  lambda rng, c: [(_word(rng),), (_word(rng) + " " + _word(rng),), ("xyz",)]),
    _CodeTemplate(("largest", "max_value", "biggest", "find_max"),
                  (("nums",), ("xs",), ("values",)), "returns the largest number in the non-empty list {0}",
                  "max({0})", lambda rng, c: [(_ints(rng),), (_ints(rng),), ([-4, -2, -7],)]),
    _CodeTemplate(("smallest", "min_value", "find_min", "lowest"),
                  (("nums",), ("xs",), ("values",)), "returns the smallest number in the non-empty list {0}",
                  "min({0})", lambda rng, c: [(_ints(rng),), (_ints(rng),), ([5],)]),
    _CodeTemplate(("add_{k}", "plus_{k}", "increase_by_{k}"),
                  (("x",), ("n",), ("value",)), "returns {0} plus {k}", "{0} + {k}",
                  lambda rng, c: [(rng.randint(-20, 50),), (rng.randint(-20, 50),), (0,)],
                  lambda rng: {"k": rng.randint(2, 19)}),
    _CodeTemplate(("times_{k}", "multiply_by_{k}", "scale_{k}"),
                  (("x",), ("n",), ("value",)), "returns {0} multiplied by {k}", "{0} * {k}",
                  lambda rng, c: [(rng.randint(-20, 50),), (rng.randint(-20, 50),), (1,)],
                  lambda rng: {"k": rng.randint(2, 12)}),
    _CodeTemplate(("divisible_by_{k}", "is_multiple_of_{k}"),
                  (("n",), ("x",), ("num",)), "returns True if {0} is divisible by {k} and False otherwise",
                  "{0} % {k} == 0",
                  lambda rng, c: [(c["k"] * rng.randint(1, 9),), (c["k"] * rng.randint(1, 9) + 1,), (0,)],
                  lambda rng: {"k": rng.randint(2, 9)}),
    _CodeTemplate(("count_{c}", "how_many_{c}", "count_letter_{c}"),
                  (("s",), ("text",), ("word",)), "returns how many times the letter '{c}' appears in the "
                  "string {0}", "{0}.count('{c}')",
                  lambda rng, c: [(c["c"] * 2 + _word(rng),), (_word(rng),), ("",)],
                  lambda rng: {"c": rng.choice(_LETTERS_POOL)}),
    _CodeTemplate(("squares", "square_all", "squared"),
                  (("nums",), ("xs",), ("values",)), "returns a list of the squares of the numbers in {0}",
                  "[x * x for x in {0}]", lambda rng, c: [(_ints(rng),), (_ints(rng),), ([],)]),
    _CodeTemplate(("above_{k}", "greater_than_{k}", "keep_over_{k}"),
                  (("nums",), ("xs",), ("values",)), "returns a list of the numbers in {0} that are greater "
                  "than {k}, in their original order", "[x for x in {0} if x > {k}]",
                  lambda rng, c: [(_ints(rng, 0, 20, (4, 7)),), (_ints(rng, 0, 20, (4, 7)),), ([c["k"]],)],
                  lambda rng: {"k": rng.randint(3, 12)}),
    _CodeTemplate(("repeat_{k}", "repeat_text", "echo_{k}"),
                  (("s",), ("text",), ("word",)), "returns the string {0} repeated {k} times", "{0} * {k}",
                  lambda rng, c: [(_word(rng),), ("ab",), ("",)], lambda rng: {"k": rng.randint(2, 5)}),
    _CodeTemplate(("first_{k}", "prefix_{k}", "head_{k}"),
                  (("s",), ("text",), ("word",)), "returns the first {k} characters of the string {0}",
                  "{0}[:{k}]", lambda rng, c: [(_word(rng),), (_word(rng) + _word(rng),), ("a",)],
                  lambda rng: {"k": rng.randint(2, 4)}),
    _CodeTemplate(("abs_diff", "distance", "gap"),
                  (("a", "b"), ("x", "y"), ("m", "n")), "returns the absolute difference between {0} and {1}",
                  "abs({0} - {1})",
                  lambda rng, c: [(rng.randint(-9, 30), rng.randint(-9, 30)), (3, 10), (7, 7)]),
    _CodeTemplate(("shout", "to_upper", "make_upper"),
                  (("s",), ("text",), ("word",)), "returns the string {0} in uppercase", "{0}.upper()",
                  lambda rng, c: [(_word(rng),), (_word(rng) + " " + _word(rng),), ("",)]),
    _CodeTemplate(("count_positive", "num_positive", "positives"),
                  (("nums",), ("xs",), ("values",)), "returns how many numbers in the list {0} are greater "
                  "than zero", "sum(1 for x in {0} if x > 0)",
                  lambda rng, c: [(_ints(rng),), (_ints(rng),), ([0, -1],)]),
    _CodeTemplate(("last_item", "last_element", "final_item"),
                  (("items",), ("xs",), ("values",)), "returns the last element of the non-empty list {0}",
                  "{0}[-1]", lambda rng, c: [(_ints(rng),), (_ints(rng),), ([8],)]),
    _CodeTemplate(("is_palindrome", "reads_same", "palindrome"),
                  (("s",), ("text",), ("word",)), "returns True if the string {0} reads the same backwards "
                  "and False otherwise", "{0} == {0}[::-1]",
                  lambda rng, c: [(rng.choice(("level", "radar", "noon", "kayak")),), ("python",), ("ab",)]),
    _CodeTemplate(("starts_with_{p}", "begins_{p}"),
                  (("s",), ("text",), ("word",)), "returns True if the string {0} starts with '{p}' and "
                  "False otherwise", "{0}.startswith('{p}')",
                  lambda rng, c: [(c["p"] + _word(rng),), (_word(rng),), (c["p"][0],)],
                  lambda rng: {"p": rng.choice(("ab", "re", "un", "pre", "co", "x"))}),
)


def _code(rng: random.Random) -> Drawn:
    index = rng.randrange(len(_CODE_TEMPLATES))
    tpl = _CODE_TEMPLATES[index]
    consts = tpl.consts(rng)
    name = rng.choice(tpl.names).format(**consts)
    args = rng.choice(tpl.args)
    signature = f"{name}({', '.join(args)})"
    prompt = (f"Write a Python function `{signature}` that "
              f"{tpl.describe.format(*(f'`{a}`' for a in args), **consts)}.")
    expr = tpl.body.format(*args, **consts)
    answer = f"```python\ndef {signature}:\n    return {expr}\n```"
    reference = eval(f"lambda {', '.join(args)}: {expr}")
    tests = []
    for inputs in tpl.inputs(rng, consts):
        expected = reference(*inputs)
        tests.append(f"assert {name}({', '.join(repr(x) for x in inputs)}) == {expected!r}")
    return prompt, answer, "\n".join(tests) + "\n", {"template": index, "function": name}


# ==============================================================================================
# logic
# ==============================================================================================

_RELATIONS = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"),
              ("faster", "fastest", "slowest"), ("heavier", "heaviest", "lightest"),
              ("richer", "richest", "poorest"))
_NONSENSE = ("zorps", "blickets", "flims", "wugs", "daxes", "toves", "glorps", "snarks", "quibs",
             "brillers", "moxes", "fendles")


def _choice_prompt(rng: random.Random, question: str, correct: str, wrong: list[str]
                   ) -> tuple[str, list[str], int]:
    options = [correct, *wrong[:3]]
    if len(set(options)) != 4:
        raise AssertionError(f"logic template produced duplicate options: {options}")
    rng.shuffle(options)
    lines = "\n".join(f"{l}. {o}" for l, o in zip("ABCD", options))
    return f"{question}\n{lines}", options, options.index(correct)


def _logic(rng: random.Random) -> Drawn:
    kind = rng.randrange(5)
    if kind == 0:  # ordering of three people
        rel, top, bottom = rng.choice(_RELATIONS)
        p = rng.sample(_NAMES, 4)
        facts = [f"{p[0]} is {rel} than {p[1]}.", f"{p[1]} is {rel} than {p[2]}."]
        rng.shuffle(facts)
        which = rng.randrange(3)
        ask, correct, label = ((f"Who is the {top}?", p[0], top), (f"Who is the {bottom}?", p[2], bottom),
                               ("Who is in the middle?", p[1], "middle"))[which]
        wrong = [x for x in p[:3] if x != correct] + ["Cannot be determined"]
        question = f"{' '.join(facts)} {ask}"
        why = f"From {top} to {bottom}: {p[0]}, {p[1]}, {p[2]}. {label.capitalize()}: {correct}."
    elif kind == 1:  # syllogisms with nonsense words
        a, b, c = rng.sample(_NONSENSE, 3)
        name = rng.choice(_NAMES)
        form = rng.randrange(3)
        if form == 0:
            question = f"All {a} are {b}. {name} is one of the {a}. Which statement must be true?"
            correct = f"{name} is one of the {b}."
            wrong = [f"{name} is not one of the {b}.", f"All {b} are {a}.", f"No {a} are {b}."]
        elif form == 1:
            question = f"No {a} are {b}. {name} is one of the {a}. Which statement must be true?"
            correct = f"{name} is not one of the {b}."
            wrong = [f"{name} is one of the {b}.", f"All {a} are {b}.", f"Some {a} are {b}."]
        else:
            question = f"All {a} are {b}. All {b} are {c}. Which statement must be true?"
            correct = f"All {a} are {c}."
            wrong = [f"All {c} are {a}.", f"No {a} are {c}.", f"No {b} are {c}."]
        why = correct
    elif kind == 2:  # the largest / smallest number
        nums = rng.sample(range(10, 100), 4)
        largest = rng.random() < 0.5
        question = f"Which number is the {'largest' if largest else 'smallest'}?"
        correct = str(max(nums) if largest else min(nums))
        wrong = [str(n) for n in nums if str(n) != correct]
        why = f"The {'largest' if largest else 'smallest'} is {correct}."
    elif kind == 3:  # weekdays
        start, k = rng.randrange(7), rng.randint(1, 6)
        question = f"If today is {_DAYS[start]}, what day will it be in {k} days?"
        correct = _DAYS[(start + k) % 7]
        wrong = rng.sample([d for d in _DAYS if d != correct], 3)
        why = f"{_DAYS[start]} + {k} days = {correct}."
    else:  # comparing quantities
        p = rng.sample(_NAMES, 3)
        item = rng.choice(_ITEMS)
        a, d1, d2 = rng.randint(3, 12), rng.randint(1, 5), rng.randint(1, 5)
        counts = {p[0]: a, p[1]: a + d1}
        if rng.random() < 0.5:
            counts[p[2]] = a + d1 + d2
            third = f"{p[2]} has {d2} more than {p[1]}."
        else:
            d2 = rng.randint(1, a + d1 - 1)
            counts[p[2]] = a + d1 - d2
            third = f"{p[2]} has {d2} fewer than {p[1]}."
        values = sorted(counts.values())
        if values[1] == values[2] or values[0] == values[1]:
            return _logic(rng)  # ties make "most"/"fewest" ambiguous: draw again
        most = rng.random() < 0.5
        correct = max(counts, key=counts.get) if most else min(counts, key=counts.get)
        question = (f"{p[0]} has {a} {item}. {p[1]} has {d1} more than {p[0]}. {third} "
                    f"Who has the {'most' if most else 'fewest'} {item}?")
        wrong = [x for x in p if x != correct] + ["They have the same number"]
        why = ", ".join(f"{x} {counts[x]}" for x in p) + f". {'Most' if most else 'Fewest'}: {correct}."
    prompt, options, index = _choice_prompt(rng, question, correct, wrong)
    letter = "ABCD"[index]
    meta = {"template": kind, "options": tuple(options), "correct": (index,)}
    return prompt, f"{why} Answer: {letter}", letter, meta


# ==============================================================================================
# short facts (shared by format, format_upper and format_lower)
# ==============================================================================================


def _fact(rng: random.Random) -> tuple[str, str]:
    """A short question a small model can answer, and a one-sentence answer with letters in it."""
    kind = rng.randrange(8)
    if kind == 0:
        country, capital = rng.choice(_COUNTRIES)
        return f"What is the capital of {country}?", f"The capital of {country} is {capital}."
    if kind == 1:
        thing, colour = rng.choice(_COLOURS)
        return f"What colour is {thing}?", f"{thing[0].upper()}{thing[1:]} is {colour}."
    if kind == 2:  # 900 sums: enough distinct prompts for 200 evaluation items beside the training ones
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 3:
        word, opposite = rng.choice(_OPPOSITES)
        if rng.random() < 0.5:
            word, opposite = opposite, word
        return f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."
    if kind == 4:
        animal, legs = rng.choice(_LEGS)
        return f"How many legs does a {animal} have?", f"A {animal} has {legs} legs."
    if kind == 5:
        sound, animal = rng.choice(_SOUNDS)
        return f'Which animal says "{sound}"?', f"{animal[0].upper()}{animal[1:]} says {sound}."
    if kind == 6:
        i = rng.randrange(7)
        return f"What day comes after {_DAYS[i]}?", f"The day after {_DAYS[i]} is {_DAYS[(i + 1) % 7]}."
    i = rng.randrange(12)
    return f"What month comes after {_MONTHS[i]}?", f"The month after {_MONTHS[i]} is {_MONTHS[(i + 1) % 12]}."


_CASE_MAX_WORDS = 12


def _case_style(upper: bool) -> Generator:
    def draw(rng: random.Random) -> Drawn:
        question, sentence = _fact(rng)
        answer = sentence.upper() if upper else sentence.lower()
        rules = [{"type": "uppercase" if upper else "lowercase"}, {"type": "max_words", "n": _CASE_MAX_WORDS}]
        return question, answer, rules, {"style": "upper" if upper else "lower"}

    return draw


# ==============================================================================================
# format
# ==============================================================================================

_LISTS = {
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear", "plum", "peach"),
    "animals": ("cat", "dog", "horse", "lion", "tiger", "rabbit", "mouse", "bear", "wolf", "fox"),
    "colours": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"),
    "vegetables": ("carrot", "potato", "onion", "pea", "bean", "leek", "cabbage", "pepper", "corn", "kale"),
    "sports": ("football", "tennis", "golf", "rugby", "hockey", "boxing", "cricket", "rowing", "judo", "skiing"),
    "instruments": ("piano", "violin", "guitar", "drum", "flute", "harp", "cello", "trumpet", "oboe", "banjo"),
}


def _json_record(rng: random.Random) -> tuple[str, dict[str, Any]]:
    kind = rng.randrange(4)
    if kind == 0:
        name, age = rng.choice(_NAMES), rng.randint(18, 80)
        return f"{name}, who is {age} years old", {"name": name, "age": age}
    if kind == 1:
        country, capital = rng.choice(_COUNTRIES)
        return f"{capital}, the capital of {country}", {"city": capital, "country": country}
    if kind == 2:
        item, price = rng.choice(("book", "lamp", "chair", "kettle", "clock", "mug")), rng.randint(2, 99)
        return f"a {item} that costs {price} dollars", {"item": item, "price": price}
    animal, legs = rng.choice(_LEGS)
    return f"a {animal}, which has {legs} legs", {"animal": animal, "legs": _NUMBER_WORDS.index(legs)}


def _format(rng: random.Random) -> Drawn:
    kind = rng.randrange(6)
    if kind == 0:
        what, record = _json_record(rng)
        keys = list(record)
        quoted = " and ".join(f'"{k}"' for k in keys)
        prompt = f"Give a JSON object with the keys {quoted} for {what}. Reply with only the JSON."
        return prompt, json.dumps(record), [{"type": "json_keys", "keys": keys}], {"rule": "json"}
    if kind in (1, 2):
        lowercase = kind == 2
        category = rng.choice(sorted(_LISTS))
        n = rng.randint(2, 4)
        items = rng.sample(_LISTS[category], n)
        if lowercase:
            prompt = f"List exactly {n} {category} as a bullet list, using only lowercase letters."
            answer = "\n".join(f"- {x}" for x in items)
            rules = [{"type": "bullets", "n": n}, {"type": "lowercase"}]
        else:
            prompt = f"List exactly {n} {category} as a bullet list."
            answer = "\n".join(f"- {x.capitalize()}" for x in items)
            rules = [{"type": "bullets", "n": n}]
        return prompt, answer, rules, {"rule": "bullets"}
    question, sentence = _fact(rng)
    if kind == 3:
        return (f"Answer in all capital letters. {question}", sentence.upper(), [{"type": "uppercase"}],
                {"rule": "uppercase"})
    if kind == 4:
        return (f"Answer in all lowercase letters. {question}", sentence.lower(), [{"type": "lowercase"}],
                {"rule": "lowercase"})
    n = len(sentence.split()) + rng.randint(0, 2)
    return (f"Answer in at most {n} words. {question}", sentence, [{"type": "max_words", "n": n}],
            {"rule": "max_words"})


# ==============================================================================================
# The suite
# ==============================================================================================


@dataclass(frozen=True)
class _Spec:
    family: str
    metric: str
    score: Scorer
    generator: Generator
    rng_key: str  # tasks sharing a key share their prompts for a given seed
    description: str


_SPECS: dict[str, _Spec] = {
    "math": _Spec("math", "exact_match", scoring.number_match, _math, "math",
                  "Two-step arithmetic word problems; answers end with 'The answer is N.'; scored by "
                  "exact match of the final number."),
    "code": _Spec("code", "pass@1", scoring.code_pass, _code, "code",
                  "Write a one-line Python function; scored by hidden unit tests run in the sandbox."),
    "logic": _Spec("logic", "accuracy", scoring.letter_match, _logic, "logic",
                   "Multiple choice A-D: orderings, syllogisms, comparisons, weekdays; answers are a "
                   "short reason then 'Answer: X'; scored by log-likelihood over the options."),
    "format": _Spec("format", "rule_pass", scoring.rules_pass, _format, "format",
                    "Explicit format instructions (JSON keys, bullet count, letter case, word limit); "
                    "scored by checking the rules."),
    "format_upper": _Spec("format", "rule_pass", scoring.rules_pass, _case_style(True), "case_style",
                          "Short factual questions answered in ALL CAPITALS (no instruction in the "
                          "prompt); conflicts with format_lower, which has the same prompts."),
    "format_lower": _Spec("format", "rule_pass", scoring.rules_pass, _case_style(False), "case_style",
                          "Short factual questions answered in all lowercase (no instruction in the "
                          "prompt); conflicts with format_upper, which has the same prompts."),
}

EMBEDDED_TASKS: tuple[str, ...] = tuple(_SPECS)
"""Names accepted by :func:`embedded_task`."""

CONFLICTING_PAIRS: tuple[tuple[str, str], ...] = (("format_upper", "format_lower"),)
"""Embedded tasks that want opposite outputs for the same prompts (see the module docstring)."""


def is_embedded_task(name: object) -> bool:
    """Whether ``name`` is one of :data:`EMBEDDED_TASKS`."""
    return isinstance(name, str) and name in _SPECS


@validated
def embedded_task(name: str, n_train: Annotated[int, Field(ge=0)] = 64, n_eval: Annotated[int, Field(ge=0)] = 32,
                  seed: int = 0) -> Task:
    """One task of the embedded suite (see the module docstring for the tasks).

    Args:
        name: one of :data:`EMBEDDED_TASKS`.
        n_train: number of training examples.
        n_eval: number of evaluation examples; their prompts never occur among the training ones,
            and they do not depend on ``n_train``.
        seed: any integer; the same arguments always give the same task.

    Raises:
        ParameterError: an unknown name, a negative or non-integer count or seed, or more examples
            than the task's generator can make distinct (thousands for most tasks; a few hundred
            for ``format_upper`` / ``format_lower``).
    """
    spec = _SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ParameterError(f"unknown embedded task {name!r}; known: {', '.join(EMBEDDED_TASKS)}")
    rng = derive_rng(spec.rng_key, seed)
    wanted = n_eval + n_train
    examples: list[Example] = []
    seen: set[str] = set()
    for _ in range(max(wanted, 1) * _DRAWS_PER_EXAMPLE):
        if len(examples) == wanted:
            break
        prompt, answer, target, meta = spec.generator(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": answer})
        choices = {key: meta.pop(key) for key in ("options", "correct") if key in meta}  # multiple choice
        examples.append(Example(messages=messages, target=target, meta={"task": name, **meta}, **choices))
    if len(examples) < wanted:
        raise ParameterError(
            f"embedded task {name!r} made only {len(examples)} distinct prompts, fewer than "
            f"n_train + n_eval = {wanted}; ask for fewer examples"
        )
    return Task(
        name=name,
        family=spec.family,
        train=tuple(examples[n_eval:]),
        eval=tuple(examples[:n_eval]),
        score=spec.score,
        metric=spec.metric,
        description=spec.description,
    )
