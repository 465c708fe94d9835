"""Answer extraction and scorers of cpift.data.scoring, on edge cases."""

from __future__ import annotations

import math
import sys

import pytest

from cpift.data import (
    Example,
    check_format,
    choice_letter,
    code_pass,
    contains_any,
    extract_code,
    final_number,
    letter_match,
    number_match,
    rules_pass,
    text_match,
    unscored,
)
from cpift.errors import CpiftError, ParameterError


def ex(target, answer: str = "ref") -> Example:
    return Example(messages=({"role": "user", "content": "q"}, {"role": "assistant", "content": answer}), target=target)


# --------------------------------------------------------------------------------- final_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3*4=12, 12-2=10. The answer is 10.", 10.0),
        ("The answer is 1,250.", 1250.0),
        ("It costs $1,234,567.89 in total", 1234567.89),
        ("Temperature fell to -3.5 degrees", -3.5),
        ("10-3", 3.0),  # a minus after a digit is subtraction, not a sign
        ("the list 1,2,3", 3.0),  # not thousands grouping
        ("0.5", 0.5),
        ("answer: 42\n", 42.0),
        ("no digits here", None),
        ("", None),
    ],
)
def test_final_number(text: str, expected: float | None) -> None:
    assert final_number(text) == expected


def test_final_number_rejects_non_strings() -> None:
    assert final_number(None) is None  # type: ignore[arg-type]


def test_number_match() -> None:
    assert number_match(ex(10), "so the answer is 10.") == 1.0
    assert number_match(ex("1250"), "The answer is 1,250.") == 1.0
    assert number_match(ex(10), "The answer is 10.0") == 1.0
    assert number_match(ex(10), "The answer is 11.") == 0.0
    assert number_match(ex(10), "I cannot tell.") == 0.0
    with pytest.raises(ParameterError, match="not a number"):
        number_match(ex("ten"), "10")


# -------------------------------------------------------------------------------- choice_letter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: C", "C"),
        ("answer: b", None),  # options are capital letters
        ("The answer is (B).", "B"),
        ("Answer: A\nWait, no. Answer: D", "D"),  # the last stated answer counts
        ("C", "C"),
        ("D. Dan", "D"),
        ("(A) Ann is tallest", "A"),
        ("B) because", "B"),
        ("A cat is an animal.", None),  # the article is not a choice
        ("A. Ann\nB. Ben\nC. Cal", None),  # repeating the options chooses none
        ("C. Cal\nbecause Cal is the shortest", "C"),
        ("Cal is the shortest. Answer: C", "C"),
        ("I think (C) is right", "C"),
        ("Answer: Cal", None),
        ("", None),
        ("none of them", None),
    ],
)
def test_choice_letter(text: str, expected: str | None) -> None:
    assert choice_letter(text) == expected


def test_choice_letter_custom_letters_and_match() -> None:
    assert choice_letter("Answer: E", letters="ABCDE") == "E"
    assert choice_letter("Answer: E") is None
    assert letter_match(ex("C"), "Answer: C") == 1.0
    assert letter_match(ex("C"), "Answer: B") == 0.0
    assert letter_match(ex("c"), "Answer: C") == 1.0


# --------------------------------------------------------------------------------- check_format


def test_check_format_json() -> None:
    rule = {"type": "json_keys", "keys": ["name", "age"]}
    assert check_format('{"name": "Ann", "age": 3}', rule)
    assert check_format('```json\n{"age": 3, "name": "Ann"}\n```', rule)
    assert check_format('  {"name": "Ann", "age": 3}\n', [rule])
    assert not check_format('{"name": "Ann"}', rule)
    assert not check_format('{"name": "Ann", "age": 3, "x": 1}', rule)
    assert check_format('{"name": "Ann", "age": 3, "x": 1}', {**rule, "exact": False})
    assert not check_format('["name", "age"]', rule)
    assert not check_format("name: Ann, age: 3", rule)


def test_check_format_bullets() -> None:
    rule = {"type": "bullets", "n": 3}
    assert check_format("- a\n- b\n- c", rule)
    assert check_format("* a\n\n* b\n* c\n", rule)
    assert check_format("1. a\n2. b\n3) c", rule)
    assert not check_format("- a\n- b", rule)
    assert not check_format("- a\n- b\n- c\n- d", rule)
    assert not check_format("Here you go:\n- a\n- b\n- c", rule)
    assert not check_format("-a\n-b\n-c", rule)  # a bullet is a marker, a space, then text
    assert not check_format("- \n- b\n- c", rule)


