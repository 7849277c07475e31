"""Exact random draws from one row of logits, touching as little of the vocabulary as the parameters allow.

The distribution is llama.cpp's sampler chain, in its order: top-k, then top-p (on the softmax at
temperature 1 of what top-k kept), then min-p (relative to the most likely token), then temperature, then
a draw in proportion to ``exp((logit - best) / temperature)``. With no truncation that is the model's full
distribution over every token, as OpenAI samples at its default temperature 1.0.

Building that distribution naively costs a softmax and a cumulative sum over the whole vocabulary (262k
entries for Gemma, about 2 ms on a small CPU) for every sequence and every token. Almost all of those
tokens are too unlikely to matter, but "almost" is not "exactly", so the draw uses an envelope instead of
cutting them off:

* the *head* is every token within ``HEAD_SPAN`` nats of the best one (at the temperature of the draw);
  it is found with one vectorised comparison, and only its weights are computed;
* every other token weighs less than ``exp(-HEAD_SPAN)`` times the best, so together they weigh at most
  ``bound = tail_count * exp(-HEAD_SPAN)`` (at most 0.004 with Gemma's vocabulary, where the best token
  alone weighs 1);
* a uniform draw over ``head_mass + bound`` lands in the head with the head's exact share; only when it
  lands in the bound (at most 0.4% of draws) are the tail's weights computed. A draw that falls in the
  part of the bound no token fills is made again, now over the exact total. A token in the head is then
  drawn with probability w/(H+B) + (B-R)/(H+B) * w/(H+R) = w/(H+R) (H, R: the head's and the tail's
  true mass, B the bound), and one in the tail likewise: every token has exactly its probability under
  the full distribution; the tail is merely rarely looked at.

Top-p uses the same bound: the nucleus is found among the head, and the tail's unknown mass can only move
its cut within a band of the nucleus's least likely tokens; only a draw that lands in that band weighs
the tail to learn the exact cut. Top-k and min-p keep a subset of the head in all but
contrived cases (a min-p below ``exp(-HEAD_SPAN)``, or fewer than k tokens in the head), which fall back to
the whole vocabulary.
"""

from __future__ import annotations

import math
import random

import numpy as np

from llmserve.engine.jobs import SamplingParams

HEAD_SPAN = 18.0  # nats below the best token beyond which weights are bounded rather than computed
CDF_BLOCK = 1024  # weights per block when locating a draw in a long list (block sums, then one block)
# exp() below this underflows float32 into subnormals, which CPUs compute several times slower; a token
# that far below the best is weighed as if at it (under 1e-37 of the best: no draw can tell).
UNDERFLOW = np.float32(-87.0)
NUCLEUS_BINS = 2048  # bins by weight that locate a top-p cut without sorting the candidates
TOP_K_SPANS = (2.0, 6.0, HEAD_SPAN)  # bands below the best token searched in turn for the top k


class SamplingError(ValueError):
    """A row that cannot be drawn from (no token has a finite logit): it ends its own sequence only."""


class Scratch:
    """Vocabulary-sized buffers reused from token to token: a fresh megabyte-sized temporary per token
    costs more in page faults than the arithmetic done in it."""

    def __init__(self, n_vocab: int) -> None:
        self.mask = np.empty(n_vocab, dtype=bool)
        self.values = np.empty(n_vocab, dtype=np.float32)
        self.adjusted = np.empty(n_vocab, dtype=np.float32)  # a row after logit bias and penalties


