"""Function calling and structured outputs through the official ``openai`` client, on the real model.

The embedded model is a small base model: what it chooses to call, and with which values, is not judged
here. What is judged is that every call names a declared function with arguments valid against its
schema, that every structured reply validates, and that the protocol has OpenAI's shape, streamed or not.
Schemas bound their strings so that a reply ends well within ``max_tokens``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest
from jsonschema import Draft202012Validator

from tests.integration.conftest import MODEL, NO_EOS
from tests.integration.test_concurrency import run_together

pytestmark = pytest.mark.slow

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER_PARAMETERS,
            "strict": True,
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "description": "The time in a time zone.", "parameters": TIME_PARAMETERS},
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 120}


def assert_valid_call(call: Any, names: tuple[str, ...] = tuple(SCHEMAS)) -> dict[str, Any]:
    """A call in OpenAI's shape, naming a declared function with schema-valid arguments; its arguments."""
    assert call.type == "function"
    assert call.id.startswith("call_") and len(call.id) == 29
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    Draft202012Validator(SCHEMAS[call.function.name]).validate(arguments)
    return dict(arguments)


def test_a_forced_function_is_called_with_valid_arguments(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        **GREEDY,
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop"  # what OpenAI answers for a forced named function
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0], ("get_weather",))


def test_required_calls_one_declared_function(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        **GREEDY,
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0])


def test_auto_answers_in_text_or_with_valid_calls(client: openai.OpenAI) -> None:
    for seed in range(3):
        result = client.chat.completions.create(
            messages=ASK,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            **{**GREEDY, "temperature": 1.0, "seed": seed, "max_tokens": 48},
        )
        choice = result.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            for call in choice.message.tool_calls:
                assert_valid_call(call)
        else:
            assert choice.finish_reason in ("stop", "length")
            assert isinstance(choice.message.content, str)


def cache_prompt(client: openai.OpenAI, request: dict[str, Any]) -> None:
    """Put the request's prompt into the prefix cache, so that the replies compared both start from it.

    A prompt decoded whole and one found in the cache get slightly different logits (llama.cpp's kernels
    depend on the batch's shape), enough to break the model's near-ties between letters of a time zone
    differently."""
    client.chat.completions.create(**{**request, "max_tokens": 1})


def streamed_reply(client: openai.OpenAI, request: dict[str, Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """Content, calls (reassembled from their deltas as clients do) and finish reason of a streamed reply."""
    content, calls, reasons = [], {}, []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
            content.append(choice.delta.content or "")
            for delta in choice.delta.tool_calls or []:
                if delta.index not in calls:
                    assert delta.id and delta.type == "function" and delta.function and delta.function.name
                    assert delta.function.arguments == ""
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.function and delta.function.name is None
                    assert delta.function.arguments
                    calls[delta.index]["arguments"] += delta.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    assert len(reasons) == 1
    return "".join(content), [calls[i] for i in sorted(calls)], reasons[0]


@pytest.mark.parametrize("parallel", [False, True])
def test_streamed_calls_reassemble_into_the_unstreamed_reply(client: openai.OpenAI, parallel: bool) -> None:
    """With parallel calls the small model keeps calling until max_tokens: the call cut short is in both,
    with the arguments it got (finish_reason "length"), and no call markup is ever content."""
    request = {**GREEDY, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": parallel}
    cache_prompt(client, request)
    whole = client.chat.completions.create(**request).choices[0]
    content, calls, reason = streamed_reply(client, request)
    assert reason == whole.finish_reason
    assert whole.message.tool_calls is not None
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]
    assert len({c["id"] for c in calls}) == len(calls)
    assert content == (whole.message.content or "")
    assert "<tool_call>" not in content
    if not parallel:
        assert reason == "tool_calls" and len(calls) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_called_exactly_once(client: openai.OpenAI, stream: bool) -> None:
    """parallel_tool_calls left at its default: OpenAI still returns exactly one call of a named function,
    with content null."""
    request = {
        **GREEDY,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 80,
    }
    if stream:
        content, calls, reason = streamed_reply(client, request)
        assert (content, reason, len(calls)) == ("", "stop", 1)
        Draft202012Validator(SCHEMAS["get_weather"]).validate(json.loads(calls[0]["arguments"]))
        return
    choice = client.chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    assert_valid_call(choice.message.tool_calls[0], ("get_weather",))


def test_a_call_cut_by_max_tokens_keeps_its_partial_arguments(client: openai.OpenAI) -> None:
    request = {**GREEDY, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 20}
    choice = client.chat.completions.create(**request).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name in SCHEMAS


def test_parallel_calls_have_distinct_ids_and_valid_arguments(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        messages=[{"role": "user", "content": "Weather in Paris, Rome and Oslo, please."}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        **{**GREEDY, "max_tokens": 160},
    )
    choice = result.choices[0]
    assert choice.message.tool_calls
    assert choice.finish_reason in ("tool_calls", "length")
    assert len({call.id for call in choice.message.tool_calls}) == len(choice.message.tool_calls)
    whole = choice.message.tool_calls[:-1] if choice.finish_reason == "length" else choice.message.tool_calls
    for call in whole:  # a last call cut by max_tokens has the arguments it got, incomplete
        assert_valid_call(call)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 7, "n": 2}])
