"""The admin key's model controls: list the models with every worker's view, load one, unload one; set
an alias's stable model, canary and weight, and promote its canary.

``GET /v1/admin/models``, ``POST /v1/admin/models`` (202: the workers load it beside the running models
within a second or two, and it serves once warm) and ``DELETE /v1/admin/models/{id}`` (202: it is gone
for new requests at once, and unloaded once its running generations finish). The same changes as
``llmserve models load|unload``: both write the shared state file that every worker follows.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import ConfigDict, Field

from llmserve.api.openapi import Operation, documented
from llmserve.api.request import parse_body, server_settings
from llmserve.errors import Conflict, InvalidRequest, ModelNotFound
from llmserve.models.control import ModelControl, ModelControlError, Refusal
from llmserve.models.registry import current_registry
from llmserve.models.served import off_hub
from llmserve.models.state import worker_statuses
from llmserve.settings import MODEL_ID, AliasSettings, ModelSettings
from llmserve.tenancy import require_admin

blueprint = Blueprint("admin", __name__)
blueprint.before_request(require_admin)


class ModelLoadRequest(ModelSettings):
    """A model to load beside the running ones; the fields left out take the [model] defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: str = Field(pattern=MODEL_ID, description="The model id clients will send.")


def _refused(error: ModelControlError) -> Exception:
    if error.refusal is Refusal.NOT_FOUND:
        return ModelNotFound(str(error), param="id")
    if error.refusal is Refusal.INVALID:
        return InvalidRequest(str(error))
    code = "memory_budget_exceeded" if error.refusal is Refusal.OVER_BUDGET else "model_exists"
    return Conflict(str(error), code=code, param="id")


@blueprint.get("/v1/admin/models")
@documented(Operation("The models to serve, with this worker's and every worker's state (admin key)", errors=(403,)))
def list_admin_models() -> Response:
    control = ModelControl(server_settings())
    try:
        desired = control.desired()
    except ModelControlError as exc:
        raise _refused(exc) from None
    here = current_registry().status()["models"]
    workers = worker_statuses(server_settings().state_dir)
    data: list[dict[str, Any]] = [
        {
            "id": name,
            "object": "model",
            "source": entry.source,
            "path": str(entry.settings.path) if entry.settings.path else None,
            "embedded": entry.settings.embedded,
            **here.get(name, {"status": "pending", "version": None}),
            "workers": {str(worker["pid"]): worker["models"].get(name, {}).get("status") for worker in workers},
        }
        for name, entry in desired.items()
    ]
    return jsonify({"object": "list", "data": data, "memory_budget_mib": control.budget})


@blueprint.post("/v1/admin/models")
@documented(
    Operation(
        "Load a model beside the running ones (admin key)", body=ModelLoadRequest, errors=(400, 403, 409), success=202
    )
)
def load_model() -> Response:
    body = parse_body(ModelLoadRequest)
    fields = {name: getattr(body, name) for name in body.model_fields_set - {"id"}}
    try:  # reads the GGUF's metadata (and may assemble an embedded one): off the hub
        model = off_hub(ModelControl(server_settings()).load, body.id, fields)
    except ModelControlError as exc:
        raise _refused(exc) from None
    response = jsonify({"id": model.id, "object": "model", "status": "loading"})
    response.status_code = 202
    return response


@blueprint.delete("/v1/admin/models/<path:model_id>")
@documented(Operation("Unload a model once its running generations finish (admin key)", errors=(403, 404), success=202))
def unload_model(model_id: str) -> Response:
    try:
        ModelControl(server_settings()).unload(model_id)
    except ModelControlError as exc:
        raise _refused(exc) from None
    response = jsonify({"id": model_id, "object": "model", "status": "unloading"})
    response.status_code = 202
    return response


class AliasRequest(AliasSettings):
    """How an alias routes: its stable model, and a canary given ``canary_weight`` percent of the sessions."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _alias_view(name: str, alias: AliasSettings) -> dict[str, Any]:
    return {"id": name, "object": "alias", **alias.model_dump(mode="json")}


@blueprint.get("/v1/admin/aliases")
@documented(Operation("The aliases and how each routes (admin key)", errors=(403,)))
def list_aliases() -> Response:
    try:
        aliases = ModelControl(server_settings()).aliases()
    except ModelControlError as exc:
        raise _refused(exc) from None
    return jsonify({"object": "list", "data": [_alias_view(name, alias) for name, alias in aliases.items()]})


@blueprint.put("/v1/admin/aliases/<path:name>")
@documented(Operation("Set how an alias routes (admin key)", body=AliasRequest, errors=(400, 403, 404)))
def set_alias(name: str) -> Response:
    body = parse_body(AliasRequest)
    alias = AliasSettings(**body.model_dump())
    try:
        ModelControl(server_settings()).set_alias(name, alias)
    except ModelControlError as exc:
        raise _refused(exc) from None
    return jsonify(_alias_view(name, alias))


@blueprint.post("/v1/admin/aliases/<path:name>/promote")
@documented(Operation("Make an alias's canary its stable model (admin key)", errors=(400, 403, 404)))
def promote_alias(name: str) -> Response:
    try:
        promoted = ModelControl(server_settings()).promote(name)
    except ModelControlError as exc:
        raise _refused(exc) from None
    return jsonify(_alias_view(name, promoted))
