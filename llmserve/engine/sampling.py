"""Per-sequence sampling and log-probabilities.

Each running sequence samples with its own request's parameters. Random sampling and penalties use a
llama.cpp sampler chain per sequence. Greedy decoding (temperature 0, no penalties) takes a faster path:
one numpy argmax over all output rows of a step, instead of a chain that copies the whole vocabulary
(262k entries for Gemma) into a candidate array for every sequence, which costs more than a millisecond
per token on a small CPU.

A sequence with a grammar (structured outputs, tool calls) samples as it would without one, then asks its
grammar about that token, and filters every candidate only when the grammar rejects it (see grammar.py).
"""

from __future__ import annotations

import ctypes
import random

import llama_cpp as lc
import numpy as np

from llmserve.engine.grammar import Candidates, Grammar, GrammarError
from llmserve.engine.jobs import SamplingParams, TokenLogprob


class Sampler:
    """One sequence's sampling: a llama.cpp sampler chain, a grammar, or both; free it with ``close``
    (engine thread only). With a grammar, greedy sampling needs no chain: an argmax does."""

    def __init__(self, params: SamplingParams, n_vocab: int, grammar: Grammar | None = None) -> None:
        self._bias = params.logit_bias
        self._grammar = grammar
        self._candidates = Candidates(n_vocab) if grammar is not None else None
        self.pointer = None if grammar is not None and params.greedy else _chain(params, n_vocab)

    def sample(self, context: lc.llama_context_p, index: int, logits: np.ndarray) -> int:
        """Sample from batch output ``index`` (whose logits are ``logits``) and accept the token.

        GrammarError when the grammar allows no token: accepting one it rejects would abort the process.
        """
        if self._grammar is None:
            return int(lc.llama_sampler_sample(self.pointer, context, index))
        token = self._pick(logits)
        if not self._grammar.allows(token):
            assert self._candidates is not None
            allowed = self._grammar.restrict(logits, self._candidates)
            token = self._pick(allowed)
            if not np.isfinite(allowed[token]):
                raise GrammarError(f"sampling picked token {token}, which the grammar rejects")
        self._grammar.accept(token)
        if self.pointer:
            lc.llama_sampler_accept(self.pointer, token)
        return token

    def _pick(self, logits: np.ndarray) -> int:
        """The token the chain (or, greedy, the argmax) picks from ``logits``, without accepting it."""
        if not self.pointer:
            return greedy_token(logits, self._bias)
        assert self._candidates is not None
        lc.llama_sampler_apply(self.pointer, ctypes.byref(self._candidates.fill(logits)))
        return self._candidates.selected()

    def close(self) -> None:
        if self.pointer:
            lc.llama_sampler_free(self.pointer)
            self.pointer = None
        if self._grammar is not None:
            self._grammar.close()
            self._grammar = None


def _chain(params: SamplingParams, n_vocab: int) -> lc.llama_sampler_p:
    """The llama.cpp chain for ``params``: logit bias, penalties, then greedy or truncation and a seeded draw."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if params.logit_bias:
        biases = (lc.llama_logit_bias * len(params.logit_bias))()
        for entry, (token, bias) in zip(biases, params.logit_bias, strict=True):
            entry.token = token
            entry.bias = bias
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
    if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
        lc.llama_sampler_chain_add(
            chain,
            lc.llama_sampler_init_penalties(
                n_vocab,
                params.penalty_last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            ),
        )
    if params.temperature == 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


def greedy_token(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> int:
    """The argmax token of one output row after adding the logit bias, as a greedy chain would pick it."""
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


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """Log-probability of ``token`` and the ``top`` most likely tokens under the model's distribution."""
    peak = float(logits.max())
    log_total = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        candidates = np.argpartition(logits, -top)[-top:]
        ordered = candidates[np.argsort(logits[candidates])[::-1]]
        best = tuple((int(t), float(logits[t]) - log_total) for t in ordered)
    return TokenLogprob(token=token, logprob=float(logits[token]) - log_total, top=best)
