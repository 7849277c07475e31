"""One sequence's grammar: llama.cpp's grammar sampler, used as a filter on the tokens a sampler picks.

Applying a grammar to every candidate means matching each of the vocabulary's pieces (262k for Gemma)
against the grammar's parse stacks: about 30 ms per token for a JSON grammar on a small CPU, and over a
second in the free-text part of a tool_choice "auto" grammar, whose stacks are many. So, as llama-server
does, a sequence samples without the grammar first and asks it only about the token it picked (a few
microseconds); only when the grammar rejects that token is it sampled again from the candidates the
grammar allows. Those are looked for among the ``BLOCK`` most likely tokens first, and in the whole
vocabulary only if none of those is allowed. For greedy decoding that gives exactly the best allowed
token; a sampled token then comes from the ``BLOCK`` most likely allowed ones (a top-k of 4096).

A grammar can force that whole-vocabulary scan on every token (a schema whose next characters the model
finds unlikely), and every stream of the engine waits while it runs: each grammar has a budget of engine
seconds for such scans, past which its sequence ends with ``GrammarBudgetExhausted``.
"""

from __future__ import annotations

import ctypes
import math
import time
import weakref

import llama_cpp as lc
import numpy as np

from llmserve.engine.llama_model import Vocabulary

# llama_token_data, laid out for numpy: a whole vocabulary of candidates is filled without a Python loop.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
BLOCK = 4096  # the most likely tokens a rejected token's replacement is looked for among first


class GrammarError(Exception):
    """llama.cpp refused the grammar, or the grammar allows no token at all."""


class GrammarBudgetExhausted(GrammarError):
    """The grammar's whole-vocabulary scans took its budget of engine time: the request's fault, so its
    message is for the client."""


class Candidates:
    """A reusable llama_token_data_array over the vocabulary, or part of it, filled from one row of logits."""

    def __init__(self, n_vocab: int) -> None:
        self._data = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = lc.llama_token_data_array(
            data=self._data.ctypes.data_as(ctypes.POINTER(lc.llama_token_data)),
            size=n_vocab,
            selected=-1,
            sorted=False,
        )

    def fill(self, logits: np.ndarray, ids: np.ndarray | None = None) -> lc.llama_token_data_array:
        """The array holding ``logits`` (only those of ``ids``, if given), unsorted and with nothing
        selected, for ``llama_sampler_apply``."""
        size = len(self._data) if ids is None else len(ids)
        data = self._data[:size]
        data["id"] = self._ids if ids is None else ids  # samplers sort and truncate the array in place
        data["logit"] = logits if ids is None else logits[ids]
        data["p"] = 0.0
        self._array.size = size
        self._array.selected = -1
        self._array.sorted = False
        return self._array

    def selected(self) -> int:
        """The token a sampler chain selected from the array."""
        return int(self._array.data[self._array.selected].id)

    def logits(self) -> np.ndarray:
        """The filled logits after a grammar set those it rejects to -inf (in place, in the same order)."""
        return self._data["logit"][: self._array.size].copy()


class Grammar:
    """A GBNF grammar (rule ``root``) matched against one sequence's output. Compiled on any thread, then
    used by one thread at a time; ``close`` it when its sequence ends. ``scan_budget``: seconds its
    whole-vocabulary scans may take in all."""

    def __init__(self, vocab: Vocabulary, text: str, scan_budget: float = math.inf) -> None:
        pointer = lc.llama_sampler_init_grammar(vocab.pointer, text.encode(), b"root")
        if not pointer:
            raise GrammarError("llama.cpp refused the grammar")
        self.pointer = pointer
        # Freed by ``close``, or once dropped unused: a job refused or cancelled before it ran.
        self._free = weakref.finalize(self, lc.llama_sampler_free, pointer)
        self._one = (lc.llama_token_data * 1)()
        self._single = lc.llama_token_data_array(data=self._one, size=1, selected=-1, sorted=False)
        self._candidates: Candidates | None = None  # allocated on the first rejected token
        self.scan_budget = scan_budget
        self.scans = 0
        self.scan_seconds = 0.0

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next: the grammar applied to a one-candidate array."""
        self._one[0] = lc.llama_token_data(token, 1.0, 0.0)
        self._single.size, self._single.selected, self._single.sorted = 1, -1, False
        lc.llama_sampler_apply(self.pointer, ctypes.byref(self._single))
        return math.isfinite(self._one[0].logit)

    def restrict(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` keeping only allowed tokens: those among the ``BLOCK`` most likely if any
        of them is allowed, else all of them; the others are -inf."""
        if self._candidates is None:
            self._candidates = Candidates(len(logits))
        candidates = self._candidates
        size = min(BLOCK, len(logits))
        block: np.ndarray = np.argpartition(logits, -size)[-size:].astype(np.int32)
        lc.llama_sampler_apply(self.pointer, ctypes.byref(candidates.fill(logits, block)))
        kept = candidates.logits()
        if np.isfinite(kept).any():
            restricted = np.full_like(logits, -np.inf)
            restricted[block] = kept
            return restricted
        if self.scan_seconds >= self.scan_budget:
            raise GrammarBudgetExhausted(
                f"The output's grammar allowed none of the model's {BLOCK} likeliest next tokens {self.scans + 1} "
                f"times; matching it against the whole vocabulary took {self.scan_seconds:.2f} s of the engine, "
                f"past the model's grammar_scan_budget of {self.scan_budget:g} s. Loosen the schema or the "
                "prompt so that the model's likely output fits it."
            )
        started = time.perf_counter()
        lc.llama_sampler_apply(self.pointer, ctypes.byref(candidates.fill(logits)))
        self.scans += 1
        self.scan_seconds += time.perf_counter() - started
        restricted = candidates.logits()
        if not np.isfinite(restricted).any():
            raise GrammarError("the grammar allows no token")
        return restricted

    def accept(self, token: int) -> None:
        """Advance past ``token``, which must be allowed: llama.cpp aborts the process on any other."""
        lc.llama_sampler_accept(self.pointer, token)

    def close(self) -> None:
        self._free()  # at most once
        self.pointer = None
