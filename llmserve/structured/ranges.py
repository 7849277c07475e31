"""GBNF for the JSON integers and numbers within bounds, and for an integer's multiples: how a strict
schema's ``minimum`` and ``maximum`` (and their exclusive forms) and ``multipleOf`` are enforced.

The integers of one digit count between two bounds split, digit by digit, into a few sequences of digit
classes (as a regular expression for a numeric range is built): 137..4201 becomes 13[7-9], 1[4-9][0-9],
[2-9][0-9]{2}, [1-3][0-9]{3}, 4[01][0-9]{2}, 420[01]. Longer or shorter integers are whole digit counts,
and negative ones are a minus sign before the range of their magnitudes. JSON's integers have no leading
zeros and no "-0", and neither does this grammar.

A number between integer bounds is an integer of its integer range, or a fraction: a number k.d..d (or
-k.d..d) with a last decimal digit other than 0, strictly between two consecutive integers, so it is
within the bounds exactly when that whole unit interval is. Bounds that are not integers (``0.5``) would
need the fraction's digits compared too; they are not enforced here. Bounded numbers are written without
an exponent, which JSON never requires.
"""

from __future__ import annotations

import math


def integer_bounds(
    minimum: float | None, maximum: float | None, exclusive_minimum: float | None, exclusive_maximum: float | None
) -> tuple[int | None, int | None]:
    """The least and greatest integer a schema's bounds allow (None: unbounded on that side)."""
    lows = [math.ceil(minimum)] if minimum is not None else []
    if exclusive_minimum is not None:
        lows.append(math.floor(exclusive_minimum) + 1)
    highs = [math.floor(maximum)] if maximum is not None else []
    if exclusive_maximum is not None:
        highs.append(math.ceil(exclusive_maximum) - 1)
    return (max(lows) if lows else None), (min(highs) if highs else None)


FRACTION = '"." [0-9]{0,15} [1-9]'  # a decimal part that is not zero, of at most 16 digits as llama.cpp's


def number_range(
    minimum: float | None, maximum: float | None, exclusive_minimum: float | None, exclusive_maximum: float | None
) -> str:
    """A GBNF rule body for the JSON numbers within bounds that are all integers (ValueError otherwise)."""
    bounds = (minimum, maximum, exclusive_minimum, exclusive_maximum)
    if any(bound is not None and not float(bound).is_integer() for bound in bounds):
        raise ValueError("only integer bounds can be enforced on a number")
    low, high = integer_bounds(*bounds)
    # The unit intervals (k, k+1) within the bounds: k from ``first`` to ``last``.
    lows = [int(b) for b in (minimum, exclusive_minimum) if b is not None]
    highs = [int(b) - 1 for b in (maximum, exclusive_maximum) if b is not None]
    first, last = (max(lows) if lows else None), (min(highs) if highs else None)
    alternatives = [integer_range(low, high)] if low is None or high is None or low <= high else []
    if last is None or last >= max(first or 0, 0):  # k >= 0: k.ddd
        alternatives.append(f"( {integer_range(max(first or 0, 0), last)} ) {FRACTION}")
    if first is None or first < 0:  # k < 0: -(m.ddd) with m = -k - 1
        smallest, largest = max(-(last if last is not None else -1) - 1, 0), (None if first is None else -first - 1)
        if largest is None or smallest <= largest:
            alternatives.append(f'"-" ( {integer_range(smallest, largest)} ) {FRACTION}')
    if not alternatives:
        raise ValueError("no number is within these bounds")
    return " | ".join(f"( {alternative} )" for alternative in alternatives)


def multiples(divisor: int, names: list[str]) -> tuple[str, list[str]]:
    """GBNF for the JSON integers divisible by ``divisor``, as the automaton that reads a number's digits
    keeping the remainder so far: the top rule's body, and the body of rule ``names[r]`` for each
    remainder ``r`` (reached after the digits read leave ``r``; the number may end only at 0)."""

    def step(remainder: int, digits: range) -> str:
        targets: dict[int, list[int]] = {}
        for digit in digits:
            targets.setdefault((10 * remainder + digit) % divisor, []).append(digit)
        classes = (f"[{''.join(map(str, ds))}] {names[target]}" for target, ds in sorted(targets.items()))
        return " | ".join(f"( {alternative} )" for alternative in classes)

    bodies = [f"( {step(r, range(10))} )" + ("?" if r == 0 else "") for r in range(divisor)]
    return f'"0" | "-"? ( {step(0, range(1, 10))} )', bodies


def integer_range(low: int | None, high: int | None) -> str:
    """A GBNF rule body for exactly the JSON integers from ``low`` to ``high`` (both included)."""
    if low is not None and high is not None and low > high:
        raise ValueError(f"no integer is at least {low} and at most {high}")
    alternatives = []
    if low is None or low < 0:  # the negative part, as magnitudes
        smallest = 1 if high is None or high >= 0 else -high
        alternatives += [f'"-" {part}' for part in _magnitudes(smallest, None if low is None else -low)]
    if high is None or high >= 0:
        alternatives += _magnitudes(max(low or 0, 0), high)
    return " | ".join(f"( {alternative} )" for alternative in alternatives)


def _magnitudes(low: int, high: int | None) -> list[str]:
    """Sequences for the non-negative integers from ``low`` to ``high`` (None: no upper bound)."""
    parts = []
    digits = len(str(low))
    while high is None or digits <= len(str(high)):
        start = max(low, 10 ** (digits - 1) if digits > 1 else 0)
        if high is None and start == 10 ** (digits - 1) and digits > 1:
            parts.append(f"[1-9] [0-9]{{{digits - 1},}}")  # every integer of this many digits or more
            break
        end = 10**digits - 1 if high is None else min(high, 10**digits - 1)
        if start <= end:
            parts += [" ".join(sequence) for sequence in _same_length(str(start), str(end))]
        digits += 1
    return parts


def _same_length(low: str, high: str) -> list[list[str]]:
    """Digit-class sequences for the integers from ``low`` to ``high``, written with as many digits."""
    if low == high:
        return [[f'"{low}"']]
    if len(low) == 1:
        return [[f"[{low}-{high}]"]]
    rest = len(low) - 1
    if low[0] == high[0]:
        return [[f'"{low[0]}"', *tail] for tail in _same_length(low[1:], high[1:])]
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return [[f"[{low[0]}-{high[0]}]", *_any_digits(rest)]]
    sequences = [[f'"{low[0]}"', *tail] for tail in _same_length(low[1:], "9" * rest)]
    if int(high[0]) - int(low[0]) > 1:
        sequences.append([f"[{int(low[0]) + 1}-{int(high[0]) - 1}]", *_any_digits(rest)])
    sequences += [[f'"{high[0]}"', *tail] for tail in _same_length("0" * rest, high[1:])]
    return sequences


def _any_digits(count: int) -> list[str]:
    return [f"[0-9]{{{count}}}"]
