"""The tool-call parser: any chunking of the same output gives the same message, and the stream adds up to it."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from llmserve.structured import ParsedReply, ToolCallParser, new_call_id

WEATHER = '{"name": "get_weather", "arguments": {"city": "Pa}ris \\"x\\" </tool_call>", "days": [1, {"a": 2}]}}'
TWO_CALLS = f'<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{{"name":"now","arguments":{{}}}}</tool_call>\n'
TEXT_THEN_CALL = f"Let me check that.\n\n<tool_call>\n{WEATHER}\n</tool_call>"


def ids() -> Callable[[], str]:
    return map("call_{:024d}".format, itertools.count()).__next__


def parse(chunks: Iterable[str]) -> tuple[ParsedReply, list[dict[str, Any]]]:
    parser = ToolCallParser(make_id=ids())
    deltas = [delta for chunk in chunks for delta in parser.feed(chunk)]
    reply = parser.finish()
    return reply, deltas + reply.deltas


def accumulate(deltas: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """What a client that concatenates a stream's deltas ends up with, as OpenAI's SDKs do."""
    content: str | None = None
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        assert len(delta) == 1
        if "content" in delta:
            content = (content or "") + delta["content"]
            continue
        (call,) = delta["tool_calls"]
        if "id" in call:
            assert call["index"] == len(calls)
            calls.append({"id": call["id"], "type": call["type"], "function": dict(call["function"])})
        else:
            calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    return content, calls


def chunkings(text: str) -> list[list[str]]:
    rng = random.Random(3)
    random_splits = []
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(12, len(text) - 1))))
        random_splits.append([text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])])
    return [[text], list(text), *random_splits]


@pytest.mark.parametrize("text", [TWO_CALLS, TEXT_THEN_CALL, "Just an answer, no calls.\n", ""])
def test_every_chunking_gives_the_same_message_and_the_stream_adds_up_to_it(text: str) -> None:
    expected, _ = parse([text])
    for chunks in chunkings(text) if text else [[""], []]:
        reply, deltas = parse(chunks)
        assert (reply.content, reply.tool_calls) == (expected.content, expected.tool_calls)
        streamed_content, streamed_calls = accumulate(deltas)
        assert streamed_content == reply.content or (streamed_content is None and reply.content == "")
        assert streamed_calls == reply.tool_calls


def test_calls_come_back_as_openai_returns_them() -> None:
    reply, deltas = parse([TWO_CALLS])
    assert reply.content is None
    assert reply.tool_calls == [
        {
            "id": "call_" + "0" * 24,
            "type": "function",
            "function": {"name": "get_weather", "arguments": WEATHER[WEATHER.index('{"city"') : -1]},
        },
        {"id": "call_" + "0" * 23 + "1", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    assert json.loads(reply.tool_calls[0]["function"]["arguments"]) == json.loads(WEATHER)["arguments"]
    assert deltas[0] == {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_" + "0" * 24,
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ]
    }


def test_parallel_calls_are_indexed_in_order() -> None:
    text = "".join(f'<tool_call>{{"name": "f{i}", "arguments": {{"i": {i}}}}}</tool_call>\n' for i in range(4))
    reply, deltas = parse(list(text))
    announced = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [(c["index"], c["function"]["name"]) for c in announced] == [(i, f"f{i}") for i in range(4)]
    assert [c["function"]["arguments"] for c in reply.tool_calls] == [f'{{"i": {i}}}' for i in range(4)]


def test_a_plain_answer_is_content_only_and_keeps_its_text() -> None:
    text = "Paris is the capital. Use <b>tags</b> or a <tool, freely.\n"
    reply, deltas = parse(list(text))
    assert reply.tool_calls == []
    assert reply.content == text
    assert accumulate(deltas) == (text, [])


def test_text_before_a_call_is_content_without_its_trailing_whitespace() -> None:
    reply, deltas = parse(list(TEXT_THEN_CALL))
    assert reply.content == "Let me check that."
    assert [c["function"]["name"] for c in reply.tool_calls] == ["get_weather"]
    assert accumulate(deltas)[0] == "Let me check that."


def test_a_marker_start_at_the_very_end_is_content() -> None:
    reply, deltas = parse(["Hello <tool_c"])
    assert reply.content == "Hello <tool_c"
    assert accumulate(deltas) == ("Hello <tool_c", [])


def test_a_call_cut_short_in_its_arguments_comes_back_as_announced() -> None:
    """As OpenAI returns a call that max_tokens cut: the arguments it got, never markup as content."""
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Par'
    reply, deltas = parse(list(text))
    expected = [
        {
            "id": "call_" + "0" * 24,
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Par'},
        }
    ]
    assert reply.content is None
    assert reply.tool_calls == expected
    assert accumulate(deltas) == (None, expected)


def test_a_call_cut_before_its_name_is_complete_is_dropped() -> None:
    text = 'Sure. <tool_call>{"name": "get_wea'
    reply, deltas = parse(list(text))
    assert reply == ParsedReply("Sure.", [], [])
    assert accumulate(deltas) == ("Sure.", [])


def test_earlier_calls_survive_a_later_call_cut_short() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"x": [1, 2'
    reply, _ = parse([text])
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls] == [
        ("a", "{}"),
        ("b", '{"x": [1, 2'),
    ]
    assert reply.content is None


def test_a_call_missing_only_its_closing_marker_is_whole() -> None:
    reply, deltas = parse(['<tool_call>{"name": "a", "arguments": {"k": "v"}}\n</tool'])
    assert reply.content is None
    assert reply.tool_calls[0]["function"] == {"name": "a", "arguments": '{"k": "v"}'}
    assert accumulate(deltas)[1] == reply.tool_calls


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}, "name": "a"}</tool_call>',
        '<tool_call>{"name": "a", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "a", "arguments": {"x": tru}}</tool_call>',
        '<tool_call>{"name": "a", "arguments": {}, "extra": 1}</tool_call>',
    ],
)
def test_blocks_that_are_not_calls_are_content(block: str) -> None:
    reply, deltas = parse(list("See: " + block + "\nDone."))
    assert reply.tool_calls == []
    assert reply.content == "See: " + block + "\nDone."
    assert accumulate(deltas)[0] == reply.content


def test_ids_look_like_openai_ids_and_differ() -> None:
    made = {new_call_id() for _ in range(100)}
    assert len(made) == 100
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in made)
    reply = ToolCallParser()
    reply.feed('<tool_call>{"name": "a", "arguments": {}}</tool_call>')
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", reply.finish().tool_calls[0]["id"])


def test_nothing_is_fed_after_finish() -> None:
    parser = ToolCallParser()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
