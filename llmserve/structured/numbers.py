"""The JSON numbers a schema's ``minimum``, ``maximum`` (and their exclusive forms) and ``multipleOf``
allow, as a finite automaton over the number's characters: how strict schemas' numeric keywords are
enforced by the grammar, each automaton state one GBNF rule.

A number is read as the grammar writes it: an optional minus, an integer part without leading zeros and
an optional fraction, each of at most 16 digits (llama.cpp's limits), the fraction's last digit not 0; no exponent,
which JSON never requires, and no "-0". While it is read, its magnitude is compared with the bounds the
way decimal strings compare: integer parts by length and then digit by digit, fractions digit by digit.
A ``multipleOf`` of d = P / 10^s is the remainder modulo P of the digits read, the fraction padded to s
digits, in exact decimal arithmetic (0.3 is a multiple of 0.1, as it is on paper and not in floating
point). States from which no number can end are dropped, so bounds that no number meets leave nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

MAX_INTEGER_DIGITS = 16  # as llama.cpp's own JSON number rules: a model cannot run on with digits
MAX_FRACTION_DIGITS = 16
MAX_DIVISOR = 1000  # P of a multipleOf: every remainder is a state
MAX_STATES = 2000  # states explored before the numbers count as too complex (a grammar of some 300 KB)
END = -1  # an edge's target when the number may end after it and nothing can follow


class NoNumber(ValueError):
    """No number meets the bounds (and multipleOf)."""


class TooComplex(ValueError):
    """The numbers are well defined but the grammar would need too many rules; the message says why."""


@dataclass(frozen=True)
class Bound:
    value: Decimal
    inclusive: bool


@dataclass(frozen=True)
class Numbers:
    """The numbers (or integers) between two optional bounds, optionally the multiples of ``step``."""

    low: Bound | None = None
    high: Bound | None = None
    step: Decimal | None = None
    integer: bool = False

    @classmethod
    def from_schema(cls, schema: Mapping[str, Any], *, integer: bool) -> Numbers:
        """The numbers a (valid) schema's numeric keywords allow; at equal values an exclusive bound wins."""
        lows = [Bound(_decimal(schema[k]), k == "minimum") for k in ("minimum", "exclusiveMinimum") if k in schema]
        highs = [Bound(_decimal(schema[k]), k == "maximum") for k in ("maximum", "exclusiveMaximum") if k in schema]
        return cls(
            low=max(lows, key=lambda b: (b.value, not b.inclusive), default=None),
            high=min(highs, key=lambda b: (b.value, b.inclusive), default=None),
            step=_decimal(schema["multipleOf"]) if "multipleOf" in schema else None,
            integer=integer,
        )

    def contains(self, value: float) -> bool:
        """Whether ``value`` is one of these numbers, in exact decimal arithmetic."""
        exact, low, high = Fraction(_decimal(value)), self.low, self.high
        return (
            (low is None or exact > Fraction(low.value) or (exact == Fraction(low.value) and low.inclusive))
            and (high is None or exact < Fraction(high.value) or (exact == Fraction(high.value) and high.inclusive))
            and (self.step is None or exact % Fraction(self.step) == 0)
            and (not self.integer or exact.denominator == 1)
        )

    def automaton(self) -> Automaton:
        """The automaton reading exactly these numbers (NoNumber if there are none, TooComplex if too big)."""
        step = self.step or Decimal(1)
        if step == step.to_integral_value() and (zeros := _trailing_zeros(int(step))):
            # Multiples of m * 10^k: multiples of m between the bounds / 10^k, then k zeros.
            scaled = Numbers(_scaled(self.low, -zeros), _scaled(self.high, -zeros), step.scaleb(-zeros), integer=True)
            return scaled._automaton(zeros)
        return self._automaton(0)

    def _automaton(self, zeros: int) -> Automaton:
        step = self.step or Decimal(1)
        scale = max(0, -int(step.normalize().as_tuple().exponent))
        divisor = int(step.scaleb(scale))
        if divisor > MAX_DIVISOR:
            raise TooComplex(
                f"'multipleOf' {self.step} needs {divisor} remainders; the grammar supports at most {MAX_DIVISOR}"
            )
        fractions = 0 if self.integer else min(scale, MAX_FRACTION_DIGITS) if self.step else MAX_FRACTION_DIGITS
        # Without a step, integer digits are bounded as llama.cpp bounds them; with one, bounding them too
        # would multiply the remainders' states by the digit count.
        whole = MAX_INTEGER_DIGITS - zeros if divisor == 1 else None
        digits = _Digits(divisor, scale, whole, fractions, zeros)
        sides: list[_Magnitudes] = []
        low, high = self.low, self.high
        if high is None or high.value > 0 or (high.value == 0 and high.inclusive):
            lowest = low if low is not None and low.value >= 0 else Bound(Decimal(0), True)
            sides.append(_Magnitudes("", lowest, high, digits))
        if low is None or low.value < 0:
            zero = Bound(Decimal(0), False)
            smallest = Bound(-high.value, high.inclusive) if high is not None and high.value < 0 else zero
            largest = None if low is None else Bound(-low.value, low.inclusive)
            sides.append(_Magnitudes("-", smallest, largest, digits))
        return Automaton.explore(sides)


