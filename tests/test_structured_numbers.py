"""The number automaton's grammar matches exactly the JSON numbers its bounds and multipleOf allow,
written as the grammar writes them (no exponent, no trailing zeros, no leading zeros, no "-0")."""

from __future__ import annotations

import random
import re
from decimal import Decimal

import pytest

from llmserve.structured.numbers import MAX_FRACTION_DIGITS, Bound, NoNumber, Numbers, TooComplex
from tests.test_structured_gbnf import Grammar, llama_accepts

CANONICAL = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?")


def grammar_text(numbers: Numbers) -> str:
    automaton = numbers.automaton()
    names = [f"state{i}" for i in range(len(automaton))]
    rules = "".join(f"{name} ::= {body}\n" for name, body in zip(names, automaton.bodies(names), strict=True))
    return f"root ::= {names[0]}\n{rules}"


def bound(value: str | None, inclusive: bool = True) -> Bound | None:
    return None if value is None else Bound(Decimal(value), inclusive)


def probes(numbers: Numbers, rng: random.Random) -> set[str]:
    """Numbers near the bounds and the step's multiples, small ones, and random ones of every shape."""
    anchors = [Decimal(0), Decimal(1)] + [b.value for b in (numbers.low, numbers.high) if b is not None]
    step = numbers.step or Decimal("0.1")
    texts = set()
    for anchor in anchors:
        for delta in (0, 1, -1, 2, -2, Decimal("0.5"), Decimal("-0.5"), Decimal("0.01"), Decimal("-0.001")):
            for value in (anchor + delta, anchor + delta * step, -(anchor + delta)):
                texts.add(_canonical(value))
    for _ in range(300):
        whole = rng.choice(["0", str(rng.randrange(1, 10)), str(rng.randrange(10, 1000)), str(rng.randrange(10**12))])
        fraction = "".join(rng.choice("0123456789") for _ in range(rng.choice([0, 0, 1, 2, 3, 17])))
        texts.add(_canonical(Decimal(rng.choice(["", "-"]) + whole + ("." + fraction if fraction else ""))))
    return texts


def _canonical(value: Decimal) -> str:
    text = f"{value:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


CASES = [
    Numbers(low=bound("0"), high=bound("1")),
    Numbers(low=bound("0.5")),
    Numbers(high=bound("99.99")),
    Numbers(low=bound("-0.25", False), high=bound("0.75", False)),
    Numbers(low=bound("-12.5"), high=bound("-3.125")),
    Numbers(low=bound("3.14159"), high=bound("3.1416")),
    Numbers(low=bound("1000.001", False)),
    Numbers(step=Decimal("0.01")),
    Numbers(step=Decimal("0.5"), low=bound("0")),
    Numbers(step=Decimal("0.25"), low=bound("-2"), high=bound("3.3")),
    Numbers(step=Decimal("0.3"), high=bound("10", False)),
    Numbers(step=Decimal("2.5"), low=bound("-7.5", False)),
    Numbers(integer=True, low=bound("137"), high=bound("4201")),
    Numbers(integer=True, low=bound("-50"), high=bound("-10")),
    Numbers(integer=True, high=bound("123")),
    Numbers(integer=True, low=bound("1.5"), high=bound("9.9")),
    Numbers(integer=True, step=Decimal(5), low=bound("0")),
    Numbers(integer=True, step=Decimal(7), low=bound("20")),
    Numbers(integer=True, step=Decimal(15), low=bound("-31"), high=bound("60", False)),
    Numbers(integer=True, step=Decimal(1000)),
    Numbers(step=Decimal(500), low=bound("-1250"), high=bound("100000")),
    Numbers(integer=True, step=Decimal("0.5"), low=bound("-3")),
]


@pytest.mark.parametrize("numbers", CASES, ids=repr)
def test_exactly_the_numbers_allowed(numbers: Numbers) -> None:
    text = grammar_text(numbers)
    assert llama_accepts(text)
    grammar = Grammar(text)
    for probe in sorted(probes(numbers, random.Random(repr(numbers)))):
        fraction = probe.partition(".")[2]
        expected = numbers.contains(Decimal(probe)) and len(fraction) <= MAX_FRACTION_DIGITS  # type: ignore[arg-type]
        assert grammar.matches(probe) == expected, probe


@pytest.mark.parametrize("numbers", CASES[:4] + CASES[-4:], ids=repr)
def test_only_canonical_numbers(numbers: Numbers) -> None:
    grammar = Grammar(grammar_text(numbers))
    for text in ("-0", "00", "01", "-01", "+1", "1.", ".5", "1.50", "0.0", "1e2", "", "-"):
        assert not grammar.matches(text), text
    for sample in {grammar.sample(random.Random(seed)) for seed in range(50)}:
        assert CANONICAL.fullmatch(sample) and numbers.contains(Decimal(sample)), sample  # type: ignore[arg-type]


def test_multiples_are_exact_decimals() -> None:
    tenth = Grammar(grammar_text(Numbers(step=Decimal("0.1"))))
    assert tenth.matches("0.3") and tenth.matches("-7.7") and not tenth.matches("0.35")
    assert Numbers(step=Decimal("0.1")).contains(0.3)  # 0.3 / 0.1 is 2.9999999999999996 in floating point


def test_numbers_no_value_meets_are_an_error() -> None:
    for numbers in (
        Numbers(integer=True, low=bound("5"), high=bound("4")),
        Numbers(integer=True, low=bound("3.5"), high=bound("3.9")),
        Numbers(low=bound("3"), high=bound("3", False)),
        Numbers(integer=True, step=Decimal(10), low=bound("1"), high=bound("9")),
    ):
        with pytest.raises(NoNumber):
            numbers.automaton()


def test_too_fine_a_step_is_too_complex() -> None:
    with pytest.raises(TooComplex, match="1234 remainders"):
        Numbers(step=Decimal("0.1234")).automaton()
    with pytest.raises(TooComplex, match="grammar rules"):
        Numbers(integer=True, step=Decimal(997), low=bound("-1000000000000"), high=bound("1000000000000")).automaton()


def test_the_tightest_bound_wins() -> None:
    numbers = Numbers.from_schema(
        {"minimum": 2, "exclusiveMinimum": 2, "maximum": 9.5, "exclusiveMaximum": 10}, integer=False
    )
    assert numbers.low == Bound(Decimal(2), False) and numbers.high == Bound(Decimal("9.5"), True)
