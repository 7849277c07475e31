"""Turning tokens into client text: stop sequences across tokens, split UTF-8, logprob alignment."""

from llmserve.api.text import TextAssembler
from llmserve.engine.jobs import TokenLogprob

PIECES = {
    1: b"Hello",
    2: b" wor",
    3: b"ld",
    4: b"!",
    5: "é".encode()[:1],  # the first byte of a two-byte character
    6: "é".encode()[1:],
    7: b"",  # a control token (end of generation) renders as nothing
    8: b"<",
    9: b"/s",
    10: b">",
}


def assemble(tokens: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextAssembler]:
    text = TextAssembler(PIECES.__getitem__, stop)
    deltas = [text.add(t).text for t in tokens]
    deltas.append(text.finish().text)
    return deltas, text


def test_without_stop_sequences_text_flows_token_by_token() -> None:
    deltas, text = assemble([1, 2, 3, 4])
    assert deltas == ["Hello", " wor", "ld", "!", ""]
    assert text.text == "Hello world!"
    assert text.tokens == 4


def test_a_stop_sequence_spanning_tokens_never_leaks() -> None:
    deltas, text = assemble([1, 8, 9, 10, 4], stop=("</s>",))
    assert "".join(deltas) == "Hello"
    assert all("<" not in d for d in deltas)
    assert text.stopped
    assert text.tokens == 4  # the token that completed the stop is counted; later ones are not


def test_text_that_only_looked_like_a_stop_is_released() -> None:
    deltas, text = assemble([1, 8, 4], stop=("</s>",))
    assert deltas == ["Hello", "", "<!", ""]
    assert not text.stopped


def test_held_text_is_released_when_generation_ends() -> None:
    deltas, _ = assemble([1, 8], stop=("</s>",))
    assert deltas == ["Hello", "", "<"]


def test_a_stop_inside_one_token_cuts_the_token() -> None:
    deltas, text = assemble([1, 2, 3], stop=("o w",))
    assert "".join(deltas) == "Hell"
    assert text.stopped


def test_the_earliest_of_several_stops_wins() -> None:
    deltas, _ = assemble([1, 2, 3, 4], stop=("ld", "wor"))
    assert "".join(deltas) == "Hello "


def test_a_split_multibyte_character_is_never_sent_in_halves() -> None:
    deltas, _ = assemble([1, 5, 6, 4])
    assert deltas == ["Hello", "", "é", "!", ""]


def test_control_tokens_add_no_text_but_count() -> None:
    deltas, text = assemble([1, 7])
    assert "".join(deltas) == "Hello"
    assert text.tokens == 2


def test_logprobs_travel_with_the_text_they_produced() -> None:
    text = TextAssembler(PIECES.__getitem__, ("</s>",))
    lp = {t: TokenLogprob(token=t, logprob=-float(t)) for t in PIECES}
    first = text.add(1, lp[1])
    held = text.add(8, lp[8])
    released = text.add(4, lp[4])
    assert [e.token for e in first.logprobs] == [1]
    assert held.logprobs == []
    assert [e.token for e in released.logprobs] == [8, 4]


def test_logprobs_of_tokens_inside_a_stop_are_dropped() -> None:
    text = TextAssembler(PIECES.__getitem__, ("</s>",))
    entries = [text.add(t, TokenLogprob(token=t, logprob=-1.0)) for t in (1, 8, 9, 10)]
    assert [e.token for d in entries for e in d.logprobs] == [1]