def _trailing_zeros(number: int) -> int:
    text = str(number)
    return len(text) - len(text.rstrip("0"))


def _scaled(bound: Bound | None, exponent: int) -> Bound | None:
    return None if bound is None else Bound(bound.value.scaleb(exponent), bound.inclusive)


@dataclass(frozen=True)
class _Digits:
    """How the digits of one number are read: remainders modulo ``divisor`` of the number times
    10^``scale``, at most ``whole`` integer digits (None: any number) and ``fraction`` fraction digits,
    and ``zeros`` zeros written after every integer but 0."""

    divisor: int
    scale: int
    whole: int | None
    fraction: int
    zeros: int


def _decimal(value: Any) -> Decimal:
    """A schema's number exactly as written (a float by its shortest representation: 0.1 is 0.1)."""
    number = Decimal(str(value))
    if not number.is_finite():
        raise TooComplex(f"the bound {value} is not a finite number")
    return number


@dataclass(frozen=True)
class _Decimal:
    """A non-negative bound as decimal digits: the integer part and the fraction without trailing zeros."""

    whole: str
    fraction: str
    inclusive: bool

    @classmethod
    def of(cls, bound: Bound | None) -> _Decimal | None:
        if bound is None:
            return None
        text = f"{bound.value:f}"
        whole, _, fraction = text.partition(".")
        return cls(whole, fraction.rstrip("0"), bound.inclusive)

    def compare_whole(self, length: int, prefix_order: int) -> int:
        """How an integer part of ``length`` digits, whose prefix compared ``prefix_order`` with this
        bound's, compares with this bound's integer part."""
        return (length > len(self.whole)) - (length < len(self.whole)) or prefix_order


def _order(a: int, b: int) -> int:
    return (a > b) - (a < b)


# Integer part: (side, digits read (clipped), order of the prefix against each bound's, remainder, "0" read).
# Fraction: (side, digits read, still equal to the low bound's digits, ... the high bound's, remainder,
# last digit not 0). The start state is (); ENDED follows the zeros written after an integer.
_State = tuple[Any, ...]
ENDED: _State = ("ended",)


