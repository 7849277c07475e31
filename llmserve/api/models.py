"""GET /v1/models and /v1/models/{id}: the models and aliases this key may use, as OpenAI's model objects."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from llmserve.api.openapi import Operation, documented
from llmserve.models.registry import current_registry

blueprint = Blueprint("models", __name__)

# One fixed timestamp per process is enough: clients only display it.
_CREATED = 1_735_689_600


def _model_card(name: str) -> dict[str, Any]:
    """OpenAI's model object, plus what computes it (``llama.cpp``, or ``simulated`` in fleet tests)."""
    card: dict[str, Any] = {"id": name, "object": "model", "created": _CREATED, "owned_by": "llmserve"}
    backend = current_registry().backend(name)
    if backend is not None:
        card["backend"] = backend
    return card


@blueprint.get("/v1/models")
@documented(Operation("List the models this key may use"))
def list_models() -> Response:
    return jsonify({"object": "list", "data": [_model_card(model) for model in current_registry().visible()]})


@blueprint.get("/v1/models/<path:model_id>")
@documented(Operation("Describe one model", errors=(404,)))
def retrieve_model(model_id: str) -> Response:
    current_registry().require_visible(model_id)
    return jsonify(_model_card(model_id))
