"""Request models for the OpenAI endpoints.

Unknown parameters are refused (as the OpenAI API does) rather than silently ignored, and parameters
that exist in the API but are not supported here are refused by name.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, WithJsonSchema, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
# Each is matched against the text of every token on the hub; OpenAI documents no length.
MAX_STOP_LENGTH = 1024
MAX_TOOLS = 128  # as the OpenAI API allows
MAX_INPUTS = 2048  # prompts or embedding inputs in one request, as OpenAI allows for embeddings
MAX_MESSAGES = 2048
MAX_LOGIT_BIAS = 1024  # entries, each applied per token
TOKEN_ID = re.compile(r"[0-9]{1,9}")


class StrictModel(BaseModel):
    """Unknown fields and values of the wrong JSON type are refused, as the OpenAI API refuses them."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


def _check_token_list(value: list[Any], what: str) -> list[int]:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"{what} must hold only integer token ids")
    return value


def _inputs_schema(text: dict[str, Any]) -> WithJsonSchema:
    """The JSON Schema of a prompt or embedding input, which validators below parse by hand."""
    tokens = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    return WithJsonSchema(
        {
            "anyOf": [
                text,
                {"type": "array", "items": text, "minItems": 1, "maxItems": MAX_INPUTS},
                tokens,
                {"type": "array", "items": tokens, "minItems": 1, "maxItems": MAX_INPUTS},
            ]
        }
    )


TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
    "additionalProperties": False,
}
MessageContent = Annotated[
    str | None,
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}, {"type": "null"}]}),
]
RequiredContent = Annotated[str, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]})]


def _prompt_list(value: Any) -> list[str | list[int]]:
    """Accept a string, strings, a token list or token lists; return a list of prompts."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and len(value) > MAX_INPUTS and not all(isinstance(p, int) for p in value):
        raise ValueError(f"at most {MAX_INPUTS} inputs are allowed in one request, got {len(value)}")
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in value):
            return [value]
        if all(isinstance(p, list) for p in value):
            return [_check_token_list(p, "each token list") for p in value]
    raise ValueError("must be a string, a list of strings, a list of token ids, or a list of token id lists")


class GenerationRequest(StrictModel):
    """Parameters shared by completions and chat completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions beyond the OpenAI API, as llama.cpp's servers offer them.
    top_k: int = Field(0, ge=0, le=100_000)
    min_p: float = Field(0.0, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0, le=10)

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"each stop sequence may be at most {MAX_STOP_LENGTH} characters long")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(value)}")
        for token, bias in (value or {}).items():
            if not TOKEN_ID.fullmatch(token):
                raise ValueError(f"keys must be token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {token} must be between -100 and 100, got {bias!r}")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    prompt: Annotated[Any, _inputs_schema({"type": "string"})]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: None = Field(None, description="Fill-in-the-middle is not supported.")
    best_of: Literal[1] | None = Field(None, description="Only best_of=1 is supported.")

    @field_validator("prompt")
    @classmethod
    def _prompt_shapes(cls, value: Any) -> list[str | list[int]]:
        return _prompt_list(value)


class FunctionDefinition(StrictModel):
    """A function the model may call; its name and parameters are checked where the grammar is built."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


def _choice_kind(value: Any) -> str:
    """Which form a tool_choice takes. The tags hold a '-' so that error locations leave them out."""
    return "choice-mode" if isinstance(value, str) else "choice-function"


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("choice-mode")]
    | Annotated[NamedToolChoice, Tag("choice-function")],
    Discriminator(_choice_kind),
]
FunctionChoice = Annotated[
    Annotated[Literal["none", "auto"], Tag("choice-mode")] | Annotated[FunctionName, Tag("choice-function")],
    Discriminator(_choice_kind),
]


class FunctionCall(StrictModel):
    name: str
    arguments: str


class ToolCall(StrictModel):
    id: str = Field(min_length=1)
    type: Literal["function"]
    function: FunctionCall


class _Message(StrictModel):
    """What every chat message may hold. Content given as parts becomes the concatenation of its text parts."""

    content: MessageContent
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for number, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"part {number} has type {kind!r}; only 'text' parts are supported")
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ValueError(f"part {number} must be {{'type': 'text', 'text': <string>}}")
            texts.append(part["text"])
        return "".join(texts)


class SystemMessage(_Message):
    role: Literal["system"]
    content: RequiredContent


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: RequiredContent


class UserMessage(_Message):
    role: Literal["user"]
    content: RequiredContent


class ToolMessage(_Message):
    role: Literal["tool"]
    content: RequiredContent
    tool_call_id: str = Field(min_length=1)


class FunctionMessage(_Message):
    role: Literal["function"]
    content: MessageContent
    name: str = Field(min_length=1)


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: MessageContent = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    refusal: str | None = None  # sent back by clients that replay a response's message as they got it

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls and self.function_call is None and self.refusal is None:
            raise ValueError("an assistant message needs content, tool_calls, function_call or refusal")
        return self


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _message_kind(value: Any) -> str | None:
    """Which message a value is, by its role; tags hold a '-' so that error locations leave them out."""
    role = value.get("role") if isinstance(value, dict) else None
    return f"message-{role}" if role in ROLES else None


ChatMessage = Annotated[
    Annotated[SystemMessage, Tag("message-system")]
    | Annotated[DeveloperMessage, Tag("message-developer")]
    | Annotated[UserMessage, Tag("message-user")]
    | Annotated[AssistantMessage, Tag("message-assistant")]
    | Annotated[ToolMessage, Tag("message-tool")]
    | Annotated[FunctionMessage, Tag("message-function")],
    Discriminator(
        _message_kind,
        custom_error_type="invalid_role",
        custom_error_message="each message needs a 'role': one of " + ", ".join(repr(r) for r in ROLES),
        custom_error_context={"discriminator": "role"},  # the parameter an error names (errors.py)
    ),
]


class JSONSchemaFormat(StrictModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with, and only allowed with, the type json_schema")
        return self


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # The deprecated form of tools: one call at most, returned as message.function_call.
    functions: list[FunctionDefinition] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    function_call: FunctionChoice | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprob_options(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("set max_tokens or max_completion_tokens, not both")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(StrictModel):
    model: str = Field(min_length=1)
    input: Annotated[Any, _inputs_schema({"type": "string", "minLength": 1})]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _input_shapes(cls, value: Any) -> list[str | list[int]]:
        prompts = _prompt_list(value)
        if any(isinstance(p, str) and not p for p in prompts):
            raise ValueError("inputs must not be empty strings")
        return prompts
