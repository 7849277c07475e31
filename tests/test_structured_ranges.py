"""The integer-range grammar matches exactly the JSON integers within its bounds."""

from __future__ import annotations

import random

import pytest

from llmserve.structured.ranges import integer_bounds, integer_range
from tests.test_structured_gbnf import Grammar, llama_accepts

FIXED = [(0, 0), (0, 9), (1, 10), (137, 4201), (-50, 20), (-50, -10), (None, -10), (5, None), (-7, None), (None, 123)]
RANDOM = [
    (low, low + random.Random(low).choice([0, 1, 9, 450, 20_000]))
    for low in random.Random(7).sample(range(-3000, 3000), 20)
]


@pytest.mark.parametrize(("low", "high"), FIXED + RANDOM)
def test_exactly_the_integers_within_the_bounds(low: int | None, high: int | None) -> None:
    rule = f"root ::= {integer_range(low, high)}\n"
    assert llama_accepts(rule)
    grammar = Grammar(rule)
    probes = set(range(-120, 121)) | {v + d for v in (low or 0, high or 0) for d in (-1, 0, 1)} | {99_999, -99_999}
    for value in probes:
        inside = (low is None or value >= low) and (high is None or value <= high)
        assert grammar.matches(str(value)) == inside, value
    for text in ("-0", "00", "01", "-01", "+1", "1.0", ""):
        assert not grammar.matches(text), text


def test_bounds_become_the_least_and_greatest_integer() -> None:
    assert integer_bounds(1.5, 9.9, None, None) == (2, 9)
    assert integer_bounds(None, None, 3, 10) == (4, 9)
    assert integer_bounds(0, 100, 2.5, 99.5) == (3, 99)
    assert integer_bounds(None, None, None, None) == (None, None)


def test_empty_bounds_are_an_error() -> None:
    with pytest.raises(ValueError, match="no integer"):
        integer_range(5, 4)
