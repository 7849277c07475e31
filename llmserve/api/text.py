"""From sampled tokens to the text a client may see.

Two things make this more than joining token pieces: a multi-byte UTF-8 character can be split across
tokens (never send half of it), and a stop sequence can span several tokens (never send any part of
it). Text that could still turn out to be the start of a stop sequence is held back until it cannot.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field

from llmserve.engine.jobs import TokenLogprob


@dataclass
class Delta:
    """Text released by one call, with the logprobs of the tokens that produced it."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


class TextAssembler:
    def __init__(self, piece: Callable[[int], bytes], stop: tuple[str, ...]) -> None:
        self._piece = piece
        self._stop = stop
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""  # everything decoded so far
        self._released = 0  # how much of _text the client has been given
        self._pending: list[tuple[int, TokenLogprob]] = []  # (start offset in _text, logprob)
        self.tokens = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """All text released so far."""
        return self._text[: self._released]

    def add(self, token: int, logprob: TokenLogprob | None = None) -> Delta:
        """Take one generated token; return what can be released now."""
        if self.stopped:
            return Delta()
        self.tokens += 1
        start = len(self._text)
        self._text += self._decoder.decode(self._piece(token))
        if logprob is not None:
            self._pending.append((start, logprob))
        end = self._safe_end()
        return self._release(end)

    def finish(self) -> Delta:
        """The generation ended: release whatever was held back."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._release(len(self._text))

    def _safe_end(self) -> int:
        """How far text may be released: up to a stop sequence, or short of a possible one's start."""
        if not self._stop:
            return len(self._text)
        search_from = max(0, self._released - max(len(s) for s in self._stop))
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._text = self._text[: min(hits)]
            return len(self._text)
        held = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._text)), held, -1):
                if self._text.endswith(stop[:size]):
                    held = size
                    break
        return len(self._text) - held

    def _release(self, end: int) -> Delta:
        end = max(end, self._released)
        delta = Delta(self._text[self._released : end])
        self._released = end
        while self._pending and self._pending[0][0] < end:
            delta.logprobs.append(self._pending.pop(0)[1])
        if self.stopped:
            self._pending.clear()
        return delta
