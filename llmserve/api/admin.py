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

from llmserve.api import golden
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


# What this view shows of the answering worker's status report (the rest is for GET /v1/status).
WORKER_FIELDS = ("status", "version", "slots", "busy", "queued")
PENDING = {"status": "pending", "version": None}


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
            **{key: value for key, value in here.get(name, PENDING).items() if key in WORKER_FIELDS},
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


def alias_view(name: str, alias: AliasSettings) -> dict[str, Any]:
    return {"id": name, "object": "alias", **alias.model_dump(mode="json")}


@blueprint.get("/v1/admin/aliases")
@documented(Operation("The aliases and how each routes (admin key)", errors=(403,)))
def list_aliases() -> Response:
    try:
        aliases = ModelControl(server_settings()).aliases()
    except ModelControlError as exc:
        raise _refused(exc) from None
    return jsonify({"object": "list", "data": [alias_view(name, alias) for name, alias in aliases.items()]})


@blueprint.put("/v1/admin/aliases/<path:name>")
@documented(
    Operation(
        "Set how an alias routes; a new canary passes the golden set first (admin key)",
        body=AliasRequest,
        errors=(400, 403, 404, 409, 503),
    )
)
def set_alias(name: str) -> Response:
    body = parse_body(AliasRequest)
    alias = AliasSettings(**body.model_dump())
    control = ModelControl(server_settings())
    try:
        current = control.aliases().get(name)
        gate = _golden_gate(alias) if _new_canary(current, alias) else None
        control.set_alias(name, alias)
    except ModelControlError as exc:
        raise _refused(exc) from None
    return jsonify({**alias_view(name, alias), **({"golden_set": gate} if gate else {})})


def _new_canary(current: AliasSettings | None, alias: AliasSettings) -> bool:
    """A canary about to get traffic that it did not have with the same stable model."""
    if alias.canary is None or alias.canary_weight == 0:
        return False
    return (
        current is None or (current.canary, current.stable) != (alias.canary, alias.stable) or not current.canary_weight
    )


def _golden_gate(alias: AliasSettings) -> dict[str, Any] | None:
    """Score the canary and stable on the configured golden set; a 409 when the canary scores worse than
    stable by more than the margin. None without a golden set."""
    settings = server_settings()
    if settings.canary.golden_set is None:
        return None
    assert alias.canary is not None
    try:
        cases = golden.read_cases(settings.canary.golden_set)
    except golden.GoldenSetError as exc:
        raise InvalidRequest(f"{exc} (canary.golden_set)") from None
    models = current_registry().models
    for model in (alias.stable, alias.canary):
        if model not in models:
            raise ModelNotFound(f"the model {model!r} is not served", param="canary")
    scores = {
        role: golden.score(models[model], cases, settings.heartbeat_interval)
        for role, model in (("stable", alias.stable), ("canary", alias.canary))
    }
    view = {
        role: {"passed": s.passed, "total": s.total, "failed_cases": list(s.failed_cases)} for role, s in scores.items()
    }
    if scores["canary"].share < scores["stable"].share - settings.canary.golden_margin:
        raise Conflict(
            f"canary {alias.canary!r} passed {scores['canary'].passed} of {scores['canary'].total} golden cases, "
            f"stable {alias.stable!r} {scores['stable'].passed}: below the margin of "
            f"{settings.canary.golden_margin:.0%}; the alias is unchanged",
            code="quality_gate_failed",
            param="canary",
        )
    return view


@blueprint.post("/v1/admin/aliases/<path:name>/promote")
@documented(Operation("Make an alias's canary its stable model (admin key)", errors=(400, 403, 404)))
def promote_alias(name: str) -> Response:
    try:
        promoted = ModelControl(server_settings()).promote(name)
    except ModelControlError as exc:
        raise _refused(exc) from None
    return jsonify(alias_view(name, promoted))
