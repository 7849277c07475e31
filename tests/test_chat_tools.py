"""Chat requests with tools and response formats: validation (Flask test client, no model), the history
as the model sees it, and the reply in OpenAI's shapes, streamed and not (a fake vocabulary)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient
from pydantic import TypeAdapter

from llmserve.api.chat import ChatRenderer
from llmserve.api.chat_tools import CallStyle, ReplyFormat, chat_messages, reply_format
from llmserve.api.runner import Update
from llmserve.api.schemas import ChatCompletionRequest, ChatMessage
from llmserve.api.text import Delta
from llmserve.chat_format import Message
from llmserve.engine.jobs import TokenLogprob
from llmserve.errors import InvalidRequest
from llmserve.structured import JSON_OBJECT_GRAMMAR
from tests.test_api_errors import MODEL, assert_openai_error

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
HI = [{"role": "user", "content": "Hi"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def chat(**options: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, **options}


BAD_TOOL_REQUESTS = [
    (chat(tools=[{"type": "function", "function": {"name": "no spaces"}}]), "tools[0].function.name"),
    (
        chat(tools=[WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
        "tools[1].function.parameters",
    ),
    (
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"patternProperties": {}}}}]),
        "tools[0].function.parameters",
    ),
    (chat(tools=[{"type": "retrieval"}]), "tools[0].type"),
    (chat(tools=[WEATHER, WEATHER]), "tools"),
    (chat(tool_choice="auto"), "tool_choice"),
    (chat(parallel_tool_calls=False), "parallel_tool_calls"),
    (chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
    (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {}}), "tool_choice.function.name"),
    (chat(tools=[WEATHER], functions=[WEATHER["function"]]), "functions"),
    (chat(function_call="auto"), "function_call"),
    (chat(functions=[WEATHER["function"]], function_call={"name": "get_time"}), "function_call"),
    (chat(tools=[WEATHER], response_format={"type": "json_object"}), "response_format"),
    (chat(response_format={"type": "json_schema"}), "response_format"),
    (chat(response_format={"type": "yaml"}), "response_format.type"),
    (
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}),
        None,
    ),
    (
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "strict": True, "schema": {"type": "object", "properties": {}}},
            }
        ),
        "response_format.json_schema.schema",
    ),
    (
        chat(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
        "response_format.json_schema.name",
    ),
    (  # a grammar far larger than any real schema needs (an enum of 20,000 names)
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"enum": [f"name-number-{i:08d}" for i in range(20_000)]}},
            }
        ),
        "response_format.json_schema.schema",
    ),
    (
        {"model": MODEL, "messages": [*HI, {"role": "tool", "tool_call_id": "call_9", "content": "21 C"}]},
        "messages[1].tool_call_id",
    ),
    ({"model": MODEL, "messages": [*HI, {"role": "tool", "content": "21 C"}]}, "messages[1].tool_call_id"),
    ({"model": MODEL, "messages": [*HI, {"role": "function", "content": "21 C"}]}, "messages[1].name"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages[0].tool_calls"),
    (
        {
            "model": MODEL,
            "messages": [
                {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1]"}}]}
            ],
        },
        "messages[0].tool_calls",
    ),
]


@pytest.mark.parametrize(("body", "param"), BAD_TOOL_REQUESTS)
def test_unusable_tool_requests_are_400s_naming_the_parameter(
    client: FlaskClient, body: dict[str, Any], param: str | None
) -> None:
    if param is None:  # a valid request, refused only because the model is not loaded in these tests
        assert client.post("/v1/chat/completions", json=body).status_code == 503
        return
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param=param)


@pytest.mark.parametrize(
    "body",
    [
        chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False),
        chat(tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"}),
        chat(functions=[WEATHER["function"]], function_call={"name": "get_weather"}),
        {
            "model": MODEL,
            "messages": [
                *HI,
                {"role": "assistant", "content": None, "refusal": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "21 C"}]},
            ],
        },
    ],
)
def test_usable_tool_requests_pass_validation(client: FlaskClient, body: dict[str, Any]) -> None:
    assert client.post("/v1/chat/completions", json=body).status_code == 503


def request(**options: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(chat(**options))


def test_reply_formats() -> None:
    assert reply_format(request()) == ReplyFormat()
    assert reply_format(request(response_format={"type": "json_object"})) == ReplyFormat(grammar=JSON_OBJECT_GRAMMAR)
    none = reply_format(request(tools=[WEATHER], tool_choice="none"))
    assert none.grammar is None and none.calls is None and none.tools_prompt and "get_weather" in none.tools_prompt
    auto = reply_format(request(tools=[WEATHER]))
    assert auto.calls is CallStyle.TOOLS and auto.grammar and not auto.forced
    forced = {"type": "function", "function": {"name": "get_time"}}
    named = reply_format(request(tools=[WEATHER, TIME], tool_choice=forced))
    assert named.forced and named.grammar and "get_weather" not in named.grammar
    legacy = reply_format(request(functions=[WEATHER["function"]]))
    assert legacy.calls is CallStyle.FUNCTIONS


def messages(*raw: dict[str, Any]) -> list[ChatMessage]:
    return TypeAdapter(list[ChatMessage]).validate_python(list(raw))


def test_history_puts_calls_and_results_in_the_tool_format() -> None:
    rendered = chat_messages(
        messages(
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
            {"role": "tool", "tool_call_id": "call_2", "content": "25 C"},
            {"role": "assistant", "content": "Warm in both."},
        ),
        "TOOLS",
    )
    assert [m.role for m in rendered] == ["system", "user", "assistant", "user", "assistant"]
    assert rendered[0] == Message("system", "Be brief.\n\nTOOLS")
    assert rendered[2].content.count("<tool_call>") == 2
    assert rendered[3].content.count("<tool_response>") == 2  # consecutive results share one turn
    assert json.dumps({"name": "get_weather", "content": "25 C"}) in rendered[3].content


def test_history_without_a_system_message_gets_one_for_the_tools() -> None:
    rendered = chat_messages(messages(*HI), "TOOLS")
    assert rendered == [Message("system", "TOOLS"), Message("user", "Hi")]
    assert chat_messages(messages(*HI), None) == [Message("user", "Hi")]


def test_legacy_function_history() -> None:
    rendered = chat_messages(
        messages(
            *HI,
            {"role": "assistant", "content": None, "function_call": CALL["function"]},
            {"role": "function", "name": "get_weather", "content": "21 C"},
        ),
        None,
    )
    assert "<tool_call>" in rendered[1].content and "<tool_response>" in rendered[2].content


def test_a_result_for_an_unknown_call_is_refused() -> None:
    with pytest.raises(InvalidRequest) as raised:
        chat_messages(messages(*HI, {"role": "tool", "tool_call_id": "call_1", "content": "x"}), None)
    assert raised.value.param == "messages[1].tool_call_id"


class FakeVocab:
    """One token per character: enough to render logprobs."""

    def piece(self, token: int) -> bytes:
        return chr(token).encode()

    def token_text(self, token: int) -> str:
        return chr(token)


REPLY = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def stream(renderer: ChatRenderer, text: str, reason: str = "stop", size: int = 3) -> list[dict[str, Any]]:
    """The chunks for ``text`` arriving ``size`` characters (tokens) at a time."""
    chunks: list[dict[str, Any]] = []
    for start in range(0, len(text), size):
        piece = text[start : start + size]
        logprobs = [TokenLogprob(ord(c), -0.5) for c in piece]
        last = start + size >= len(text)
        chunks += renderer.chunk_choices(Update(0, Delta(piece, logprobs), reason if last else None))
    return chunks


def renderer(reply: ReplyFormat, want_logprobs: bool = False) -> ChatRenderer:
    return ChatRenderer(FakeVocab(), 1, want_logprobs, reply)  # type: ignore[arg-type]


def test_streamed_calls_reassemble_into_the_final_message() -> None:
    tools = ReplyFormat(grammar="root ::= x", calls=CallStyle.TOOLS)
    chunks = stream(renderer(tools), REPLY)
    assert chunks[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    content = "".join(c["delta"].get("content", "") for c in chunks)
    deltas = [d for c in chunks for d in c["delta"].get("tool_calls", [])]
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""} and deltas[0]["type"] == "function"
    assert all(set(d) == {"index", "function"} and d["index"] == 0 for d in deltas[1:])
    final = renderer(tools).final_choice(0, REPLY, [], "stop")
    assert final["finish_reason"] == "tool_calls"
    message = final["message"]
    assert content == message["content"] == "Sure."
    [call] = message["tool_calls"]
    assert call["function"] == {
        "name": "get_weather",
        "arguments": "".join(d["function"]["arguments"] for d in deltas),
    }
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_finish_reasons_follow_openai() -> None:
    forced = ReplyFormat(grammar="g", calls=CallStyle.TOOLS, forced=True)
    assert renderer(forced).final_choice(0, REPLY, [], "stop")["finish_reason"] == "stop"
    assert stream(renderer(forced), REPLY)[-1]["finish_reason"] == "stop"
    tools = ReplyFormat(grammar="g", calls=CallStyle.TOOLS)
    assert renderer(tools).final_choice(0, "No call.", [], "stop")["finish_reason"] == "stop"
    cut = renderer(tools).final_choice(0, REPLY[:30], [], "length")
    assert cut["finish_reason"] == "length" and "tool_calls" not in cut["message"]


def test_legacy_function_call_shapes() -> None:
    functions = ReplyFormat(grammar="g", calls=CallStyle.FUNCTIONS)
    chunks = stream(renderer(functions), REPLY)
    calls = [c["delta"]["function_call"] for c in chunks if "function_call" in c["delta"]]
    assert calls[0] == {"name": "get_weather", "arguments": ""}
    assert all(set(c) == {"arguments"} for c in calls[1:])
    assert chunks[-1]["finish_reason"] == "function_call"
    message = renderer(functions).final_choice(0, REPLY, [], "stop")["message"]
    assert "tool_calls" not in message
    assert message["function_call"]["arguments"] == "".join(c["arguments"] for c in calls)


def test_logprobs_cover_only_content() -> None:
    tools = ReplyFormat(grammar="g", calls=CallStyle.TOOLS)
    chunks = stream(renderer(tools, want_logprobs=True), REPLY)
    streamed = [e["token"] for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
    assert "".join(streamed) == "Sure."
    assert all(c["logprobs"] is None for c in chunks if "content" not in c["delta"])
    entries = [TokenLogprob(ord(c), -0.5) for c in REPLY]
    final = renderer(tools, want_logprobs=True).final_choice(0, REPLY, entries, "stop")
    assert "".join(e["token"] for e in final["logprobs"]["content"]) == "Sure."


def test_without_tools_the_reply_is_untouched() -> None:
    plain = renderer(ReplyFormat())
    chunks = plain.chunk_choices(Update(0, Delta(REPLY), "stop"))
    assert chunks == [{"index": 0, "delta": {"content": REPLY}, "logprobs": None, "finish_reason": "stop"}]
    assert plain.final_choice(0, REPLY, [], "stop")["message"]["content"] == REPLY
