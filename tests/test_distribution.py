"""The numpy sampler draws from exactly the distribution llama.cpp's sampler chain defines.

The reference is the chain's definition computed naively (a full sort, float64), checked against
llama.cpp's own top-k, top-p, min-p and temperature samplers; many seeded draws must match its
probabilities (a chi-square test with a loose bound) and never leave its candidate set. Penalties and
logit bias must change the logits exactly as llama.cpp's samplers do.
"""

from __future__ import annotations

import ctypes
import random

import llama_cpp as lc
import numpy as np
import pytest
from scipy import stats

from llmserve.engine import distribution
from llmserve.engine.distribution import Cumulative, SamplingError, Scratch, draw
from llmserve.engine.grammar import Candidates
from llmserve.engine.jobs import SamplingParams
from llmserve.engine.sampling import Penalties, Sampler

VOCAB = 32768
DRAWS = 20_000
SCRATCH = Scratch(VOCAB)


def model_like_logits(seed: int = 7) -> np.ndarray:
    """Logits shaped like a language model's: a broad, low bulk and a few likely tokens above it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-2.0, 2.5, VOCAB).astype(np.float32)
    logits[rng.choice(VOCAB, 12, replace=False)] = rng.uniform(6.0, 9.0, 12).astype(np.float32)
    return logits


def llama_chain(params: SamplingParams) -> lc.llama_sampler_p:
    """llama.cpp's chain for ``params`` (without the final draw), in the order the engine's draw uses."""
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    if params.top_k:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
    lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
    return chain


def apply_llama(sampler: lc.llama_sampler_p, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and logits of the candidates left after llama.cpp's ``sampler`` ran on ``logits``."""
    candidates = Candidates(len(logits))
    array = candidates.fill(logits)
    lc.llama_sampler_apply(sampler, ctypes.byref(array))
    kept = np.ctypeslib.as_array(ctypes.cast(array.data, ctypes.POINTER(ctypes.c_byte)), (array.size * 12,))
    data = kept.view(np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)]))
    return data["id"].copy(), data["logit"].copy()


def reference(logits: np.ndarray, params: SamplingParams) -> dict[int, float]:
    """Each candidate's probability under the chain's definition, computed naively in float64: sort
    everything, keep the top k, the nucleus reaching top_p, the tokens within min_p of the best, then a
    softmax at the temperature."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")
    values = logits[order].astype(np.float64)
    if params.top_k:
        order, values = order[: params.top_k], values[: params.top_k]
    if params.top_p < 1.0:
        probabilities = np.exp(values - values[0]) / np.exp(values - values[0]).sum()
        count = int(np.searchsorted(np.cumsum(probabilities), params.top_p)) + 1
        order, values = order[:count], values[:count]
    if params.min_p > 0.0:
        keep = values >= values[0] + np.log(params.min_p)
        order, values = order[keep], values[keep]
    weights = np.exp((values - values[0]) / params.temperature)
    return dict(zip(order.tolist(), (weights / weights.sum()).tolist(), strict=True))


def llama_reference(logits: np.ndarray, params: SamplingParams) -> dict[int, float]:
    """The same from llama.cpp's own samplers (which sum probabilities in float32)."""
    chain = llama_chain(params)
    try:
        ids, values = apply_llama(chain, logits)
    finally:
        lc.llama_sampler_free(chain)
    weights = np.exp(values.astype(np.float64) - values.max())
    return dict(zip(ids.tolist(), (weights / weights.sum()).tolist(), strict=True))


