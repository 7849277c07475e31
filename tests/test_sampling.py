"""The greedy fast path picks what a greedy llama.cpp chain with the same logit bias would pick."""

import numpy as np

from llmserve.engine.distribution import Scratch
from llmserve.engine.jobs import SamplingParams
from llmserve.engine.sampling import greedy_token, token_logprob

LOGITS = np.array([0.5, 3.0, 2.0, -1.0, 2.9], dtype=np.float32)


def test_plain_argmax() -> None:
    assert greedy_token(LOGITS, ()) == 1


def test_banning_the_best_token_picks_the_runner_up() -> None:
    assert greedy_token(LOGITS, ((1, -100.0),)) == 4
    assert greedy_token(LOGITS, ((1, -100.0), (4, -100.0))) == 2


def test_a_boost_can_overtake_the_best() -> None:
    assert greedy_token(LOGITS, ((3, 5.0),)) == 3
    assert greedy_token(LOGITS, ((3, 1.0),)) == 1


def test_the_logits_are_not_modified() -> None:
    before = LOGITS.copy()
    greedy_token(LOGITS, ((1, -100.0),))
    assert np.array_equal(LOGITS, before)


def test_greedy_means_no_randomness_and_no_penalties() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0, logit_bias=((1, -100.0),)).greedy
    assert not SamplingParams(temperature=0.1).greedy
    assert not SamplingParams(temperature=0, presence_penalty=0.5).greedy
    assert not SamplingParams(temperature=0, repeat_penalty=1.1).greedy


def test_logprobs_are_a_normalised_distribution() -> None:
    result = token_logprob(LOGITS, 1, top=2, scratch=Scratch(len(LOGITS)))
    probabilities = np.exp(LOGITS - LOGITS.max())
    probabilities /= probabilities.sum()
    assert np.isclose(result.logprob, np.log(probabilities[1]))
    assert [token for token, _ in result.top] == [1, 4]
    assert result.top[0][1] == result.logprob
