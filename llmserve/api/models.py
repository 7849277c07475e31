"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from llmserve.api.openapi import Operation, documented
from llmserve.service import ModelService, current_service

blueprint = Blueprint("models", __name__)

# One fixed timestamp per process is enough: clients only display it.
_CREATED = 1_735_689_600


def _model_card(service: ModelService) -> dict[str, Any]:
    return {"id": service.model_id, "object": "model", "created": _CREATED, "owned_by": "llmserve"}


@blueprint.get("/v1/models")
@documented(Operation("List the models this key may use"))
def list_models() -> Response:
    service = current_service()
    visible = [_model_card(service)] if service.visible_to_caller(service.model_id) else []
    return jsonify({"object": "list", "data": visible})


@blueprint.get("/v1/models/<path:model_id>")
@documented(Operation("Describe one model", errors=(404,)))
def retrieve_model(model_id: str) -> Response:
    service = current_service()
    service.require_model(model_id)
    return jsonify(_model_card(service))