def assert_draws_match(
    logits: np.ndarray, params: SamplingParams, expected: dict[int, float], scratch: Scratch = SCRATCH
) -> None:
    """Seeded draws fall only on candidates and at their probabilities (the likeliest 30 each in a bin
    of its own, the rest pooled), by a chi-square test at p > 1e-4."""
    rng = random.Random(1234)
    drawn = np.array([draw(logits, params, rng, scratch) for _ in range(DRAWS)])
    assert set(drawn.tolist()) <= set(expected), "a token outside the candidate set was drawn"
    ranked = sorted(expected, key=expected.__getitem__, reverse=True)
    bins = ranked[:30]
    observed = [int((drawn == token).sum()) for token in bins]
    probabilities = [expected[token] for token in bins]
    if len(ranked) > len(bins):
        observed.append(DRAWS - sum(observed))
        probabilities.append(1.0 - sum(probabilities))
    frequencies = np.array(probabilities) * DRAWS
    keep = frequencies >= 5  # chi-square needs expected counts of at least ~5 per bin
    pooled_observed = [*np.array(observed)[keep], int(np.array(observed)[~keep].sum())]
    pooled_expected = [*frequencies[keep], float(frequencies[~keep].sum())]
    if pooled_expected[-1] < 5:  # too rare to test on its own: merged into the previous bin
        rare_observed, rare_expected = pooled_observed.pop(), pooled_expected.pop()
        pooled_observed[-1] += rare_observed
        pooled_expected[-1] += rare_expected
    assert stats.chisquare(pooled_observed, pooled_expected).pvalue > 1e-4


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.5),
        SamplingParams(temperature=1.0, top_k=40),
        SamplingParams(temperature=0.7, top_p=0.95),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
        SamplingParams(temperature=1.0, top_k=5000, top_p=0.9),
    ],
    ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-minp{p.min_p}",
)
def test_draws_follow_the_chains_distribution(params: SamplingParams) -> None:
    logits = model_like_logits()
    expected = reference(logits, params)
    # llama.cpp keeps the same candidates, but for tokens at the margin of a large nucleus, where its
    # float32 running sum and the exact one disagree: together they weigh almost nothing.
    theirs = llama_reference(logits, params)
    assert sum(expected.get(t, 0.0) + theirs.get(t, 0.0) for t in set(expected) ^ set(theirs)) < 2e-3
    assert_draws_match(logits, params, expected)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.999)])
def test_tokens_beyond_the_head_keep_their_exact_probability(
    monkeypatch: pytest.MonkeyPatch, params: SamplingParams
) -> None:
    """With a head only 1.5 nats wide, most of the mass lies beyond it: draws that fall there and the
    nucleus cut that the tail can move must still give the exact distribution."""
    monkeypatch.setattr(distribution, "HEAD_SPAN", 1.5)
    logits = model_like_logits()
    assert_draws_match(logits, params, reference(logits, params))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0, top_p=0.5), SamplingParams(temperature=0.7, top_p=0.6, min_p=0.1)],
    ids=lambda p: f"T{p.temperature}-p{p.top_p}-minp{p.min_p}",
)
def test_a_nucleus_cut_the_tail_could_move_keeps_the_exact_distribution(
    monkeypatch: pytest.MonkeyPatch, params: SamplingParams
) -> None:
    """100 tokens within a 3-nat head, 200 far below it: the tail's bound leaves a wide band of tokens
    that may or may not be in the nucleus, so many draws land there and must be checked against the
    exact cut (most of them rejected: the tail really weighs little)."""
    monkeypatch.setattr(distribution, "HEAD_SPAN", 3.0)
    logits = np.concatenate([np.linspace(0.0, -3.0, 100, dtype=np.float32), np.full(200, -10.0, dtype=np.float32)])
    checked: list[int] = []
    exact_draw = distribution._nucleus_draw

    def counted(*args: object, **kwargs: object) -> int:
        checked.append(1)
        return exact_draw(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(distribution, "_nucleus_draw", counted)
    assert_draws_match(logits, params, reference(logits, params), Scratch(len(logits)))
    assert len(checked) > DRAWS // 20  # the band was really drawn from, and resolved


def test_the_full_distribution_reaches_the_tail() -> None:
    """Temperature alone samples every token, however unlikely: a flat tail is drawn at its share."""
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[0] = 8.0  # about 8% of the mass is in the 32767 other tokens together
    rng = random.Random(5)
    drawn = np.array([draw(logits, SamplingParams(temperature=1.0), rng, SCRATCH) for _ in range(DRAWS)])
    share = (drawn != 0).mean()
    expected = (VOCAB - 1) / (VOCAB - 1 + np.exp(8.0))
    assert abs(share - expected) < 5 * np.sqrt(expected * (1 - expected) / DRAWS)


def test_the_logits_row_is_left_unchanged() -> None:
    logits = model_like_logits()
    before = logits.copy()
    draw(logits, SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.01), random.Random(0), SCRATCH)
    assert np.array_equal(logits, before)


def test_tokens_at_minus_infinity_are_never_drawn() -> None:
    logits = np.full(VOCAB, -np.inf, dtype=np.float32)
    logits[[3, 9, 27]] = [0.0, 1.0, 2.0]
    rng = random.Random(0)
    drawn = {draw(logits, SamplingParams(temperature=2.0), rng, SCRATCH) for _ in range(500)}
    assert drawn == {3, 9, 27}
    with pytest.raises(SamplingError, match="finite"):
        draw(np.full(8, -np.inf, dtype=np.float32), SamplingParams(), rng, Scratch(8))