def draw(logits: np.ndarray, params: SamplingParams, rng: random.Random, scratch: Scratch) -> int:
    """One token drawn from ``logits`` (one row, not modified) under ``params``, which must sample
    (temperature > 0). SamplingError when no token has a finite logit."""
    best = float(logits.max())
    if not math.isfinite(best):
        raise SamplingError("no token has a finite logit")
    temperature = params.temperature
    # Top-p weighs tokens at temperature 1, the draw at ``temperature``: the head must hold both.
    span = HEAD_SPAN * (max(temperature, 1.0) if params.top_p < 1.0 else temperature)
    if 0 < params.top_k < len(logits):
        ids, tail = _top_k(logits, best, params.top_k, scratch), 0
    else:
        np.greater_equal(logits, np.float32(best - span), out=scratch.mask)
        ids = np.flatnonzero(scratch.mask)
        tail = len(logits) - len(ids)  # tokens outside the head (those at -inf included, harmlessly)
    nucleus: Nucleus | None = None
    sure = len(ids)  # candidates from here on are in the distribution only if the tail weighs little
    if params.top_p < 1.0:
        nucleus = Nucleus(logits, ids, best, tail * math.exp(-span), params.top_p, scratch)
        ids, sure = np.concatenate([nucleus.sure, nucleus.maybe]), len(nucleus.sure)
        tail = 0
    if params.min_p > 0.0:
        floor = best + math.log(params.min_p)
        if tail and floor < best - span:
            ids = np.flatnonzero(logits >= floor)
            sure = len(ids)
        else:
            kept = logits[ids] >= floor
            ids, sure = ids[kept], int(np.count_nonzero(kept[:sure]))
        tail = 0
    # A weight that underflows to 0 (a low temperature after top-p) is one ``index`` never picks.
    head = Cumulative(np.exp((logits[ids] - best) / temperature))
    bound = tail * math.exp(-span / temperature)
    u = rng.random() * (head.total + bound)
    if u < head.total:
        index = head.index(u)
        if index < sure or nucleus is None:
            return int(ids[index])
        # Rare: a token the nucleus holds only if the tail weighs little enough. Weigh it and see.
        return _nucleus_draw(logits, nucleus.exact(total_weight(logits, best, scratch)), int(ids[index]), params, rng)
    # Rare: the draw fell beyond the head. Weigh the tail exactly; a draw within its true mass is taken.
    np.less(logits, np.float32(best - span), out=scratch.mask)
    tail_ids = np.flatnonzero(scratch.mask)
    shifted = (logits[tail_ids] - best) / temperature
    rest = Cumulative(np.exp(np.maximum(shifted, UNDERFLOW, out=shifted), out=shifted))
    u -= head.total
    if u >= rest.total:
        # It fell in the part of the bound no token fills, which a rejection sampler would draw again.
        # With the total now known exactly, that second draw is made over the exact distribution.
        u = rng.random() * (head.total + rest.total)
        if u < head.total:
            return int(ids[head.index(u)])
        u -= head.total
    return int(tail_ids[rest.index(min(u, np.nextafter(rest.total, 0.0)))])


def _nucleus_draw(
    logits: np.ndarray, nucleus: np.ndarray, proposed: int, params: SamplingParams, rng: random.Random
) -> int:
    """``proposed``, drawn from a nucleus that may have been too large, if it is in the exact ``nucleus``;
    otherwise a draw from the exact one. As with the tail: a token of the exact nucleus is then drawn with
    probability w/M + (M-N)/M * w/N = w/N (M, N: the two nuclei's masses), its exact probability."""
    best = float(logits.max())
    if params.min_p > 0.0:
        nucleus = nucleus[logits[nucleus] >= best + math.log(params.min_p)]
    if np.any(nucleus == proposed):
        return proposed
    weights = Cumulative(np.exp((logits[nucleus] - best) / params.temperature))
    return int(nucleus[weights.index(rng.random() * weights.total)])


def _top_k(logits: np.ndarray, best: float, k: int, scratch: Scratch) -> np.ndarray:
    """The ``k`` highest logits' token ids (in no order), partitioned out of the narrowest band below
    ``best`` that holds that many: counting a band is cheap, listing a wide one is not."""
    for span in TOP_K_SPANS:
        np.greater_equal(logits, np.float32(best - span), out=scratch.mask)
        if np.count_nonzero(scratch.mask) >= k:
            band = np.flatnonzero(scratch.mask)
            return band[np.argpartition(logits[band], -k)[-k:]] if len(band) > k else band
    return np.argpartition(logits, -k)[-k:]


def most_likely(logits: np.ndarray, k: int, scratch: Scratch) -> np.ndarray:
    """The ids of the ``k`` highest logits, highest first, without partitioning the whole vocabulary."""
    ids = _top_k(logits, float(logits.max()), k, scratch)
    return ids[np.argsort(-logits[ids], kind="stable")]


