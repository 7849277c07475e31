"""Every malformed request gets the right status and an OpenAI error object (Flask test client).

The model is not loaded in these tests: validation happens before any engine work, and a valid
request to a model that is still loading gets an honest 503.
"""

from typing import Any

import pytest
from flask.testing import FlaskClient

from llmserve.engine.engine import EngineState
from llmserve.models.registry import EXTENSION as MODELS

MODEL = "gemma-3-270m"


def assert_openai_error(response: Any, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


BAD_COMPLETIONS = [
    ({"prompt": "hi"}, "model", None),
    ({"model": MODEL}, "prompt", None),
    ({"model": MODEL, "prompt": "hi", "frobnicate": 1}, "frobnicate", None),
    ({"model": MODEL, "prompt": "hi", "temperature": 2.5}, "temperature", None),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p", None),
    ({"model": MODEL, "prompt": "hi", "n": 0}, "n", None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", None),
    ({"model": MODEL, "prompt": "hi", "stop": [""]}, "stop", None),
    ({"model": MODEL, "prompt": "hi", "stop": 5}, "stop", None),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias", None),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias", None),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"²": 1}}, "logit_bias", None),
    ({"model": MODEL, "prompt": "hi", "logprobs": 6}, "logprobs", None),
    ({"model": MODEL, "prompt": "hi", "suffix": "x"}, "suffix", None),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of", None),
    ({"model": MODEL, "prompt": 5}, "prompt", None),
    ({"model": MODEL, "prompt": []}, "prompt", None),
    ({"model": MODEL, "prompt": [[]]}, "prompt", None),
    ({"model": MODEL, "prompt": [1, "a"]}, "prompt", None),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 3}, "presence_penalty", None),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, None, None),
    # Values of the wrong JSON type are refused, never coerced.
    ({"model": MODEL, "prompt": "hi", "max_tokens": "4"}, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": True}, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4.0}, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "seed": "42"}, "seed", None),
    ({"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream", None),
    ({"model": MODEL, "prompt": "hi", "temperature": "0.5"}, "temperature", None),
    ({"model": MODEL, "prompt": "hi", "echo": 1}, "echo", None),
    # Every list and string that costs per token has a bound.
    ({"model": MODEL, "prompt": "hi", "stop": "x" * 1025}, "stop", None),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", None),
    ({"model": MODEL, "prompt": ["hi"] * 2049}, "prompt", None),
]


def test_a_rule_between_parameters_is_named_not_called_a_bad_body(client: FlaskClient) -> None:
    body = {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}
    error = assert_openai_error(client.post("/v1/completions", json=body), 400)
    assert error["message"] == "stream_options is only allowed when stream is true"
    for not_an_object in ("[1]", '"hi"', "null"):
        response = client.post("/v1/completions", data=not_an_object, content_type="application/json")
        error = assert_openai_error(response, 400)
        assert error["message"] == "The request body must be a JSON object."


@pytest.mark.parametrize(("body", "param", "code"), BAD_COMPLETIONS)
def test_bad_completion_requests(client: FlaskClient, body: dict, param: str | None, code: str | None) -> None:
    error = assert_openai_error(client.post("/v1/completions", json=body), 400, param=param, code=code)
    assert error["type"] == "invalid_request_error"


BAD_CHATS = [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "assistant"}]}, "messages[0]"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
    ),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2},
        None,
    ),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []}, "tools"),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
        "response_format.type",
    ),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHATS)
def test_bad_chat_requests(client: FlaskClient, body: dict, param: str | None) -> None:
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param=param)


def test_embeddings_refuse_unsupported_dimensions(client: FlaskClient) -> None:
    body = {"model": MODEL, "input": "x", "dimensions": 8}
    assert_openai_error(client.post("/v1/embeddings", json=body), 400, param="dimensions")


def test_embeddings_refuse_more_inputs_than_openai_allows(client: FlaskClient) -> None:
    body = {"model": MODEL, "input": ["x"] * 2049}
    assert_openai_error(client.post("/v1/embeddings", json=body), 400, param="input")