def test_the_cumulative_never_lands_on_a_zero_weight() -> None:
    weights = np.zeros(5000, dtype=np.float32)
    weights[[10, 2047, 4999]] = [1.0, 2.0, 3.0]
    cumulative = Cumulative(weights)
    assert cumulative.total == 6.0
    assert [cumulative.index(u) for u in (0.0, 0.999, 1.0, 2.999, 3.0, 5.999999)] == [10, 10, 2047, 2047, 4999, 4999]


def penalised_reference(logits: np.ndarray, params: SamplingParams, history: list[int]) -> np.ndarray:
    """The logits after llama.cpp's penalties sampler has accepted ``history``."""
    penalties = lc.llama_sampler_init_penalties(
        len(logits), params.penalty_last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
    )
    try:
        for token in history:
            lc.llama_sampler_accept(penalties, token)
        ids, values = apply_llama(penalties, logits)
    finally:
        lc.llama_sampler_free(penalties)
    result = np.empty_like(logits)
    result[ids] = values
    return result


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(repeat_penalty=1.3),
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.4),
        SamplingParams(repeat_penalty=1.1, frequency_penalty=-0.5, presence_penalty=1.5, penalty_last_n=8),
    ],
)
def test_penalties_change_the_logits_as_llama_cpp_does(params: SamplingParams) -> None:
    logits = np.random.default_rng(3).normal(0.0, 3.0, 512).astype(np.float32)
    history = [5, 9, 5, 100, 5, 9, 300, 7, 7, 7, 42, 5]  # longer than the 8-token window, with repeats
    penalties = Penalties(params)
    for token in history:
        penalties.accept(token)
    row = logits.copy()
    penalties.apply(row)
    np.testing.assert_allclose(row, penalised_reference(logits, params, history), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("repeat_penalty", [5e-324, 1e-30, 10.0])
def test_extreme_penalties_leave_a_row_that_can_be_drawn_from(repeat_penalty: float) -> None:
    """A positive logit divided by a tiny penalty overflows float32: it must become the largest finite
    logit (the limit llama.cpp's arithmetic tends to), never inf, which no distribution can weigh."""
    params = SamplingParams(repeat_penalty=repeat_penalty, frequency_penalty=2.0, presence_penalty=-2.0)
    penalties = Penalties(params)
    for token in (3, 4):
        penalties.accept(token)
    row = np.zeros(64, dtype=np.float32)
    row[3], row[4] = 2.5, -2.5
    penalties.apply(row)
    assert np.isfinite(row).all()
    tokens = {draw(row, SamplingParams(temperature=1.0), random.Random(seed), Scratch(64)) for seed in range(50)}
    assert tokens == {3} if repeat_penalty < 1 else len(tokens) > 1


def test_logit_bias_shifts_the_distribution_as_llama_cpp_does() -> None:
    logits = model_like_logits()
    bias = ((int(logits.argmax()), -100.0), (17, 9.0), (18, 4.5))
    params = SamplingParams(temperature=1.0, top_k=40, logit_bias=bias)
    entries = (lc.llama_logit_bias * len(bias))()
    for entry, (token, amount) in zip(entries, bias, strict=True):
        entry.token, entry.bias = token, amount
    biaser = lc.llama_sampler_init_logit_bias(VOCAB, len(bias), entries)
    try:
        ids, values = apply_llama(biaser, logits)
    finally:
        lc.llama_sampler_free(biaser)
    biased = np.empty_like(logits)
    biased[ids] = values
    expected = reference(biased, params)
    assert int(logits.argmax()) not in expected and 17 in expected
    sampler = Sampler(params, SCRATCH)
    rng_draws = [sampler.sample(logits) for _ in range(DRAWS)]
    counts = np.bincount(rng_draws, minlength=VOCAB)
    assert counts[int(logits.argmax())] == 0
    assert abs(counts[17] / DRAWS - expected[17]) < 5 * np.sqrt(expected[17] * (1 - expected[17]) / DRAWS)


def test_a_seed_repeats_its_draws_and_other_seeds_differ() -> None:
    logits = model_like_logits()

    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed, presence_penalty=0.5), SCRATCH)
        return [sampler.sample(logits) for _ in range(64)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_penalties_apply_to_greedy_decoding_too() -> None:
    logits = np.array([0.0, 5.0, 4.9, 1.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=1.0), Scratch(4))
    assert [sampler.sample(logits) for _ in range(4)] == [1, 2, 1, 2]