class _Magnitudes:
    """One side of zero: the magnitudes between ``low`` and ``high``, written after ``sign``."""

    def __init__(self, sign: str, low: Bound, high: Bound | None, digits: _Digits) -> None:
        self.sign = sign
        self.low = _Decimal.of(low)
        self.high = _Decimal.of(high)
        self.digits = digits
        # Digits read are counted up to one more than the bounds' integer parts, or up to the limit.
        self.longest = digits.whole or 1 + max(len(b.whole) for b in (self.low, self.high) if b is not None)

    def start(self) -> _State:
        return (self.sign, "whole", 0, 0, 0, 0, False)

    def edges(self, state: _State) -> Iterator[tuple[str, _State]]:
        if state[1] == "whole":
            yield from self._whole_edges(state)
        else:
            yield from self._fraction_edges(state)

    def accepts(self, state: _State) -> bool:
        if state[1] == "whole":
            return self._whole_meets(state) and (state[6] or not self.digits.zeros)
        _, _, length, at_low, at_high, remainder, last_not_zero = state
        low, high = self.low, self.high
        return (
            last_not_zero
            and (not at_low or (low is not None and length >= len(low.fraction) and low.inclusive))
            and (not at_high or (high is not None and (length < len(high.fraction) or high.inclusive)))
            and remainder * 10 ** max(self.digits.scale - length, 0) % self.digits.divisor == 0
        )

    def _whole_meets(self, state: _State) -> bool:
        """Whether the integer read so far is one of the numbers (before any zeros written after it)."""
        _, _, length, low_order, high_order, remainder, _ = state
        return (
            length > 0
            and self._low_met(self.low, length, low_order)
            and self._high_met(self.high, length, high_order)
            and remainder * 10**self.digits.scale % self.digits.divisor == 0
        )

    @staticmethod
    def _low_met(low: _Decimal | None, length: int, order: int) -> bool:
        if low is None:
            return True
        whole = low.compare_whole(length, order)
        return whole > 0 or (whole == 0 and not low.fraction and low.inclusive)

    @staticmethod
    def _high_met(high: _Decimal | None, length: int, order: int) -> bool:
        if high is None:
            return True
        whole = high.compare_whole(length, order)
        return whole < 0 or (whole == 0 and (bool(high.fraction) or high.inclusive))

    def _whole_edges(self, state: _State) -> Iterator[tuple[str, _State]]:
        sign, _, length, low_order, high_order, remainder, zero = state
        if self.digits.zeros and not zero and self._whole_meets(state):
            yield "0" * self.digits.zeros, ENDED
        if not zero and (self.digits.whole is None or length < self.digits.whole):
            for digit in range(10):
                yield (
                    str(digit),
                    (
                        sign,
                        "whole",
                        min(length + 1, self.longest),
                        self._step_order(self.low, length, low_order, digit),
                        self._step_order(self.high, length, high_order, digit),
                        (10 * remainder + digit) % self.digits.divisor,
                        length == 0 and digit == 0,
                    ),
                )
        if length == 0 or self.digits.fraction == 0:
            return
        low_whole = self.low.compare_whole(length, low_order) if self.low else 1
        high_whole = self.high.compare_whole(length, high_order) if self.high else -1
        if low_whole >= 0 and high_whole <= 0:
            yield ".", (sign, "fraction", 0, low_whole == 0, high_whole == 0, remainder, False)

    @staticmethod
    def _step_order(bound: _Decimal | None, length: int, order: int, digit: int) -> int:
        """The order of a prefix against a bound's integer part, one more digit read."""
        if bound is None or order != 0 or length >= len(bound.whole):
            return order
        return _order(digit, int(bound.whole[length]))

    def _fraction_edges(self, state: _State) -> Iterator[tuple[str, _State]]:
        sign, _, length, at_low, at_high, remainder, _ = state
        if length == self.digits.fraction:
            return
        low_digit = self._fraction_digit(self.low, length)
        high_digit = self._fraction_digit(self.high, length)
        for digit in range(10):
            if (at_low and digit < low_digit) or (at_high and digit > high_digit):
                continue
            yield (
                str(digit),
                (
                    sign,
                    "fraction",
                    length + 1,
                    at_low and digit == low_digit,
                    at_high and digit == high_digit,
                    (10 * remainder + digit) % self.digits.divisor,
                    digit != 0,
                ),
            )

    @staticmethod
    def _fraction_digit(bound: _Decimal | None, position: int) -> int:
        if bound is None or position >= len(bound.fraction):
            return 0
        return int(bound.fraction[position])


