"""Tool declarations, the tool-call grammar, and the prompt and history text the model sees."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from llmserve.structured import (
    FunctionSpec,
    ToolCallParser,
    UnsupportedSchema,
    render_tool_calls,
    render_tool_result,
    render_tools_prompt,
    tool_call_grammar,
)
from tests.test_structured_gbnf import Grammar, llama_accepts

WEATHER = FunctionSpec(
    "get_weather",
    "Current weather for a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
        "required": ["city"],
    },
)
TIME = FunctionSpec(
    "get-time",
    parameters={
        "type": "object",
        "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["zone"],
        "additionalProperties": False,
    },
    strict=True,
)
NOW = FunctionSpec("now")
FUNCTIONS = [WEATHER, TIME, NOW]

PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CET = '<tool_call>{"name": "get-time", "arguments": {"zone": "CET"}}</tool_call>'


def grammar(choice: str, *, parallel: bool = True) -> Grammar:
    text = tool_call_grammar(FUNCTIONS, choice=choice, parallel=parallel)
    assert text is not None and llama_accepts(text)
    return Grammar(text)


def test_required_allows_only_calls_of_declared_functions_with_valid_arguments() -> None:
    required = grammar("required")
    assert required.matches(PARIS)
    assert required.matches(PARIS + "\n" + CET + "\n")
    assert required.matches('<tool_call>{"name": "now", "arguments": {}}</tool_call>')
    assert not required.matches("")
    assert not required.matches("Sure. " + PARIS)
    assert not required.matches(PARIS + "\nDone.")
    assert not required.matches(PARIS.replace("get_weather", "get_wind"))
    assert not required.matches(PARIS.replace('"city"', '"town"'))
    assert not required.matches(CET.replace("CET", "cet"))
    assert not required.matches(PARIS.replace('{"name', '{"arguments": {}, "name'))


def test_without_parallel_there_is_one_call() -> None:
    single = grammar("required", parallel=False)
    assert single.matches(PARIS + "\n")
    assert not single.matches(PARIS + CET)


def test_a_named_choice_allows_only_that_function() -> None:
    named = grammar("get-time")
    assert named.matches(CET)
    assert not named.matches(PARIS)


def test_auto_allows_text_or_text_then_calls_but_no_stray_marker() -> None:
    auto = grammar("auto")
    for text in ["", "Paris is sunny.", "a <tool> or <tool_cal", PARIS, "Let me look.\n" + PARIS + CET]:
        assert auto.matches(text), text
    for text in ["<tool_call>", "x <tool_call> y", PARIS + " and more", "<tool_call>{}</tool_call>"]:
        assert not auto.matches(text), text


def test_none_needs_no_grammar() -> None:
    assert tool_call_grammar(FUNCTIONS, choice="none", parallel=True) is None


@pytest.mark.parametrize("choice", ["auto", "required", "get_weather"])
def test_whatever_the_grammar_generates_parses_into_valid_calls(choice: str) -> None:
    generated = grammar(choice)
    schemas = {f.name: Draft202012Validator(f.arguments_schema) for f in FUNCTIONS}
    rng = random.Random(5)
    calls = 0
    for _ in range(150):
        text = generated.sample(rng)
        parser = ToolCallParser()
        parser.feed(text)
        reply = parser.finish()
        assert reply.content is None or "<tool_call>" not in reply.content, text
        for call in reply.tool_calls:
            calls += 1
            assert choice in ("auto", "required", call["function"]["name"])
            schemas[call["function"]["name"]].validate(json.loads(call["function"]["arguments"]))
    assert calls > 50


def test_function_names_never_collide_with_grammar_rules() -> None:
    functions = [
        FunctionSpec(
            "tool", parameters={"type": "object", "properties": {"call": {"type": "integer"}}, "required": ["call"]}
        ),
        FunctionSpec(
            "prose_0",
            parameters={"type": "object", "properties": {"space": {"type": "boolean"}}, "required": ["space"]},
        ),
        FunctionSpec(
            "get_x", parameters={"type": "object", "properties": {"v": {"type": "string"}}, "required": ["v"]}
        ),
        FunctionSpec("get-x", parameters={"type": "object", "properties": {"v": {"type": "null"}}, "required": ["v"]}),
    ]
    text = tool_call_grammar(functions, choice="auto", parallel=True)
    assert text is not None and llama_accepts(text)
    generated = Grammar(text)
    assert generated.matches('<tool_call>{"name": "tool", "arguments": {"call": 3}}</tool_call>')
    assert generated.matches('<tool_call>{"name": "prose_0", "arguments": {"space": true}}</tool_call>')
    assert generated.matches('<tool_call>{"name": "get-x", "arguments": {"v": null}}</tool_call>')
    assert not generated.matches('<tool_call>{"name": "get-x", "arguments": {"v": "s"}}</tool_call>')
    assert not generated.matches('<tool_call>{"name": "get_x", "arguments": {"v": null}}</tool_call>')


def test_each_function_keeps_its_own_definitions() -> None:
    def with_item(item: dict[str, Any], name: str) -> FunctionSpec:
        return FunctionSpec(
            name,
            parameters={
                "type": "object",
                "properties": {"i": {"$ref": "#/$defs/item"}},
                "required": ["i"],
                "$defs": {"item": item},
            },
        )

    text = tool_call_grammar(
        [with_item({"type": "integer"}, "a"), with_item({"type": "string"}, "b")], choice="required", parallel=False
    )
    assert text is not None
    generated = Grammar(text)
    assert generated.matches('<tool_call>{"name": "a", "arguments": {"i": 1}}</tool_call>')
    assert generated.matches('<tool_call>{"name": "b", "arguments": {"i": "1"}}</tool_call>')
    assert not generated.matches('<tool_call>{"name": "a", "arguments": {"i": "1"}}</tool_call>')


@pytest.mark.parametrize(
    ("functions", "choice", "message"),
    [
        ([], "auto", "at least one function"),
        ([NOW, NOW], "auto", "unique"),
        ([NOW], "get_weather", "'get_weather', which is not among the declared functions"),
    ],
)
def test_bad_tool_sets_are_refused(functions: list[FunctionSpec], choice: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tool_call_grammar(functions, choice=choice, parallel=True)


@pytest.mark.parametrize(
    ("name", "parameters", "strict", "message"),
    [
        ("get weather", {"type": "object"}, False, "must be 1-64 letters"),
        ("f", {"type": "array"}, False, r"^\$: function parameters must be an object schema"),
        ("f", {"anyOf": [{"type": "object"}]}, False, r"^\$: 'anyOf' at the root of function parameters"),
        (
            "f",
            {"type": "object", "properties": {"x": {"not": {}}}},
            False,
            r"^\$\.properties\.x: 'not' is not supported",
        ),
        (
            "f",
            {"type": "object", "properties": {"x": {"type": "string"}}},
            True,
            r"^\$: strict requires 'additionalProperties'",
        ),
    ],
)
def test_bad_declarations_are_refused(name: str, parameters: dict[str, Any], strict: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        FunctionSpec(name, parameters=parameters, strict=strict)
    assert isinstance(raised.value, UnsupportedSchema) == message.startswith("^")


def test_the_prompt_lists_every_function_with_its_schema_and_the_format() -> None:
    prompt = render_tools_prompt(FUNCTIONS, "auto")
    for function in FUNCTIONS:
        assert json.dumps(function.describe(), ensure_ascii=False) in prompt
    assert '<tool_call>\n{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>' in prompt
    assert "otherwise answer in plain text" in prompt
    assert "several blocks may follow each other" in prompt
    assert "at most one block" in render_tools_prompt(FUNCTIONS, "auto", parallel=False)
    assert "You must call at least one function" in render_tools_prompt(FUNCTIONS, "required")
    assert "You must call the function get-time" in render_tools_prompt(FUNCTIONS, "get-time")
    assert "Do not call a function now" in render_tools_prompt(FUNCTIONS, "none")


def test_assistant_tool_calls_round_trip_through_the_parser() -> None:
    calls: list[dict[str, Any]] = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Köln","unit":"C"}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]
    for content in (None, "Checking both.\n"):
        text = render_tool_calls(calls, content)
        assert grammar("auto").matches(text)
        parser = ToolCallParser()
        parser.feed(text)
        reply = parser.finish()
        assert reply.content == (content.strip() if content else None)
        assert [c["function"]["name"] for c in reply.tool_calls] == ["get_weather", "now"]
        parsed = [json.loads(c["function"]["arguments"]) for c in reply.tool_calls]
        assert parsed == [json.loads(c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize("arguments", ["[1]", "{", None, '"x"'])
def test_tool_calls_whose_arguments_are_not_an_object_are_refused(arguments: Any) -> None:
    with pytest.raises(ValueError, match="tool call 0 needs"):
        render_tool_calls([{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}])


def test_tool_results_round_trip() -> None:
    content = 'line one\n{"temp": 21, "note": "it\'s \\"warm\\""}'
    text = render_tool_result("get_weather", content)
    assert text.startswith("<tool_response>\n") and text.endswith("\n</tool_response>")
    assert json.loads(text.splitlines()[1]) == {"name": "get_weather", "content": content}
