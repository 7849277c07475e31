"""The OpenAPI document: generated from every route and from the request models the views parse.

The fuzz test (tests/integration/test_openapi_fuzz.py) holds the server to the document; these tests hold
the document to the code.
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from llmserve.api.openapi import undocumented_routes
from llmserve.api.schemas import ChatCompletionRequest
from llmserve.application import create_app
from llmserve.settings import Settings, TenantSettings


def test_every_route_is_documented(app: Flask) -> None:
    assert undocumented_routes(app) == []


def test_request_bodies_are_the_models_the_views_parse(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    assert document["openapi"] == "3.1.0"
    body = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False  # unknown parameters are refused, as the views refuse them
    assert set(chat["properties"]) == set(ChatCompletionRequest.model_fields)
    assert chat["properties"]["model"]["enum"] == ["gemma-3-270m", "smollm2-135m-instruct"]  # the models served
    responses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "security" not in document["paths"]["/v1/models"]["get"]  # no tenants: no key needed
    ids = [op["operationId"] for operations in document["paths"].values() for op in operations.values()]
    assert "create_chat_completion" in ids and len(ids) == len(set(ids))


def test_with_tenants_every_operation_but_the_public_ones_needs_a_bearer_key(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", tenants={"a": TenantSettings()})
    response = create_app(settings).test_client().get("/openapi.json")  # the document itself needs no key
    assert response.status_code == 200
    document = response.get_json()
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    security = {
        (path, method): operation["security"]
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    public = {path for (path, _), needs in security.items() if not needs}
    assert public == {"/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/console/{name}"}
    assert "401" in document["paths"]["/v1/completions"]["post"]["responses"]


def test_a_query_parameter_is_documented_as_a_string_not_as_null(client: FlaskClient) -> None:
    parameters = client.get("/openapi.json").get_json()["paths"]["/v1/usage"]["get"]["parameters"]
    by_name = {parameter["name"]: parameter["schema"] for parameter in parameters}
    assert by_name["start"]["type"] == "string"
    assert by_name["group_by"]["enum"] == ["day", "hour"]


def test_a_wrong_method_gets_405_with_the_allowed_ones(client: FlaskClient) -> None:
    response = client.delete("/v1/chat/completions")
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]
