"""Per-sequence sampling and log-probabilities.

Each running sequence samples with its own request's parameters. Random sampling and penalties use a
llama.cpp sampler chain per sequence. Greedy decoding (temperature 0, no penalties) takes a faster path:
one numpy argmax over all output rows of a step, instead of a chain that copies the whole vocabulary
(262k entries for Gemma) into a candidate array for every sequence, which costs more than a millisecond
per token on a small CPU.
"""

from __future__ import annotations

import random

import llama_cpp as lc
import numpy as np

from llmserve.engine.jobs import SamplingParams, TokenLogprob


class Sampler:
    """A llama.cpp sampler chain; free it with ``close`` (engine thread only)."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        self.pointer = chain
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
            return
        if params.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def sample(self, context: lc.llama_context_p, index: int) -> int:
        """Sample from batch output ``index`` and accept the token into the chain's history."""
        return int(lc.llama_sampler_sample(self.pointer, context, index))

    def close(self) -> None:
        if self.pointer:
            lc.llama_sampler_free(self.pointer)
            self.pointer = None


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
