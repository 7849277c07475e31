"""JSON Schema ``pattern`` regular expressions, rewritten for llama-cpp-python's schema converter.

The converter copies a pattern into the grammar between the quotes of a JSON string, character for
character. Left as they are, patterns break in three ways: a pattern that can match a double quote, a
backslash or a control character lets the model write invalid JSON (JSON escapes those); escapes such as
``\\d`` or ``\\.`` come out as grammar llama.cpp refuses; and a top-level ``a|b`` loses its quotes to
operator precedence. So a pattern is accepted in a subset whose meaning is kept, rewritten so that every
character the converter sees is either a plain letter, digit or space, or a character class with
hexadecimal escapes. ``.`` and negated classes never produce the characters JSON would have to escape:
the grammar then allows a subset of what the pattern allows, never more.
"""

from __future__ import annotations

import re

# Repetitions above this make llama.cpp refuse the grammar (its parser's limit on nested repetitions).
MAX_REPEAT = 1000

# Class members that keep out what JSON escapes inside strings: double quote, backslash, control characters.
_EXCLUDED = "\\x22\\x5C\\x00-\\x1F"
# ECMA-262's dot matches neither line terminators nor, here, what JSON escapes.
_DOT = f"[^{_EXCLUDED}\\u2028\\u2029]"
_CLASS_SHORTHANDS = {"d": [(0x30, 0x39)], "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]}
_CONTROL_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
_QUANTIFIER = re.compile(r"\{([0-9]+)(?:(,)([0-9]*))?\}")
_HEX = {"x": 2, "u": 4}


def _hex(code: int) -> str:
    return f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}"


def _is_safe(code: int) -> bool:
    return code >= 0x20 and code not in (0x22, 0x5C)


def _escape(body: str, i: int, *, in_class: bool) -> tuple[list[tuple[int, int]], int]:
    """The code point ranges an escape at ``body[i]`` (a backslash) stands for, and the index after it."""
    if i + 1 >= len(body):
        raise ValueError("ends with a lone backslash")
    kind = body[i + 1]
    if kind in _CLASS_SHORTHANDS:
        return _CLASS_SHORTHANDS[kind], i + 2
    if kind in _HEX:
        digits = body[i + 2 : i + 2 + _HEX[kind]]
        if len(digits) != _HEX[kind] or not all(c in "0123456789abcdefABCDEF" for c in digits):
            raise ValueError(f"has a malformed '\\{kind}' escape")
        code = int(digits, 16)
        return [(code, code)], i + 2 + len(digits)
    if kind in _CONTROL_ESCAPES or (in_class and kind == "b"):
        code = _CONTROL_ESCAPES.get(kind, 0x08)
        return [(code, code)], i + 2
    if kind.isalnum():
        raise ValueError(f"uses '\\{kind}', which is not supported")
    return [(ord(kind), ord(kind))], i + 2


def _class(body: str, i: int) -> tuple[str, int]:
    """Rewrite the character class at ``body[i]`` (an opening bracket); return it and the index after it."""
    i += 1
    negated = i < len(body) and body[i] == "^"
    i += negated
    ranges: list[tuple[int, int]] = []
    while i < len(body) and body[i] != "]":
        if body[i] == "\\":
            if body[i + 1 : i + 2] in ("D", "W", "s", "S"):
                raise ValueError(f"uses '\\{body[i + 1]}' inside a class, which is not supported")
            members, i = _escape(body, i, in_class=True)
        else:
            members, i = [(ord(body[i]), ord(body[i]))], i + 1
        if len(members) == 1 and body[i : i + 1] == "-" and body[i + 1 : i + 2] not in ("", "]"):
            if body[i + 1] == "\\":
                end, i = _escape(body, i + 1, in_class=True)
            else:
                end, i = [(ord(body[i + 1]), ord(body[i + 1]))], i + 2
            if len(end) != 1:
                raise ValueError("has a range that ends in a class shorthand")
            members = [(members[0][0], end[0][1])]
        ranges += members
    if i >= len(body) or not ranges:
        raise ValueError("has an empty or unterminated character class")
    if not negated and not all(
        _is_safe(lo) and _is_safe(hi) and not lo < 0x22 < hi and not lo < 0x5C < hi for lo, hi in ranges
    ):
        raise ValueError("can match a double quote, a backslash or a control character, which JSON must escape")
    members_text = "".join(_hex(lo) if lo == hi else f"{_hex(lo)}-{_hex(hi)}" for lo, hi in ranges)
    return (f"[^{members_text}{_EXCLUDED}]" if negated else f"[{members_text}]"), i + 1


