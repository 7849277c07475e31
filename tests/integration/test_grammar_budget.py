"""A structured output whose grammar forces whole-vocabulary scans ends with a clear 400 once it has
spent the model's grammar_scan_budget, and the engine goes on serving."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, Server, start_server, stop_server, wait_for

pytestmark = pytest.mark.slow

# Characters the model never expects after `{"k": "`: each of them is found only by a whole-vocabulary scan.
UNLIKELY = "ꙮ𒀱ꙮ𒀱ꙮ𒀱ꙮ𒀱"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("grammar-budget"),
        model__grammar_scan_budget="0.000001",
        model__parallel="2",
        model__embeddings="false",
    )
    yield running
    stop_server(running)


def body(stream: bool) -> dict:
    schema = {
        "type": "object",
        "properties": {"k": {"type": "string", "enum": [UNLIKELY]}},
        "required": ["k"],
        "additionalProperties": False,
    }
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "temperature": 0,
        "max_tokens": 60,
        "stream": stream,
        "response_format": {"type": "json_schema", "json_schema": {"name": "k", "strict": True, "schema": schema}},
    }


def test_past_the_budget_the_request_gets_a_400_error_object(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body(stream=False), timeout=120)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "grammar_budget_exceeded" and error["type"] == "invalid_request_error"
    assert "grammar_scan_budget of 1e-06 s" in error["message"]


def test_a_stream_ends_with_the_error_event_and_the_slot_is_freed(server: Server) -> None:
    workers = server.worker_pids()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body(stream=True), timeout=120) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-1])["error"]["code"] == "grammar_budget_exceeded"
    assert wait_for(lambda: server.engine_stats()["slots_busy"] == 0)
    reply = server.client(max_retries=0, timeout=120).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert server.worker_pids() == workers
    with pytest.raises(openai.BadRequestError):  # and the same request fails the same way again
        server.client(max_retries=0, timeout=120).chat.completions.create(**body(stream=False))
