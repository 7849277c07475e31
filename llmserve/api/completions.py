"""POST /v1/completions: the legacy text completion API."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from llmserve.api.openapi import EVENT_STREAM, GENERATION_ERRORS, JSON, Operation, documented
from llmserve.api.request import answer, build_choices, new_id, parse_body, respond
from llmserve.api.runner import Update
from llmserve.api.schemas import CompletionRequest
from llmserve.engine.jobs import TokenLogprob
from llmserve.engine.llama_model import Vocabulary
from llmserve.errors import InvalidRequest
from llmserve.models.served import ServedModel

blueprint = Blueprint("completions", __name__)

DEFAULT_MAX_TOKENS = 16  # the OpenAI default for this endpoint


class CompletionRenderer:
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(self, vocab: Vocabulary, echoes: list[str], want_logprobs: bool) -> None:
        self._vocab = vocab
        self._echoes = echoes
        self._want_logprobs = want_logprobs
        self._offsets = [len(text) for text in echoes]
        self.reported_finish_reasons: dict[int, str] = {}

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self._want_logprobs:
            return None
        tokens, offsets = [], []
        for entry in entries:
            text = self._vocab.token_text(entry.token)
            tokens.append(text)
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{self._vocab.token_text(t): lp for t, lp in entry.top} for entry in entries],
            "text_offset": offsets,
        }

    def opening_chunks(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "text": text, "logprobs": None, "finish_reason": None}
            for i, text in enumerate(self._echoes)
            if text
        ]

    def chunk_choices(self, update: Update) -> list[dict[str, Any]]:
        return [
            {
                "index": update.index,
                "text": update.delta.text,
                "logprobs": self._logprobs(update.index, update.delta.logprobs),
                "finish_reason": update.finish_reason,
            }
        ]

    def final_choice(self, index: int, text: str, logprobs: list[Any], finish_reason: str) -> dict[str, Any]:
        return {
            "index": index,
            "text": self._echoes[index] + text,
            "logprobs": self._logprobs(index, logprobs),
            "finish_reason": finish_reason,
        }


def _tokenized_prompts(model: ServedModel, prompts: list[str | list[int]]) -> list[tuple[int, ...]]:
    vocab = model.vocab
    tokenized = []
    for number, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            tokens = model.tokenize(prompt, add_special=True)
            if not tokens:
                raise InvalidRequest("The prompt is empty.", param="prompt")
        else:
            bad = next((t for t in prompt if not vocab.is_valid(t)), None)
            if bad is not None:
                raise InvalidRequest(f"prompt {number} holds token id {bad}, outside the vocabulary", param="prompt")
            tokens = prompt
        tokenized.append(tuple(tokens))
    return tokenized


@blueprint.post("/v1/completions")
@documented(
    Operation("Create a completion", body=CompletionRequest, errors=GENERATION_ERRORS, media=(JSON, EVENT_STREAM))
)
def create_completion() -> Response:
    body = parse_body(CompletionRequest)
    if body.echo and body.logprobs is not None:
        raise InvalidRequest("echo cannot be combined with logprobs on this server", param="echo")
    return answer(body.model, body.user, lambda model: _complete(model, body))


def _complete(model: ServedModel, body: CompletionRequest) -> Response:
    prompts = _tokenized_prompts(model, body.prompt)
    choices = build_choices(
        model,
        body,
        prompts,
        requested=body.max_tokens,
        default_max_tokens=DEFAULT_MAX_TOKENS,
        top_logprobs=body.logprobs,
    )
    echoes = [""] * len(choices)
    if body.echo:
        texts = [p if isinstance(p, str) else model.vocab.detokenize(list(p)) for p in body.prompt]
        echoes = [texts[i // body.n] for i in range(len(choices))]
    renderer = CompletionRenderer(model.vocab, echoes, body.logprobs is not None)
    return respond(model, body, choices, renderer, new_id("cmpl"))