def _negated_shorthand(kind: str) -> str:
    # ASCII only: ECMA-262 reads \W and \D in ASCII, Python (and so many validators) in Unicode.
    members = "".join(f"{_hex(lo)}-{_hex(hi)}" for lo, hi in _CLASS_SHORTHANDS[kind.lower()])
    return f"[^{members}{_EXCLUDED}\\x80-\\U0010FFFF]"


def _literal(ranges: list[tuple[int, int]]) -> str:
    (lo, hi), *rest = ranges
    if rest or lo != hi:
        return "[" + "".join(f"{_hex(a)}-{_hex(b)}" for a, b in ranges) + "]"
    if not _is_safe(lo):
        raise ValueError("can match a double quote, a backslash or a control character, which JSON must escape")
    char = chr(lo)
    return char if char.isalnum() or char == " " else f"[{_hex(lo)}]"


def _quantifier(body: str, i: int) -> tuple[str, int]:
    match = _QUANTIFIER.match(body, i)
    if not match:
        raise ValueError("has a '{' that does not start a quantifier such as {2,5}; write '\\{' to match it")
    low, comma, high = match.groups()
    if int(low) > MAX_REPEAT or (comma and high and int(high) > MAX_REPEAT):
        raise ValueError(f"repeats more than {MAX_REPEAT} times")
    return match.group(), match.end()


def convert_pattern(pattern: str) -> str:
    """The converter-ready form of an anchored ``pattern``; ValueError saying what is not supported."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}") from None
    body = pattern[1:-1]
    escaped_end = (len(body) - len(body.rstrip("\\"))) % 2
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$" or escaped_end:
        raise ValueError(
            "must be anchored at both ends ('^...$'): an unanchored pattern matches anywhere in the string"
        )
    pieces: list[str] = []
    i = 0
    while i < len(body):
        char = body[i]
        quantifier = False
        if char == "\\" and body[i + 1 : i + 2] in ("D", "W"):
            piece, i = _negated_shorthand(body[i + 1]), i + 2
        elif char == "\\" and body[i + 1 : i + 2] in ("s", "S", "b", "B"):
            raise ValueError(f"uses '\\{body[i + 1]}', which is not supported")
        elif char == "\\":
            ranges, i = _escape(body, i, in_class=False)
            piece = _literal(ranges)
        elif char == "[":
            piece, i = _class(body, i)
        elif char == ".":
            piece, i = _DOT, i + 1
        elif char == "(" and body.startswith("(?:", i):
            piece, i = "(", i + 3
        elif char == "(" and body.startswith("(?", i):
            raise ValueError("uses a lookaround or named group, which is not supported")
        elif char in "()|":
            piece, i = char, i + 1
        elif char in "*+?{":
            piece, i = _quantifier(body, i) if char == "{" else (char, i + 1)
            quantifier = True
        elif char in "^$":
            raise ValueError("uses '^' or '$' inside; anchors are supported only at the two ends")
        else:
            piece, i = _literal([(ord(char), ord(char))]), i + 1
        if quantifier and body[i : i + 1] == "?":
            i += 1  # a lazy quantifier matches the same strings
        pieces.append(piece)
    return "^(" + "".join(pieces) + ")$"
