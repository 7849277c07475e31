"""POST /v1/chat/completions."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response

from llmserve.api.chat_tools import CallStyle, ReplyFormat, chat_messages, reply_format
from llmserve.api.openapi import EVENT_STREAM, GENERATION_ERRORS, JSON, Operation, documented
from llmserve.api.request import answer, build_choices, new_id, off_hub_if_large, parse_body, respond
from llmserve.api.runner import Update
from llmserve.api.schemas import ChatCompletionRequest
from llmserve.chat_format import Message
from llmserve.engine.jobs import TokenLogprob
from llmserve.engine.llama_model import Vocabulary
from llmserve.models.served import ServedModel, off_hub
from llmserve.structured import ToolCallParser

blueprint = Blueprint("chat", __name__)


class ContentLogprobs:
    """The logprobs of one choice's tokens whose text became content, kept in step with a parser's deltas.

    The parser holds text back while it may start a call, and text that turns out to belong to a call
    (or is the whitespace before one) is not content: its tokens get no logprobs, as with OpenAI.
    """

    def __init__(self, piece: Callable[[int], bytes]) -> None:
        self._piece = piece
        self._held: deque[TokenLogprob] = deque()
        self._owed = 0  # bytes of the last token taken that belong to the text after its delta

    def add(self, entries: list[TokenLogprob]) -> None:
        self._held.extend(entries)

    def take(self, delta: dict[str, Any]) -> list[TokenLogprob]:
        """The entries for a content delta's text; for a call's delta none, and the held ones are dropped."""
        if "content" not in delta:
            self._held.clear()
            self._owed = 0
            return []
        wanted = len(delta["content"].encode()) - self._owed
        taken = []
        while self._held and wanted > 0:
            taken.append(self._held.popleft())
            wanted -= len(self._piece(taken[-1].token))
        self._owed = max(0, -wanted)
        return taken


class ChatRenderer:
    """Chat responses; with tools, each choice's text is read as content and calls (``ToolCallParser``)."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, vocab: Vocabulary, choices: int, want_logprobs: bool, reply: ReplyFormat) -> None:
        self._vocab = vocab
        self._choices = choices
        self._want_logprobs = want_logprobs
        self._reply = reply
        self.reported_finish_reasons: dict[int, str] = {}
        calls = reply.calls is not None
        self._parsers = [ToolCallParser() for _ in range(choices)] if calls else []
        self._content_logprobs = [ContentLogprobs(vocab.piece) for _ in range(choices)] if calls else []

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self._vocab.piece(token)
        return {"token": self._vocab.token_text(token), "logprob": logprob, "bytes": list(piece)}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self._want_logprobs:
            return None
        return {
            "content": [
                {**self._entry(e.token, e.logprob), "top_logprobs": [self._entry(t, lp) for t, lp in e.top]}
                for e in entries
            ],
            "refusal": None,
        }

    def opening_chunks(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(self._choices)
        ]

    def chunk_choices(self, update: Update) -> list[dict[str, Any]]:
        if self._reply.calls is None:
            delta = {"content": update.delta.text} if update.delta.text else {}
            logprobs = self._logprobs(update.delta.logprobs) if update.delta.logprobs else None
            return [_chunk(update.index, delta, logprobs, update.finish_reason)]
        parser, content_logprobs = self._parsers[update.index], self._content_logprobs[update.index]
        content_logprobs.add(update.delta.logprobs)
        deltas = parser.feed(update.delta.text) if update.delta.text else []
        reply = parser.finish() if update.finish_reason is not None else None
        if reply is not None:
            deltas += reply.deltas
        chunks = []
        for delta in deltas:
            entries = content_logprobs.take(delta)
            chunks.append(_chunk(update.index, self._delta(delta), self._logprobs(entries) if entries else None))
        if reply is not None and update.finish_reason is not None:
            reason = self._finish_reason(update.index, update.finish_reason, reply.tool_calls)
            chunks.append(_chunk(update.index, {}, None, reason))
        return chunks

    def final_choice(self, index: int, text: str, logprobs: list[Any], finish_reason: str) -> dict[str, Any]:
        if self._reply.calls is None:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            return _choice(index, message, self._logprobs(logprobs), finish_reason)
        parser, content_logprobs = ToolCallParser(), ContentLogprobs(self._vocab.piece)
        content_logprobs.add(logprobs)
        deltas = parser.feed(text)
        reply = parser.finish()
        entries = [entry for delta in deltas + reply.deltas for entry in content_logprobs.take(delta)]
        message = {"role": "assistant", "content": reply.content, "refusal": None}
        if reply.tool_calls and self._reply.calls is CallStyle.FUNCTIONS:
            message["function_call"] = reply.tool_calls[0]["function"]  # the grammar allows one call only
        elif reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
        reason = self._finish_reason(index, finish_reason, reply.tool_calls)
        return _choice(index, message, self._logprobs(entries), reason)

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        """A parser delta as this request streams it: legacy functions stream ``function_call`` deltas."""
        if self._reply.calls is CallStyle.FUNCTIONS and "tool_calls" in delta:
            return {"function_call": dict(delta["tool_calls"][0]["function"])}
        return delta

    def _finish_reason(self, index: int, reason: str, calls: list[dict[str, Any]]) -> str:
        """A reply that ended in calls finishes with "tool_calls" ("function_call"), except when a named
        function was forced: OpenAI then answers "stop"."""
        if reason == "stop" and calls and not self._reply.forced and self._reply.calls is not None:
            self.reported_finish_reasons[index] = self._reply.calls.value
            return self._reply.calls.value
        return reason


def _chunk(index: int, delta: dict[str, Any], logprobs: Any, finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _choice(index: int, message: dict[str, Any], logprobs: Any, finish_reason: str) -> dict[str, Any]:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


@blueprint.post("/v1/chat/completions")
@documented(
    Operation(
        "Create a chat completion",
        body=ChatCompletionRequest,
        errors=GENERATION_ERRORS,
        media=(JSON, EVENT_STREAM),
    )
)
def create_chat_completion() -> Response:
    body = parse_body(ChatCompletionRequest)
    # Tools and schemas are checked before any model work; turning a schema into a grammar may take a
    # CPU-bound fraction of a second (number bounds and multiples), so it never runs on the hub.
    declares_schemas = bool(body.tools or body.functions or body.response_format)
    reply = off_hub(reply_format, body) if declares_schemas else reply_format(body)
    messages = chat_messages(body.messages, reply.tools_prompt)
    return answer(body.model, body.user, lambda model: _chat(model, body, reply, messages))


def _chat(model: ServedModel, body: ChatCompletionRequest, reply: ReplyFormat, messages: list[Message]) -> Response:
    prompt = model.tokenize(off_hub_if_large(model.render_chat, messages), add_special=False)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    choices = build_choices(
        model,
        body,
        [tuple(prompt)],
        requested=body.output_limit,
        default_max_tokens=None,
        top_logprobs=top_logprobs,
        grammar=reply.grammar,
    )
    renderer = ChatRenderer(model.vocab, len(choices), body.logprobs, reply)
    return respond(model, body, choices, renderer, new_id("chatcmpl"))
