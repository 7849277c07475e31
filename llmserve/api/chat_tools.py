"""What a chat request's tools and ``response_format`` ask of its reply, and its history in the tool format.

Everything here is checked before any model work, so a bad tool definition or schema is a 400 naming the
parameter. ``reply_format`` decides the grammar the engine enforces, the text that tells the model about
its tools, and whether the reply is read back as calls; ``chat_messages`` writes earlier calls and their
results as the model would have seen them (see docs/tools.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from llmserve.api.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    FunctionDefinition,
    FunctionMessage,
    ToolMessage,
)
from llmserve.chat_format import Message
from llmserve.errors import InvalidRequest
from llmserve.structured import (
    JSON_OBJECT_GRAMMAR,
    FunctionSpec,
    UnsupportedSchema,
    check_schema,
    render_tool_calls,
    render_tool_result,
    render_tools_prompt,
    schema_grammar,
    tool_call_grammar,
)

# The developer role is the newer name of the system role.
ROLE_ALIASES = {"developer": "system"}
# A function declared without parameters takes none (as OpenAI reads it).
NO_PARAMETERS = {"type": "object", "properties": {}}
# The largest grammar a request may need (llama.cpp compiles it per choice, and matches against it
# every token): far above any real tool set or schema, far below what would cost the server seconds.
MAX_GRAMMAR_BYTES = 256 * 1024


class CallStyle(StrEnum):
    """How calls are returned: ``tools`` (``message.tool_calls``) or legacy ``functions``
    (``message.function_call``). The value is also the finish_reason of a reply that made calls."""

    TOOLS = "tool_calls"
    FUNCTIONS = "function_call"


@dataclass(frozen=True)
class ReplyFormat:
    """How one chat request constrains and reads its reply; the default is plain text."""

    grammar: str | None = None
    tools_prompt: str | None = None  # for the system message, whenever tools are declared
    calls: CallStyle | None = None  # None: the reply is only content, never parsed for calls
    forced: bool = False  # a named function was forced; OpenAI then finishes with "stop", not "tool_calls"


def reply_format(body: ChatCompletionRequest) -> ReplyFormat:
    """The reply's constraints; InvalidRequest (naming the parameter) for what cannot be honoured."""
    if body.tools is not None and body.functions is not None:
        raise InvalidRequest("Set tools or the deprecated functions, not both.", param="functions")
    if body.tools is None:
        for name, value in (("tool_choice", body.tool_choice), ("parallel_tool_calls", body.parallel_tool_calls)):
            if value is not None:
                raise InvalidRequest(f"{name} is only allowed when tools are specified.", param=name)
    if body.functions is None and body.function_call is not None:
        raise InvalidRequest("function_call is only allowed when functions are specified.", param="function_call")
    if body.tools is not None:
        declared = [(f"tools[{i}].function", tool.function) for i, tool in enumerate(body.tools)]
        choice_param, style, parallel = "tool_choice", CallStyle.TOOLS, body.parallel_tool_calls is not False
        tool_choice = body.tool_choice or "auto"
        chosen = tool_choice if isinstance(tool_choice, str) else tool_choice.function.name
    elif body.functions is not None:
        declared = [(f"functions[{i}]", function) for i, function in enumerate(body.functions)]
        choice_param, style, parallel = "function_call", CallStyle.FUNCTIONS, False
        function_call = body.function_call or "auto"
        chosen = function_call if isinstance(function_call, str) else function_call.name
    else:
        return ReplyFormat(grammar=_response_grammar(body))
    declared_param = "tools" if style is CallStyle.TOOLS else "functions"
    functions = _function_specs(declared, declared_param)
    forced = chosen not in ("none", "auto", "required")
    if forced and chosen not in {f.name for f in functions}:
        raise InvalidRequest(f"{choice_param} names {chosen!r}, which is not a declared function.", param=choice_param)
    # A named function is called exactly once, as OpenAI's named tool_choice returns one call.
    parallel = parallel and not forced
    prompt = render_tools_prompt(functions, chosen, parallel=parallel)
    if chosen == "none":
        return ReplyFormat(grammar=_response_grammar(body), tools_prompt=prompt)
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequest(
            f"response_format {body.response_format.type} cannot be combined with tools that may be called; "
            f"set {choice_param} to none.",
            param="response_format",
        )
    return ReplyFormat(
        grammar=_bounded(tool_call_grammar(functions, choice=chosen, parallel=parallel), declared_param),
        tools_prompt=prompt,
        calls=style,
        forced=forced,
    )