def test_chats_refuse_more_messages_than_the_documented_maximum(client: FlaskClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}] * 2049}
    assert_openai_error(client.post("/v1/chat/completions", json=body), 400, param="messages")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "gemma-3-270m", "prompt": "\\ud800"}',  # a lone UTF-16 surrogate
        b'{"model": "gemma-3-270m", "prompt": "\xff"}',  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # nested far deeper than any request
        b'{"model": "gemma-3-270m", "prompt": "hi"',
    ],
    ids=["lone-surrogate", "not-utf8", "deep-nesting", "truncated"],
)
def test_bodies_that_are_not_valid_json_get_400(client: FlaskClient, raw: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        error = assert_openai_error(client.post(path, data=raw, content_type="application/json"), 400)
        assert "parse the JSON body" in error["message"]


def test_a_large_body_is_parsed_off_the_hub_with_the_same_answers(client: FlaskClient) -> None:
    """Above 256 KiB the body is parsed on a native thread: errors still name their parameter."""
    large = "word " * 100_000
    refused = client.post("/v1/completions", json={"model": MODEL, "prompt": large, "max_tokens": "4"})
    assert_openai_error(refused, 400, param="max_tokens")
    messages = [{"role": "user", "content": large}]
    accepted = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert_openai_error(accepted, 503, code="model_loading")  # valid: it got as far as the model


def test_embeddings_refuse_empty_strings(client: FlaskClient) -> None:
    assert_openai_error(client.post("/v1/embeddings", json={"model": MODEL, "input": [""]}), 400, param="input")


def test_unknown_model_is_404_model_not_found(client: FlaskClient) -> None:
    response = client.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert_openai_error(response, 404, param="model", code="model_not_found")
    assert_openai_error(client.get("/v1/models/gpt-9"), 404, code="model_not_found")


def test_malformed_json(client: FlaskClient) -> None:
    response = client.post("/v1/completions", data="{nope", content_type="application/json")
    assert_openai_error(response, 400)


def test_json_that_is_not_an_object(client: FlaskClient) -> None:
    assert_openai_error(client.post("/v1/completions", json=[1, 2]), 400)


def test_wrong_content_type(client: FlaskClient) -> None:
    response = client.post("/v1/completions", data="model=x", content_type="application/x-www-form-urlencoded")
    assert_openai_error(response, 415, code="unsupported_media_type")


def test_oversized_body(client: FlaskClient) -> None:
    client.application.config["MAX_CONTENT_LENGTH"] = 1024
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 4096})
    assert_openai_error(response, 413)


def test_unknown_route(client: FlaskClient) -> None:
    assert_openai_error(client.get("/v1/nothing-here"), 404)


def test_wrong_method(client: FlaskClient) -> None:
    assert_openai_error(client.get("/v1/completions"), 405)


def test_valid_request_while_the_model_loads_is_503_with_retry_after(client: FlaskClient) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert_openai_error(response, 503, code="model_loading")
    assert int(response.headers["Retry-After"]) >= 1


def test_a_request_to_a_worker_whose_engine_failed_is_told_to_retry(client: FlaskClient) -> None:
    """Not "loading": the worker is being replaced, and the retry may reach another one at once."""
    engine = client.application.extensions[MODELS].models[MODEL].engine
    engine.served, engine.state = True, EngineState.FAILED
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert_openai_error(response, 503, code="engine_unavailable")
    assert response.headers["Retry-After"] == "1"


def test_a_model_that_failed_to_load_is_unavailable_and_says_so(client: FlaskClient) -> None:
    engine = client.application.extensions[MODELS].models[MODEL].engine
    engine.state, engine.failure = EngineState.FAILED, "llama.cpp could not load /models/broken.gguf"
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert_openai_error(response, 503, code="model_unavailable")
    body = client.get("/readyz").get_json()
    assert body["models"][MODEL] == {
        "status": "failed",
        "version": None,
        "backend": "llama.cpp",
        "error": engine.failure,
    }
    assert body["models"]["smollm2-135m-instruct"]["status"] == "starting"


def test_readiness_is_503_until_the_models_are_loaded(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "loading"
    assert {model: view["status"] for model, view in body["models"].items()} == {
        MODEL: "starting",
        "smollm2-135m-instruct": "starting",
    }


def test_models_are_listed_without_loading(client: FlaskClient) -> None:
    listed = [card["id"] for card in client.get("/v1/models").get_json()["data"]]
    assert listed == [MODEL, "smollm2-135m-instruct"]


def test_request_ids_are_echoed_or_generated(client: FlaskClient) -> None:
    assert client.get("/v1/models", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    generated = client.get("/v1/models", headers={"X-Request-ID": "bad id with spaces"}).headers["X-Request-ID"]
    assert generated and " " not in generated


def test_crashes_become_500_without_internal_details(client: FlaskClient) -> None:
    app = client.application

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internal detail")

    response = client.get("/boom")
    error = assert_openai_error(response, 500)
    assert "secret" not in error["message"]
