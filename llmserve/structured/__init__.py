"""Structured outputs and function calling: JSON Schema grammars, the tool-call format, and its parser."""

from llmserve.structured.schema import JSON_OBJECT_GRAMMAR, UnsupportedSchema, check_schema, schema_grammar
from llmserve.structured.tool_parser import ParsedReply, ToolCallParser, new_call_id
from llmserve.structured.tools import (
    CALL_CLOSE,
    CALL_OPEN,
    FunctionSpec,
    render_tool_calls,
    render_tool_result,
    render_tools_prompt,
    tool_call_grammar,
)

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "JSON_OBJECT_GRAMMAR",
    "FunctionSpec",
    "ParsedReply",
    "ToolCallParser",
    "UnsupportedSchema",
    "check_schema",
    "new_call_id",
    "render_tool_calls",
    "render_tool_result",
    "render_tools_prompt",
    "schema_grammar",
    "tool_call_grammar",
]