def _bounded(grammar: str | None, param: str) -> str | None:
    if grammar is not None and len(grammar) > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(
            f"The grammar for {param} would be {len(grammar)} bytes; at most {MAX_GRAMMAR_BYTES} are supported. "
            "Simplify the schema.",
            param=param,
        )
    return grammar


def _function_specs(declared: Sequence[tuple[str, FunctionDefinition]], param: str) -> list[FunctionSpec]:
    functions = []
    for where, definition in declared:
        try:
            parameters = definition.parameters if definition.parameters is not None else NO_PARAMETERS
            functions.append(FunctionSpec(definition.name, definition.description, parameters, bool(definition.strict)))
        except UnsupportedSchema as exc:
            raise InvalidRequest(
                f"Invalid schema for function '{definition.name}': {exc}", param=f"{where}.parameters"
            ) from None
        except ValueError as exc:
            raise InvalidRequest(f"Invalid function name: {exc}.", param=f"{where}.name") from None
    names = [f.name for f in functions]
    if duplicate := next((n for n in names if names.count(n) > 1), None):
        raise InvalidRequest(f"The function {duplicate!r} is declared more than once.", param=param)
    return functions


def _response_grammar(body: ChatCompletionRequest) -> str | None:
    """The grammar for ``response_format``: none for text, any JSON object, or the given schema."""
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.json_schema is None:
        return JSON_OBJECT_GRAMMAR
    declared = response_format.json_schema
    try:
        if declared.strict:  # schema_grammar itself refuses what no schema may hold
            check_schema(declared.schema_, strict=True)
        return _bounded(schema_grammar(declared.schema_), "response_format.json_schema.schema")
    except UnsupportedSchema as exc:
        raise InvalidRequest(
            f"Invalid schema for response_format '{declared.name}': {exc}", param="response_format.json_schema.schema"
        ) from None


def chat_messages(messages: Sequence[ChatMessage], tools_prompt: str | None) -> list[Message]:
    """The conversation as the chat template gets it.

    Assistant calls are written as the model would have written them, and tool results as result blocks,
    the results that follow each other in one user turn (the model has no tool role of its own). The
    tools' description goes into the system message, whatever the tool_choice, so that a conversation
    keeps one prompt prefix from turn to turn.
    """
    rendered: list[Message] = []
    names: dict[str, str] = {}  # tool_call_id -> the function it called
    results: list[str] = []
    for number, message in enumerate(messages):
        if isinstance(message, ToolMessage | FunctionMessage):
            results.append(render_tool_result(_answered(number, message, names), message.content or ""))
            continue
        if results:
            rendered.append(Message("user", "\n".join(results)))
            results = []
        rendered.append(Message(ROLE_ALIASES.get(message.role, message.role), _content(number, message, names)))
    if results:
        rendered.append(Message("user", "\n".join(results)))
    if tools_prompt is None:
        return rendered
    if rendered and rendered[0].role == "system":
        return [Message("system", f"{rendered[0].content.rstrip()}\n\n{tools_prompt}"), *rendered[1:]]
    return [Message("system", tools_prompt), *rendered]


def _answered(number: int, message: ToolMessage | FunctionMessage, names: dict[str, str]) -> str:
    """The function whose result a tool or function message holds."""
    if isinstance(message, FunctionMessage):
        return message.name
    if message.tool_call_id not in names:
        raise InvalidRequest(
            f"messages[{number}] answers the tool call {message.tool_call_id!r}, which no earlier "
            "assistant message made.",
            param=f"messages[{number}].tool_call_id",
        )
    return names[message.tool_call_id]


def _content(number: int, message: ChatMessage, names: dict[str, str]) -> str:
    """A message's text; an assistant's calls in the tool format, remembering which function each id called."""
    if not isinstance(message, AssistantMessage):
        return message.content or ""
    if message.tool_calls:
        calls, param = [call.model_dump() for call in message.tool_calls], f"messages[{number}].tool_calls"
        names.update((call.id, call.function.name) for call in message.tool_calls)
    elif message.function_call is not None:
        calls, param = [{"function": message.function_call.model_dump()}], f"messages[{number}].function_call"
    else:
        return message.content if message.content is not None else message.refusal or ""
    try:
        return render_tool_calls(calls, message.content)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid value for '{param}': {exc}.", param=param) from None