def test_check_format_case_and_words() -> None:
    assert check_format("THE CAPITAL IS ROME.", {"type": "uppercase"})
    assert check_format("7 PLUS 3 IS 10", {"type": "uppercase"})
    assert not check_format("The capital is Rome.", {"type": "uppercase"})
    assert not check_format("12345", {"type": "uppercase"})  # no letter at all
    assert not check_format("", {"type": "lowercase"})
    assert check_format("the capital is rome.", {"type": "lowercase"})
    assert not check_format("the capital is Rome.", {"type": "lowercase"})
    assert check_format("one two three", {"type": "max_words", "n": 3})
    assert not check_format("one two three four", {"type": "max_words", "n": 3})
    assert not check_format("   ", {"type": "max_words", "n": 3})
    assert check_format("a b c d", {"type": "min_words", "n": 4})
    assert not check_format("a b c", {"type": "min_words", "n": 4})
    both = [{"type": "bullets", "n": 2}, {"type": "lowercase"}]
    assert check_format("- pear\n- plum", both)
    assert not check_format("- Pear\n- plum", both)


@pytest.mark.parametrize(
    "rules",
    [
        {"type": "sparkles"},
        {"type": "bullets"},
        {"type": "bullets", "n": -1},
        {"type": "max_words", "n": True},
        {"type": "json_keys", "keys": "name"},
        [],
        ["uppercase"],
        "uppercase",
    ],
)
def test_check_format_rejects_bad_rules(rules) -> None:
    with pytest.raises(ParameterError):
        check_format("TEXT", rules)


def test_rules_pass() -> None:
    assert rules_pass(ex([{"type": "uppercase"}]), "YES") == 1.0
    assert rules_pass(ex([{"type": "uppercase"}]), "yes") == 0.0


# ---------------------------------------------------------------------------------------- code


def test_extract_code() -> None:
    assert extract_code("```python\ndef f(x):\n    return x\n```") == "def f(x):\n    return x"
    assert extract_code("Here:\n```py\ndef f():\n    pass\n```\nDone.") == "def f():\n    pass"
    assert extract_code("```\ndef f():\n    pass\n```") == "def f():\n    pass"
    # The block that defines something wins over an example-usage block before it.
    text = "```python\nf(1)\n```\n```python\ndef f(x):\n    return x\n```"
    assert extract_code(text) == "def f(x):\n    return x"
    assert extract_code("```bash\nls\n```\ndef f(): pass") == "```bash\nls\n```\ndef f(): pass"
    assert extract_code("def f(x):\n    return x\n") == "def f(x):\n    return x"
    assert extract_code("```python\ndef f(x):\n    return x") == "def f(x):\n    return x"  # cut short
    assert extract_code("") == ""


def test_code_pass_empty_completion_needs_no_sandbox() -> None:
    assert code_pass(ex("assert f() == 1\n"), "   ") == 0.0


def test_code_pass_without_sandbox_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cpift.sandbox", None)  # makes the import fail
    with pytest.raises(CpiftError, match="cpift.sandbox"):
        code_pass(ex("assert f() == 1\n"), "def f():\n    return 1")


# -------------------------------------------------------------------------------- free text


def test_contains_any_whole_words() -> None:
    assert contains_any(ex(["4", "four"]), "2 + 2 = 4.") == 1.0
    assert contains_any(ex(["4", "four"]), "It is Four") == 1.0
    assert contains_any(ex(["4", "four"]), "It is 14") == 0.0
    assert contains_any(ex(["Paris"]), "paris, of course") == 1.0
    assert contains_any(ex(["Sun"]), "It is Sunday") == 0.0
    assert contains_any(ex("blue"), "Blue!") == 1.0
    assert contains_any(ex([]), "anything") == 0.0
    assert contains_any(ex([""]), "anything") == 0.0


def test_text_match_and_unscored() -> None:
    assert text_match(ex("Rome"), "  rome. ") == 1.0
    assert text_match(ex(["Rome", "Roma"]), '"Roma"') == 1.0
    assert text_match(ex("Rome"), "It is Rome") == 0.0
    assert math.isnan(unscored(ex(None), "anything"))
