"""Function calling for models without a tool format of their own: declarations, grammar and prompt text.

The generic format (the one Hermes-style and Qwen models are trained on, so a GGUF that knows it writes
it unprompted) is one block per call, the name first so that a stream can announce the call before its
arguments are complete::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Several calls follow each other, separated by at most one newline, and the calls end the reply. The
model sees tool results as::

    <tool_response>
    {"name": "get_weather", "content": "21 C, sunny"}
    </tool_response>

``tool_call_grammar`` constrains generation to this format: each call names a declared function and its
arguments match that function's parameter schema. For ``tool_choice`` "auto" the grammar is
``root ::= prose tool-calls?``, where ``prose`` is any text that does not contain ``<tool_call>`` (one
rule per matched prefix of the marker, as in a string-search automaton). So the model either answers in
text, or writes some text and then calls; once it writes the marker, the call must be well-formed. That
is the language a lazy grammar triggered by the marker would give; a plain grammar keeps the engine to
one kind of sampler. Text after the calls is not allowed, in any mode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmserve.structured.schema import GrammarBuilder, UnsupportedSchema, check_schema, prepare

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
RESULT_OPEN = "<tool_response>"
RESULT_CLOSE = "</tool_response>"
# tool_choice values that are modes; any other value names a function.
MODES = ("none", "auto", "required")
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Keywords that would make the arguments something other than one object with properties.
_ROOT_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf", "enum", "const")


@dataclass(frozen=True)
class FunctionSpec:
    """A function the model may call: what the prompt shows, and the schema its arguments are held to."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False

    def __post_init__(self) -> None:
        if not FUNCTION_NAME.fullmatch(self.name):
            raise ValueError(f"function name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        if not isinstance(self.parameters, Mapping) or self.parameters.get("type", "object") != "object":
            raise UnsupportedSchema("$: function parameters must be an object schema ('type': 'object')")
        if combinators := [k for k in _ROOT_COMBINATORS if k in self.parameters]:
            raise UnsupportedSchema(f"$: {combinators[0]!r} at the root of function parameters is not supported")
        check_schema(self.arguments_schema, strict=self.strict)

    @property
    def arguments_schema(self) -> dict[str, Any]:
        """The parameters with their implied ``"type": "object"`` made explicit: arguments are an object."""
        return {**self.parameters, "type": "object"}

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"name": self.name}
        if self.description:
            described["description"] = self.description
        return {**described, "parameters": dict(self.parameters)}


def _chosen(functions: Sequence[FunctionSpec], choice: str) -> Sequence[FunctionSpec]:
    """The functions ``choice`` allows; ValueError for no functions, duplicates or an unknown name."""
    names = [f.name for f in functions]
    if not names:
        raise ValueError("tools must declare at least one function")
    if len(set(names)) != len(names):
        raise ValueError("function names must be unique")
    if choice in MODES:
        return functions
    if choice not in names:
        raise ValueError(f"tool_choice names {choice!r}, which is not among the declared functions")
    return [functions[names.index(choice)]]


def _code(char: str) -> str:
    return f"\\x{ord(char):02X}" if ord(char) < 0x100 else f"\\u{ord(char):04X}"


def _text_without(builder: GrammarBuilder, marker: str) -> str:
    """Rules for any text that does not contain ``marker``; returns the starting rule's name.

    Rule k stands for "the text so far ends with the first k characters of the marker": each character
    moves to the state a string-search automaton would reach, and the state len(marker) is left out.
    """
    states = [builder.reserve(f"prose-{k}") for k in range(len(marker))]
    others = "[^" + "".join(_code(c) for c in sorted(set(marker))) + "]"
    for k, state in enumerate(states):
        moves = [f"{others} {states[0]}"]
        for char in sorted(set(marker)):
            seen = marker[:k] + char
            target = next(n for n in range(len(seen), -1, -1) if marker.startswith(seen[len(seen) - n :]))
            if target < len(marker):
                moves.append(f"{builder.literal(char)} {states[target]}")
        builder.define(state, "( " + " | ".join(moves) + " )?")
    return states[0]