class Nucleus:
    """The smallest set of the most likely of ``ids`` whose probability (at temperature 1) reaches
    ``top_p``, the token crossing it included, as llama.cpp's top-p keeps. ``unseen`` bounds the weight
    of tokens outside ``ids`` that belong to the distribution (0 when ``ids`` is all of it).

    That unknown weight moves the cut only within a narrow band of unlikely tokens: ``sure`` are the
    tokens in the nucleus whatever it is, ``maybe`` those in it only if it is small enough. A draw that
    lands in ``maybe`` (rarely: they are the nucleus's least likely tokens) asks for the ``exact`` one.

    No full sort: tokens are binned by weight, the bins' masses summed from the most likely down, and
    only the bin where the cut falls is sorted."""

    def __init__(
        self, logits: np.ndarray, ids: np.ndarray, best: float, unseen: float, top_p: float, scratch: Scratch
    ) -> None:
        self._logits, self._ids, self._best, self._top_p, self._scratch = logits, ids, best, top_p, scratch
        gaps = best - logits[ids]  # >= 0: how far below the best token, in nats
        self._weights = np.exp(-gaps)
        self._mass = float(self._weights.sum(dtype=np.float64))
        scale = np.float32(NUCLEUS_BINS / max(float(gaps.max()), 1e-6))
        self._bins = np.minimum(gaps * scale, np.float32(NUCLEUS_BINS - 1)).astype(np.int32)
        self._cumulative = np.cumsum(np.bincount(self._bins, weights=self._weights, minlength=NUCLEUS_BINS))
        fewest = self._members(top_p * self._mass)  # if the unseen tokens weigh nothing
        most = top_p * (self._mass + unseen)  # the nucleus's weight if they weigh all they may
        self.maybe = ids[:0]
        if not unseen:
            self.sure = ids[fewest]
        elif most >= self._mass:  # it may reach beyond ``ids`` (a top_p within ~0.5% of 1): weigh it all
            self.sure = self.exact(total_weight(logits, best, scratch))
        else:
            largest = self._members(most)
            in_fewest = np.zeros(len(ids), dtype=bool)
            in_fewest[fewest] = True
            self.sure, self.maybe = ids[fewest], ids[largest[~in_fewest[largest]]]

    def exact(self, total: float) -> np.ndarray:
        """The nucleus's ids, given the exact ``total`` weight of the distribution."""
        target = self._top_p * total
        if target >= self._mass:
            everything = np.flatnonzero(np.isfinite(self._logits))
            return Nucleus(self._logits, everything, self._best, 0.0, self._top_p, self._scratch).sure
        return self._ids[self._members(target)]

    def _members(self, target: float) -> np.ndarray:
        """Where a nucleus of weight ``target`` ends, as positions in ``ids``: every token of an earlier
        bin than the cut's, then the cut's bin's tokens up to the one crossing ``target``."""
        bins, weights, cumulative = self._bins, self._weights, self._cumulative
        last_bin = min(int(np.searchsorted(cumulative, target)), len(cumulative) - 1)
        members = np.flatnonzero(bins == last_bin)
        members = members[np.argsort(-weights[members], kind="stable")]
        before = float(cumulative[last_bin - 1]) if last_bin else 0.0
        running = before + np.cumsum(weights[members], dtype=np.float64)
        count = min(int(np.searchsorted(running, target)), len(members) - 1) + 1
        return np.concatenate([np.flatnonzero(bins < last_bin), members[:count]])


def total_weight(logits: np.ndarray, best: float, scratch: Scratch) -> float:
    """The sum of every token's ``exp(logit - best)``, computed in the scratch buffer."""
    values = scratch.values
    np.subtract(logits, np.float32(best), out=values)
    np.maximum(values, UNDERFLOW, out=values)
    np.exp(values, out=values)
    return float(values.sum(dtype=np.float64))


class Cumulative:
    """The running sum of a non-empty list of non-negative weights, for inverse-CDF draws: a long list is
    summed in blocks, and only the block a draw falls in is summed element by element."""

    def __init__(self, weights: np.ndarray) -> None:
        self._weights = weights
        self._starts = np.arange(0, len(weights), CDF_BLOCK)
        self._blocks = np.cumsum(np.add.reduceat(weights, self._starts, dtype=np.float64))
        self.total = float(self._blocks[-1])

    def index(self, u: float) -> int:
        """The index ``i`` whose interval ``[sum(w[:i]), sum(w[:i+1]))`` holds ``u`` (0 <= u < total);
        never one whose weight is 0, whatever the rounding."""
        block = min(int(np.searchsorted(self._blocks, u, side="right")), len(self._blocks) - 1)
        start = int(self._starts[block])
        within = self._weights[start : start + CDF_BLOCK]
        offset = u - (float(self._blocks[block - 1]) if block else 0.0)
        index = int(np.searchsorted(np.cumsum(within, dtype=np.float64), offset, side="right"))
        positive = np.flatnonzero(within[: index + 1])
        return start + int(positive[-1] if index >= len(within) or within[index] == 0 else index)
