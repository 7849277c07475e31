"""Per-sequence sampling and log-probabilities.

Each running sequence samples with its own request's parameters, in numpy on the engine thread: logit
bias and penalties adjust the few tokens they name in a copy of the row, and the draw itself touches only
the tokens that can matter (see distribution.py), instead of a llama.cpp sampler chain that copies the
whole vocabulary (262k entries for Gemma) into a candidate array, softmaxes and sums all of it for every
sequence and every token. Greedy decoding (temperature 0, no penalties) needs no sampler at all: one
argmax per output row (``greedy_token``).

A sequence with a grammar (structured outputs, tool calls) samples as it would without one, then asks its
grammar about that token, and filters every candidate only when the grammar rejects it (see grammar.py).
"""

from __future__ import annotations

import random
from collections import Counter, deque

import numpy as np

from llmserve.engine.distribution import Scratch, draw, most_likely, total_weight
from llmserve.engine.grammar import Grammar, GrammarError
from llmserve.engine.jobs import SamplingParams, TokenLogprob

FLOAT32_MAX = np.finfo(np.float32).max


class Penalties:
    """llama.cpp's repetition, frequency and presence penalties over the last ``window`` generated tokens,
    kept incrementally: each token generated updates one count."""

    def __init__(self, params: SamplingParams) -> None:
        self._repeat = params.repeat_penalty
        self._frequency = params.frequency_penalty
        self._presence = params.presence_penalty
        self._recent: deque[int] = deque(maxlen=params.penalty_last_n)
        self._counts: Counter[int] = Counter()

    def accept(self, token: int) -> None:
        if self._recent.maxlen == 0:
            return
        if len(self._recent) == self._recent.maxlen:
            oldest = self._recent[0]
            self._counts[oldest] -= 1
            if not self._counts[oldest]:
                del self._counts[oldest]
        self._recent.append(token)
        self._counts[token] += 1

    @property
    def active(self) -> bool:
        """Whether any token is penalised now."""
        return bool(self._counts)

    def apply(self, row: np.ndarray) -> None:
        """Penalise, in place, every token seen in the window: a positive logit is divided by the repeat
        penalty and a negative one multiplied, then count x frequency + presence is subtracted."""
        tokens = np.fromiter(self._counts.keys(), dtype=np.int64, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
        values = row[tokens]
        with np.errstate(over="ignore", divide="ignore"):  # a tiny repeat penalty: the limit, not inf
            values = np.where(values <= 0, values * self._repeat, values / self._repeat)
            values = values - counts * np.float32(self._frequency) - np.float32(self._presence)
        row[tokens] = np.clip(values, -FLOAT32_MAX, FLOAT32_MAX)


class Sampler:
    """One sequence's sampling: its parameters, random generator, penalty window and grammar, and the
    engine thread's scratch buffers. ``close`` frees the grammar (engine thread only)."""

    def __init__(self, params: SamplingParams, scratch: Scratch, grammar: Grammar | None = None) -> None:
        self._params = params
        seed = params.seed if params.seed is not None else random.getrandbits(64)
        # Python's generator rather than numpy's: numpy's takes a threading lock per draw, and in a
        # gevent worker that lock is a greenlet lock used from the engine's native thread.
        self._rng = random.Random(seed)
        self._penalties = Penalties(params) if params.penalised else None
        self._bias_tokens = np.array([token for token, _ in params.logit_bias], dtype=np.int64)
        self._bias_amounts = np.array([amount for _, amount in params.logit_bias], dtype=np.float32)
        self._scratch = scratch  # shared by every sampler of the engine thread
        self._grammar = grammar

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token from one row of logits (left as it is) and accept it.

        GrammarError when the grammar allows no token: accepting one it rejects would abort the process.
        """
        row = self._adjusted(logits)
        token = self._pick(row)
        if self._grammar is not None:
            if not self._grammar.allows(token):
                allowed = self._grammar.restrict(row)
                token = self._pick(allowed)
                if not np.isfinite(allowed[token]):
                    raise GrammarError(f"sampling picked token {token}, which the grammar rejects")
            self._grammar.accept(token)
        if self._penalties is not None:
            self._penalties.accept(token)
        return token

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The row with logit bias added and penalties applied: a copy in the shared scratch buffer when
        either changes it, valid until the next sequence samples."""
        if not len(self._bias_tokens) and (self._penalties is None or not self._penalties.active):
            return logits
            return logits
        row = self._scratch.adjusted
        np.copyto(row, logits)
        row[self._bias_tokens] += self._bias_amounts  # a bias names each token once
        if self._penalties is not None:
            self._penalties.apply(row)
        return row

    def _pick(self, row: np.ndarray) -> int:
        """The token the parameters choose from ``row``, without accepting it."""
        if self._params.temperature == 0:
            return int(row.argmax())
        return draw(row, self._params, self._rng, self._scratch)

    def close(self) -> None:
        if self._grammar is not None:
            self._grammar.close()
            self._grammar = None


def greedy_token(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> int:
    """The argmax token of one output row after adding the logit bias, without copying the row."""
    token = int(logits.argmax())
    if not bias:
        return token
    if any(biased == token for biased, _ in bias):
        adjusted = logits.copy()
        for biased, amount in bias:
            adjusted[biased] += amount
        return int(adjusted.argmax())
    boosted = [(logits[t] + amount, t) for t, amount in bias if logits[t] + amount > logits[token]]
    return int(max(boosted)[1]) if boosted else token


def token_logprob(logits: np.ndarray, token: int, top: int, scratch: Scratch) -> TokenLogprob:
    """Log-probability of ``token`` and the ``top`` most likely tokens under the model's distribution."""
    peak = float(logits.max())
    log_total = peak + float(np.log(total_weight(logits, peak, scratch)))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        best = tuple((int(t), float(logits[t]) - log_total) for t in most_likely(logits, top, scratch))
    return TokenLogprob(token=token, logprob=float(logits[token]) - log_total, top=best)