def tool_call_grammar(functions: Sequence[FunctionSpec], *, choice: str, parallel: bool) -> str | None:
    """GBNF for the reply when tools are offered; None for ``choice`` "none" (no constraint).

    ``choice`` is "auto" (text or calls), "required" (one or more calls) or a function's name (calls of
    that function); ``parallel`` allows several calls in one reply.
    """
    if choice == "none":
        return None
    builder = GrammarBuilder()
    alternatives = []
    for number, function in enumerate(_chosen(functions, choice)):
        prepared = prepare(function.arguments_schema, strict=False, scope=f"tools/{number}")
        arguments = builder.add_schema(prepared, f"{function.name}-arguments")
        alternatives.append(
            builder.rule(
                f"{function.name}-call",
                f'{builder.literal(json.dumps(function.name))} space "," space '
                f"{builder.literal(json.dumps('arguments'))} space "
                f'":" space {arguments}',
            )
        )
    newline = f"{builder.literal(chr(10))}?"
    call = builder.rule(
        "tool-call",
        f"{builder.literal(CALL_OPEN)} {newline} "
        f'"{{" space {builder.literal(json.dumps("name"))} space ":" space ( {" | ".join(alternatives)} ) "}}" space '
        f"{newline} {builder.literal(CALL_CLOSE)}",
    )
    calls = builder.rule("tool-calls", f"{call} ( {newline} {call} )* {newline}" if parallel else f"{call} {newline}")
    builder.define("root", f"{_text_without(builder, CALL_OPEN)} {calls}?" if choice == "auto" else calls)
    return builder.text()


_CHOICE_LINES = {
    "none": "Do not call a function now: answer in plain text.",
    "auto": "Call functions only when they help; otherwise answer in plain text, without any block.",
    "required": "You must call at least one function: start your reply with a block.",
}


def render_tools_prompt(functions: Sequence[FunctionSpec], choice: str, *, parallel: bool = True) -> str:
    """System-prompt text that lists the functions (with their JSON Schemas) and the exact call format."""
    chosen = _chosen(functions, choice)
    listed = "\n".join(json.dumps(f.describe(), ensure_ascii=False) for f in functions)
    count = (
        "Write one block per call; several blocks may follow each other. Write nothing after the last block."
        if parallel
        else "Write at most one block, and nothing after it."
    )
    must = _CHOICE_LINES.get(choice) or f"You must call the function {chosen[0].name}: start your reply with a block."
    return (
        "You can call functions. Each one is described by a JSON object with its name, what it does, and its "
        "parameters as a JSON Schema:\n"
        f"{listed}\n\n"
        "To call a function, write a block in exactly this form, with its arguments as a JSON object:\n"
        f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n{CALL_CLOSE}\n'
        f"{count}\n{must}\n\n"
        "The results come back in the next message, one block per call, in the order of the calls:\n"
        f'{RESULT_OPEN}\n{{"name": "<function name>", "content": "<the result>"}}\n{RESULT_CLOSE}'
    )


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]], content: str | None = None) -> str:
    """An assistant message with ``tool_calls`` (OpenAI's shape) as the text the model would have written.

    ValueError when a call's arguments are not a JSON object: the model must never see that as an example.
    """
    blocks = []
    for number, call in enumerate(tool_calls):
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments", ""))
        except (TypeError, json.JSONDecodeError):
            arguments = None
        if not isinstance(function.get("name"), str) or not isinstance(arguments, dict):
            raise ValueError(f"tool call {number} needs a function name and arguments that are a JSON object")
        block = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
        blocks.append(f"{CALL_OPEN}\n{block}\n{CALL_CLOSE}")
    lead = content.rstrip() + "\n" if content and content.strip() else ""
    return lead + "\n".join(blocks)


def render_tool_result(name: str, content: str) -> str:
    """A tool message's content as the model sees it; consecutive results belong in one user turn."""
    return f"{RESULT_OPEN}\n{json.dumps({'name': name, 'content': content}, ensure_ascii=False)}\n{RESULT_CLOSE}"
