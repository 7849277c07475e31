"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from llmserve.api.request import build_choices, new_id, parse_body, respond
from llmserve.api.runner import Update
from llmserve.api.schemas import ChatCompletionRequest
from llmserve.chat_format import Message
from llmserve.engine.jobs import TokenLogprob
from llmserve.engine.llama_model import Vocabulary
from llmserve.service import current_service

blueprint = Blueprint("chat", __name__)

# The developer role is the newer name of the system role.
ROLE_ALIASES = {"developer": "system"}


class ChatRenderer:
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, vocab: Vocabulary, choices: int, want_logprobs: bool) -> None:
        self._vocab = vocab
        self._choices = choices
        self._want_logprobs = want_logprobs

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

    def chunk_choice(self, update: Update) -> dict[str, Any]:
        delta = {"content": update.delta.text} if update.delta.text else {}
        return {
            "index": update.index,
            "delta": delta,
            "logprobs": self._logprobs(update.delta.logprobs) if update.delta.logprobs else None,
            "finish_reason": update.finish_reason,
        }

    def final_choice(self, index: int, text: str, logprobs: list[Any], finish_reason: str) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": self._logprobs(logprobs),
            "finish_reason": finish_reason,
        }


@blueprint.post("/v1/chat/completions")
def create_chat_completion() -> Response:
    body = parse_body(ChatCompletionRequest)
    service = current_service()
    service.require_model(body.model)
    messages = [Message(ROLE_ALIASES.get(m.role, m.role), m.content or "") for m in body.messages]
    prompt = service.tokenize(service.render_chat(messages), add_special=False)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    choices = build_choices(
        service,
        body,
        [tuple(prompt)],
        requested=body.output_limit,
        default_max_tokens=None,
        top_logprobs=top_logprobs,
    )
    renderer = ChatRenderer(service.vocab, len(choices), body.logprobs)
    return respond(service, body, choices, renderer, new_id("chatcmpl"))