@dataclass
class Automaton:
    """States 0.. (0 the start), each with its edges (a GBNF item and a target state, or END) and
    whether a number may end there."""

    edges: list[list[tuple[str, int]]]
    accepting: list[bool]

    @classmethod
    def explore(cls, sides: Sequence[_Magnitudes]) -> Automaton:
        """Every state reachable from the start, less those from which no number can end."""
        by_sign = {side.sign: side for side in sides}
        start: _State = ()
        index: dict[_State, int] = {start: 0}
        raw: list[list[tuple[str, _State]]] = []
        accepting: list[bool] = []
        states = [start]
        while len(raw) < len(states):
            state = states[len(raw)]
            if state == ():
                edges = list(by_sign[""].edges(by_sign[""].start())) if "" in by_sign else []
                edges += [("-", by_sign["-"].start())] if "-" in by_sign else []
                accepting.append(False)
            elif state == ENDED:
                edges = []
                accepting.append(True)
            else:
                side = by_sign[state[0]]
                edges = list(side.edges(state))
                accepting.append(side.accepts(state))
            raw.append(edges)
            for _, target in edges:
                if target not in index:
                    index[target] = len(states)
                    states.append(target)
            if len(states) > MAX_STATES:
                raise TooComplex(f"these bounds and 'multipleOf' need more than {MAX_STATES} grammar rules")
        graph = [[(symbol, index[target]) for symbol, target in edges] for edges in raw]
        return cls._pruned(graph, accepting)

    @classmethod
    def _pruned(cls, graph: list[list[tuple[str, int]]], accepting: list[bool]) -> Automaton:
        alive = {i for i, ok in enumerate(accepting) if ok}
        grew = True
        while grew:
            grew = False
            for i, edges in enumerate(graph):
                if i not in alive and any(target in alive for _, target in edges):
                    alive.add(i)
                    grew = True
        if 0 not in alive:
            raise NoNumber(f"no number of at most {MAX_INTEGER_DIGITS} integer digits is within these bounds")
        terminal = {i for i in alive if accepting[i] and not any(t in alive for _, t in graph[i])}
        kept = [i for i in range(len(graph)) if i in alive and i not in terminal]
        renumber = {old: new for new, old in enumerate(kept)} | dict.fromkeys(terminal, END)
        kept_edges = [[(symbol, renumber[t]) for symbol, t in graph[i] if t in alive] for i in kept]
        return cls(kept_edges, [accepting[i] for i in kept])

    def __len__(self) -> int:
        return len(self.edges)

    def bodies(self, names: Sequence[str]) -> list[str]:
        """The GBNF rule body of each state, ``names[i]`` being state i's rule; digits that lead to the
        same state share a character class."""
        bodies = []
        for edges, accepting in zip(self.edges, self.accepting, strict=True):
            by_target: dict[tuple[int, bool], list[str]] = {}
            for symbol, target in edges:
                by_target.setdefault((target, symbol.isdigit() and len(symbol) == 1), []).append(symbol)
            alternatives = [
                f"{_item(symbols)} {names[target]}" if target != END else _item(symbols)
                for (target, _), symbols in by_target.items()
            ]
            body = " | ".join(f"( {alternative} )" for alternative in alternatives)
            bodies.append(f"( {body} )?" if accepting else body)
        return bodies


def _item(symbols: list[str]) -> str:
    """A GBNF literal for one symbol, a character class for several digits."""
    if len(symbols) == 1:
        return f'"{symbols[0]}"'
    digits = sorted(int(s) for s in symbols)
    runs: list[list[int]] = []
    for digit in digits:
        if runs and digit == runs[-1][-1] + 1:
            runs[-1].append(digit)
        else:
            runs.append([digit])
    return "[" + "".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else "".join(map(str, r)) for r in runs) + "]"
