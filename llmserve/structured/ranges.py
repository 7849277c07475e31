"""GBNF for the JSON integers within bounds: how a strict schema's ``minimum`` and ``maximum`` are enforced.

The integers of one digit count between two bounds split, digit by digit, into a few sequences of digit
classes (as a regular expression for a numeric range is built): 137..4201 becomes 13[7-9], 1[4-9][0-9],
[2-9][0-9]{2}, [1-3][0-9]{3}, 4[01][0-9]{2}, 420[01]. Longer or shorter integers are whole digit counts,
and negative ones are a minus sign before the range of their magnitudes. JSON's integers have no leading
zeros and no "-0", and neither does this grammar.
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