def test_strict_json_schema_output_validates(client: openai.OpenAI, sampling: dict[str, Any]) -> None:
    result = client.chat.completions.create(
        messages=[{"role": "user", "content": "Invent a user of a web site."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        **{**GREEDY, **sampling},
    )
    assert len(result.choices) == sampling.get("n", 1)
    for choice in result.choices:
        assert choice.finish_reason == "stop"
        assert choice.message.content is not None
        Draft202012Validator(PERSON).validate(json.loads(choice.message.content))


def test_strict_bounds_and_multiples_hold_in_sampled_output(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "team_size": {"type": "integer", "multipleOf": 5},
            "rating": {"type": "integer", "minimum": 1, "maximum": 10, "multipleOf": 3},
            # Steps a binary float holds exactly, so that the float arithmetic of the validator agrees.
            "price": {"type": "number", "minimum": 0.5, "multipleOf": 0.25},
            "share": {"type": ["number", "null"], "exclusiveMinimum": 0.1, "maximum": 99.99},
        },
        "required": ["confidence", "team_size", "rating", "price", "share"],
        "additionalProperties": False,
    }
    result = client.chat.completions.create(
        messages=[{"role": "user", "content": "Rate a restaurant."}],
        response_format={"type": "json_schema", "json_schema": {"name": "rating", "schema": schema, "strict": True}},
        **{**GREEDY, "temperature": 1.0, "seed": 3, "n": 3},
    )
    for choice in result.choices:
        assert choice.finish_reason == "stop"
        Draft202012Validator(schema).validate(json.loads(choice.message.content or ""))


def test_json_object_output_is_an_object(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        messages=[{"role": "user", "content": 'Reply in JSON with one key, "answer": what is 2 + 2?'}],
        response_format={"type": "json_object"},
        **GREEDY,
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content or ""), dict)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        (
            {"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools[1].function.parameters",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_unusable_tools_and_schemas_are_refused_by_parameter(
    client: openai.OpenAI, options: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(messages=ASK, **GREEDY, **options)  # type: ignore[arg-type]
    assert raised.value.param == param


def test_a_history_of_calls_and_results_continues(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **GREEDY,
    )
    message = first.choices[0].message
    assert message.tool_calls
    results = [
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}
        for call in message.tool_calls
    ]
    # The client sends the returned message back as it got it.
    second = client.chat.completions.create(
        messages=[*ASK, message, *results],  # type: ignore[list-item]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        **{**GREEDY, "max_tokens": 16},
    )
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_legacy_functions(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        **GREEDY,
        "messages": ASK,
        "functions": [tool["function"] for tool in TOOLS],
        "function_call": {"name": "get_time"},
    }
    cache_prompt(client, request)
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "stop"
    assert whole.message.tool_calls is None and whole.message.function_call is not None
    assert whole.message.function_call.name == "get_time"
    Draft202012Validator(TIME_PARAMETERS).validate(json.loads(whole.message.function_call.arguments))

    name, arguments, reasons = None, "", []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            assert choice.delta.tool_calls is None
            if choice.delta.function_call is not None:
                if name is None:
                    name = choice.delta.function_call.name
                    assert choice.delta.function_call.arguments == ""
                else:
                    arguments += choice.delta.function_call.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert (name, arguments, reasons) == ("get_time", whole.message.function_call.arguments, ["stop"])


def test_a_schema_request_and_a_plain_one_run_together(client: openai.OpenAI) -> None:
    """Each sequence of a batch has its own grammar, or none."""
    plain = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "temperature": 0, "max_tokens": 24}
    plain["logit_bias"] = NO_EOS
    alone = client.completions.create(**plain).choices[0].text
    structured = {
        **GREEDY,
        "messages": [{"role": "user", "content": "Invent a user of a web site."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    }
    jobs: dict[str, Callable[[], Any]] = {
        "plain": lambda: client.completions.create(**plain).choices[0].text,
        "schema": lambda: client.chat.completions.create(**structured).choices[0].message.content,
        "schema-again": lambda: client.chat.completions.create(**structured).choices[0].message.content,
    }
    results = run_together(jobs)
    assert results["plain"] == alone
    for name in ("schema", "schema-again"):
        Draft202012Validator(PERSON).validate(json.loads(results[name]))
