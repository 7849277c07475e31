"""Splitting streamed model output into content and tool calls, shaped as OpenAI streams them.

Fed the text of each token as it arrives, the parser returns chat-completion deltas: ``{"content": ...}``
for text outside calls; for each call, as soon as its name is complete,
``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}``; then
``{"tool_calls": [{"index", "function": {"arguments": fragment}}]}`` as its arguments arrive. Text is held
back only while it may still be the start of a call marker, and whitespace just before a call, or after
the last one, is dropped.

``finish`` returns the message: the content (None when the reply is only calls) and the calls, their
``arguments`` the JSON text the model wrote; the deltas concatenate exactly to it. Call markup never
becomes content. A call cut short (max_tokens, a stop sequence) in its arguments is returned with the
arguments it got, as OpenAI returns one, and the finish_reason "length" tells the client they are
incomplete; one cut before its name was complete is dropped, since nothing announced it. A block that is
not a call at all (possible only without the grammar, which every parsed reply has) is content.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from llmserve.structured.tools import CALL_CLOSE, CALL_OPEN

_WHITESPACE = " \t\n\r"
_STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"')
_STRING_START = re.compile(r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*(?:\\(?:u[0-9a-fA-F]{0,3})?)?\Z')
_HEADER: tuple[str | re.Pattern[str], ...] = ("{", '"name"', ":", _STRING, ",", '"arguments"', ":")
_CLOSING: tuple[str | re.Pattern[str], ...] = ("}", CALL_CLOSE)
_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A tool call id as OpenAI writes them: ``call_`` and 24 letters or digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class _Scan(Enum):
    DONE = "done"
    MORE = "more"  # a prefix of a match: wait for more text
    NO = "no"


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in _WHITESPACE:
        position += 1
    return position


def _scan(text: str, pieces: Sequence[str | re.Pattern[str]]) -> tuple[_Scan, list[str], int]:
    """Match ``pieces`` (literals, or the JSON string pattern) with optional whitespace between them."""
    strings: list[str] = []
    position = 0
    for piece in pieces:
        position = _skip_space(text, position)
        if position == len(text):
            return _Scan.MORE, strings, position
        if isinstance(piece, str):
            got = text[position : position + len(piece)]
            if not piece.startswith(got):
                return _Scan.NO, strings, position
            if len(got) < len(piece):
                return _Scan.MORE, strings, position
            position += len(piece)
            continue
        match = piece.match(text, position)
        if match is None:
            return (_Scan.MORE if _STRING_START.match(text, position) else _Scan.NO), strings, position
        strings.append(match.group())
        position = match.end()
    return _Scan.DONE, strings, position


def _marker_start_length(text: str) -> int:
    """How many characters at the end of ``text`` could be the beginning of a call marker."""
    for length in range(min(len(text), len(CALL_OPEN) - 1), 0, -1):
        if text.endswith(CALL_OPEN[:length]):
            return length
    return 0


class _State(Enum):
    TEXT = "text"
    HEADER = "header"  # after the marker, until the name and '"arguments":'
    ARGUMENTS = "arguments"
    CLOSING = "closing"  # after the arguments, until the closing marker
    MALFORMED = "malformed"  # a block that is not a call: content up to its closing marker
    FINISHED = "finished"


@dataclass(frozen=True)
class ParsedReply:
    """The assistant message, and the deltas ``finish`` settled that a stream has still to send."""

    content: str | None
    tool_calls: list[dict[str, Any]]
    deltas: list[dict[str, Any]]


class ToolCallParser:
    """Incremental: ``feed`` each piece of generated text, then ``finish`` once."""

    def __init__(self, *, make_id: Callable[[], str] = new_call_id) -> None:
        self._make_id = make_id
        self._state = _State.TEXT
        self._pending = ""  # received, not yet settled
        self._block = ""  # the current call's text, from its marker on
        self._gap = ""  # the whitespace before the current call: content again if the call is not one
        self._content: list[str] = []
        self._calls: list[dict[str, Any]] = []
        self._announced = 0
        self._call: dict[str, Any] | None = None  # the announced call being parsed
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self._state is _State.FINISHED:
            raise RuntimeError("the parser has finished")
        self._pending += text
        deltas: list[dict[str, Any]] = []
        while self._step(deltas):
            pass
        return deltas

    def finish(self) -> ParsedReply:
        deltas: list[dict[str, Any]] = []
        if self._state in (_State.CLOSING, _State.ARGUMENTS):
            self._complete()  # whole but for its closing marker, or cut short in its arguments
        elif self._state is _State.TEXT:
            if self._pending.strip(_WHITESPACE) or not self._calls:
                self._say(deltas, self._pending)
        elif self._state is _State.MALFORMED:
            self._content.append(self._gap + self._block + self._pending)
            deltas.append({"content": self._content[-1]})
        self._state = _State.FINISHED
        self._pending = ""
        content = "".join(self._content) if self._content or not self._calls else None
        return ParsedReply(content, list(self._calls), deltas)

    def _say(self, deltas: list[dict[str, Any]], text: str) -> None:
        if text:
            self._content.append(text)
            deltas.append({"content": text})

    def _take(self, end: int) -> str:
        """Move ``end`` characters of pending text into the current block."""
        taken, self._pending = self._pending[:end], self._pending[end:]
        self._block += taken
        return taken

    def _step(self, deltas: list[dict[str, Any]]) -> bool:
        """Advance as far as the pending text allows; True when the state changed and there may be more."""
        if self._state is _State.TEXT:
            return self._text(deltas)
        if self._state is _State.HEADER:
            return self._header(deltas)
        if self._state is _State.ARGUMENTS:
            return self._arguments(deltas)
        if self._state is _State.CLOSING:
            return self._closing()
        return self._malformed(deltas)

    def _text(self, deltas: list[dict[str, Any]]) -> bool:
        start = self._pending.find(CALL_OPEN)
        if start < 0:
            settled = self._pending[: len(self._pending) - _marker_start_length(self._pending)]
            spoken = settled.rstrip(_WHITESPACE)
            self._say(deltas, spoken)
            self._pending = self._pending[len(spoken) :]
            return False
        spoken = self._pending[:start].rstrip(_WHITESPACE)
        self._say(deltas, spoken)
        self._gap, self._pending = self._pending[len(spoken) : start], self._pending[start:]
        self._block = ""
        self._take(len(CALL_OPEN))
        self._state = _State.HEADER
        return True

    def _header(self, deltas: list[dict[str, Any]]) -> bool:
        found, strings, end = _scan(self._pending, _HEADER)
        if found is _Scan.MORE:
            return False
        if found is _Scan.NO:
            self._state = _State.MALFORMED
            return True
        self._take(end)
        self._call = {"index": self._announced, "id": self._make_id(), "name": json.loads(strings[0])}
        self._announced += 1
        announced = {"index": self._call["index"], "id": self._call["id"], "type": "function"}
        deltas.append({"tool_calls": [{**announced, "function": {"name": self._call["name"], "arguments": ""}}]})
        self._call["arguments"] = ""
        self._depth, self._in_string, self._escaped = 0, False, False
        self._state = _State.ARGUMENTS
        return True

    def _value_end(self, text: str, start: int) -> int | None:
        """Where the arguments object ends (the index after its closing brace), tracking JSON nesting."""
        for position in range(start, len(text)):
            char = text[position]
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (char == "\\", char != '"')
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return position + 1
        return None

    def _arguments(self, deltas: list[dict[str, Any]]) -> bool:
        assert self._call is not None
        start = 0
        if not self._call["arguments"]:
            start = _skip_space(self._pending, 0)
            if start == len(self._pending):
                self._take(start)
                return False
            if self._pending[start] != "{":
                self._state = _State.MALFORMED
                return True
        end = self._value_end(self._pending, start)
        fragment = self._take(len(self._pending) if end is None else end)[start:]
        if fragment:
            self._call["arguments"] += fragment
            deltas.append({"tool_calls": [{"index": self._call["index"], "function": {"arguments": fragment}}]})
        if end is None:
            return False
        try:
            whole = isinstance(json.loads(self._call["arguments"]), dict)
        except json.JSONDecodeError:
            whole = False
        self._state = _State.CLOSING if whole else _State.MALFORMED
        return True

    def _closing(self) -> bool:
        found, _, end = _scan(self._pending, _CLOSING)
        if found is _Scan.MORE:
            return False
        if found is _Scan.NO:
            self._state = _State.MALFORMED
            return True
        self._take(end)
        self._complete()
        return True

    def _complete(self) -> None:
        assert self._call is not None
        function = {"name": self._call["name"], "arguments": self._call["arguments"]}
        self._calls.append({"id": self._call["id"], "type": "function", "function": function})
        self._call = None
        self._state = _State.TEXT

    def _malformed(self, deltas: list[dict[str, Any]]) -> bool:
        end = self._pending.find(CALL_CLOSE)
        if end < 0:
            return False
        self._take(end + len(CALL_CLOSE))
        self._say(deltas, self._gap + self._block)
        self._call = None
        self._state = _State.TEXT
        return True
