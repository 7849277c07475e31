"""GET /openapi.json: the API's OpenAPI 3.1 document, generated from the routes and the request models.

Each view declares what it takes and which errors it may answer with ``documented``; request schemas are
pydantic's own for the very models the views parse (strict, unknown fields refused), so the document
cannot drift from the validation. apispec assembles the document. Every error is the OpenAI error
object. The document describes the running configuration: with tenants, every operation but the probes
and this document needs a bearer key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any, NamedTuple, TypeVar

from apispec import APISpec
from flask import Blueprint, Flask, Response, current_app, jsonify
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from werkzeug.routing import Rule

from llmserve.auth import OPENAPI_PATH
from llmserve.models.registry import current_registry
from llmserve.tenancy import current_tenancy

blueprint = Blueprint("openapi", __name__)

F = TypeVar("F", bound=Callable[..., Any])
REF = "#/components/schemas/{model}"
FLASK_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
PROMETHEUS_TEXT = "text/plain"

ERROR_MEANINGS = {
    400: "The request is invalid; `error.param` names the parameter.",
    401: "No API key, or an unknown one.",
    403: "The key may not do this.",
    404: "No such model, or no such resource.",
    409: "The request conflicts with the server's state (a model of that name, the memory budget).",
    413: "The request body is larger than this server accepts.",
    415: "The body is not `application/json`.",
    429: "A quota is used up; `Retry-After` says when to retry.",
    500: "The engine failed this request after it was admitted.",
    503: "The server cannot take the request now (queue full or timed out, not ready); see `Retry-After`.",
}
GENERATION_ERRORS = (400, 401, 403, 404, 413, 415, 429, 500, 503)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every non-2xx response (see ``errors.APIError.body``)."""

    error: ErrorDetail


@dataclass(frozen=True)
class Operation:
    """What one route takes and answers, beside its path and method (which Flask knows)."""

    summary: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    media: tuple[str, ...] = (JSON,)  # content types of a successful answer
    answers: tuple[int, ...] = ()  # statuses answered with the route's own body, not an error object
    success: int = 200
    public: bool = False  # answered without a key even when tenants are configured


def documented(operation: Operation) -> Callable[[F], F]:
    """Attach ``operation`` to a view, for ``build_document``."""

    def attach(view: F) -> F:
        view.openapi_operation = operation  # type: ignore[attr-defined]
        return view

    return attach


# Routes registered by libraries rather than by a view of ours.
LIBRARY_ROUTES = {
    "prometheus_metrics": Operation(
        "Prometheus metrics (the admin key or a client in metrics_networks, when tenants are configured)",
        errors=(403,),
        media=(PROMETHEUS_TEXT,),
        public=True,
    ),
}


class Route(NamedTuple):
    path: str  # as OpenAPI writes it: /v1/models/{model_id}
    method: str
    arguments: list[str]  # the path's
    operation: Operation
    operation_id: str  # the view's name (create_chat_completion): client generators name methods by it


def _operation_of(app: Flask, rule: Rule) -> Operation | None:
    view = app.view_functions[rule.endpoint]
    return getattr(view, "openapi_operation", None) or LIBRARY_ROUTES.get(rule.endpoint)


def operations(app: Flask) -> Iterable[Route]:
    """Every documented route of ``app``, one per method."""
    for rule in app.url_map.iter_rules():
        operation = _operation_of(app, rule)
        if operation is None:
            continue
        path = FLASK_ARGUMENT.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield Route(path, method.lower(), sorted(rule.arguments), operation, rule.endpoint.rpartition(".")[2])


def undocumented_routes(app: Flask) -> list[str]:
    """Routes no ``Operation`` describes: a test keeps this empty."""
    return sorted(rule.rule for rule in app.url_map.iter_rules() if _operation_of(app, rule) is None)


def build_document(app: Flask, keyed: bool, model_ids: list[str]) -> dict[str, Any]:
    """The OpenAPI document of ``app``. ``keyed``: tenants are configured, so operations need a key;
    ``model_ids``: the models served, the values a request's ``model`` (and a ``model_id``) may take."""
    routes = list(operations(app))
    bodies = {route.operation.body for route in routes if route.operation.body is not None}
    queries = {route.operation.query for route in routes if route.operation.query is not None}
    models = {ErrorResponse} | bodies | queries
    _, definitions = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    schemas = definitions.get("$defs", {})
    for body in bodies:
        if "model" in body.model_fields:
            schemas[body.__name__]["properties"]["model"]["enum"] = model_ids
    spec = APISpec(title="llmserve", version=version("llmserve"), openapi_version="3.1.0")
    for name, schema in sorted(schemas.items()):
        spec.components.schema(name, schema)
    if keyed:
        spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation = _operation(route.operation, route.arguments, keyed, model_ids)
        paths.setdefault(route.path, {})[route.method] = {"operationId": route.operation_id} | operation
    for path, methods in paths.items():
        spec.path(path=path, operations=methods)
    return spec.to_dict()


def _operation(operation: Operation, arguments: list[str], keyed: bool, model_ids: list[str]) -> dict[str, Any]:
    document: dict[str, Any] = {"summary": operation.summary, "responses": _responses(operation, keyed)}
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": _argument(name, model_ids)} for name in arguments
    ]
    if operation.query is not None:
        for name, schema in operation.query.model_json_schema(ref_template=REF)["properties"].items():
            parameters.append({"name": name, "in": "query", "required": False, "schema": _not_null(schema)})
    if parameters:
        document["parameters"] = parameters
    if operation.body is not None:
        schema = {"$ref": REF.format(model=operation.body.__name__)}
        document["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
    if keyed:
        document["security"] = [] if operation.public else [{"bearer": []}]
    return document


def _responses(operation: Operation, keyed: bool) -> dict[str, Any]:
    content: dict[str, Any] = {media: {"schema": {}} for media in operation.media}
    responses: dict[str, Any] = {str(operation.success): {"description": "Success", "content": content}}
    error = {JSON: {"schema": {"$ref": REF.format(model=ErrorResponse.__name__)}}}
    for status in sorted(set(operation.errors) | ({401} if keyed and not operation.public else set())):
        responses[str(status)] = {"description": ERROR_MEANINGS[status], "content": error}
    for status in operation.answers:
        responses[str(status)] = {
            "description": "Not so now: the body says which state",
            "content": {JSON: {"schema": {}}},
        }
    return responses


def _argument(name: str, model_ids: list[str]) -> dict[str, Any]:
    return {"type": "string", "enum": model_ids} if name == "model_id" else {"type": "string"}


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string, never JSON null: drop the null branch of ``X | None``."""
    branches = [branch for branch in schema.get("anyOf", ()) if branch != {"type": "null"}]
    if len(branches) != 1:
        return schema
    rest = {key: value for key, value in schema.items() if key not in ("anyOf", "default")}
    return rest | branches[0]


@blueprint.get(OPENAPI_PATH)
@documented(Operation("This document", public=True))
def openapi_document() -> Response:
    model_ids = list(current_registry().models)  # they change as models are loaded and unloaded
    cached = current_app.extensions.get("llmserve.openapi")
    if cached is None or cached[0] != model_ids:
        keyed = current_tenancy().keyless is None
        cached = current_app.extensions["llmserve.openapi"] = (model_ids, build_document(current_app, keyed, model_ids))
    return jsonify(cached[1])
