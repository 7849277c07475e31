"""POST /v1/embeddings: mean-pooled, L2-normalised vectors from the served model."""

from __future__ import annotations

import base64
import time

import numpy as np
from flask import Blueprint, Response, jsonify

from llmserve.accounting import current_accounting
from llmserve.api.openapi import GENERATION_ERRORS, Operation, documented
from llmserve.api.request import origin_of, parse_body, requested_model, server_settings
from llmserve.api.runner import EngineTime, rejection_error
from llmserve.api.schemas import EmbeddingRequest
from llmserve.engine.engine import Engine
from llmserve.engine.jobs import Admitted, Embeddings, EmbeddingSpec, Finished, FinishReason, Job, Rejected
from llmserve.engine.stream import EventStream
from llmserve.errors import ContextLengthExceeded, EngineFailure, InvalidRequest, QueueTimeout
from llmserve.quotas import current_quotas
from llmserve.request_context import current_request
from llmserve.tenancy import current_tenant

blueprint = Blueprint("embeddings", __name__)


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


@blueprint.post("/v1/embeddings")
@documented(Operation("Create embeddings", body=EmbeddingRequest, errors=GENERATION_ERRORS))
def create_embeddings() -> Response:
    body = parse_body(EmbeddingRequest)
    _, model = requested_model(body.model, body.user)
    if not model.settings.embeddings:
        raise InvalidRequest(f"The model `{model.id}` does not serve embeddings.", param="model")
    vocab = model.vocab
    limit = model.settings.embedding_context
    inputs = []
    for number, item in enumerate(body.input):
        tokens = model.tokenize(item, add_special=True) if isinstance(item, str) else item
        if len(tokens) > limit:
            raise ContextLengthExceeded(
                f"Input {number} is {len(tokens)} tokens long; this model embeds at most {limit} tokens.",
                param="input",
            )
        if not all(vocab.is_valid(t) for t in tokens):
            raise InvalidRequest(f"input {number} holds a token id outside the vocabulary", param="input")
        inputs.append(tuple(tokens))
    prompt_tokens = sum(len(tokens) for tokens in inputs)
    tenant = current_tenant()
    reservation = current_quotas().reserve_tokens(tenant, prompt_tokens, needed=prompt_tokens)
    accounting, origin = current_accounting(), origin_of(model)
    run = EmbeddingRun(model.engine, EmbeddingSpec(tuple(inputs)), tenant.name)
    try:
        vectors = run.vectors(server_settings().queue_timeout)
    except BaseException as exc:
        current_quotas().settle(reservation, 0)
        accounting.record_embeddings(run, tenant.name, origin, prompt_tokens, exc)
        raise
    accounting.record_embeddings(run, tenant.name, origin, prompt_tokens)
    current_request().log.update(tenant=tenant.name, model_version=model.version, prompt_tokens=prompt_tokens)
    return jsonify(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": model.id,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )


class EmbeddingRun:
    """One embedding job on the engine: its vectors, when it got the engine, and its engine time."""

    def __init__(self, engine: Engine, spec: EmbeddingSpec, tenant: str) -> None:
        self._engine = engine
        self._stream = EventStream()
        self._job = Job(spec, self._stream.sink(0), tenant)
        self._engine_time = EngineTime(1)
        self.admitted_at: float | None = None

    @property
    def engine_seconds(self) -> float:
        return self._engine_time.seconds

    def settle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the engine's last event; call once ``vectors`` has returned."""
        return self._engine_time.settle(self._stream, timeout)

    def vectors(self, timeout: float) -> tuple[np.ndarray, ...]:
        """Submit the job and wait for its vectors; a 503 if it waited ``timeout`` seconds for the engine.
        Once admitted it waits for as long as its inputs take (a stalled engine is the watchdog's)."""
        self._engine.submit(self._job)
        vectors: tuple[np.ndarray, ...] | None = None
        try:
            while True:
                item = self._stream.get(timeout if self.admitted_at is None else None)
                if item is None:
                    raise QueueTimeout("The embedding request waited too long; retry later.", retry_after=1)
                event = item[1]
                self._engine_time.note(0, event)
                if isinstance(event, Admitted):
                    self.admitted_at = time.monotonic()
                elif isinstance(event, Embeddings):
                    vectors = event.vectors
                elif isinstance(event, Rejected):
                    raise rejection_error(event)
                elif isinstance(event, Finished):
                    if event.reason is not FinishReason.STOP or vectors is None:
                        raise EngineFailure("The engine could not compute these embeddings.")
                    return vectors
        finally:
            if vectors is None:
                self._engine.cancel(self._job)
