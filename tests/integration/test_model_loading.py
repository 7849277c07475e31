"""Loading and unloading models while the server runs, through the admin API and the CLI: two workers
converge on the shared state file, running streams are never cut, and refusals come before anything
changes."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.models.state import worker_statuses
from tests.integration.conftest import (
    LLMSERVE,
    MODEL,
    NO_EOS,
    Server,
    cli_env,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = pytest.mark.slow

CHAT_MODEL = "smollm2-135m-instruct"
CONFIG = f'[model]\nparallel = 4\nthreads = 1\n[models.{MODEL}]\nembedded = "{MODEL}"\n'


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-loading")


@pytest.fixture(scope="module")
def server(directory: Path) -> Iterator[Server]:
    running = start_server(directory, CONFIG, workers="2")
    assert wait_for(lambda: everywhere(running, MODEL, "ready"), timeout=60)  # both workers report it warm
    yield running
    stop_server(running)


def admin_models(server: Server) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{server.url}/v1/admin/models", timeout=10)
    assert response.status_code == 200, response.text
    return {entry["id"]: entry for entry in response.json()["data"]}


def worker_views(server: Server) -> dict[str, dict[str, str | None]]:
    """Each worker's state of each model, as the workers report it."""
    views: dict[str, dict[str, str | None]] = {}
    for name, entry in admin_models(server).items():
        for pid, status in entry["workers"].items():
            views.setdefault(pid, {})[name] = status
    return views


def everywhere(server: Server, model: str, status: str | None) -> bool:
    views = worker_views(server)
    return len(views) == 2 and all(view.get(model) == status for view in views.values())


def stream_tokens(
    server: Server, model: str, tokens: int, results: list[tuple[int, bool]], started: threading.Event | None = None
) -> None:
    """A streamed completion of exactly ``tokens`` tokens; records (tokens generated, whether [DONE] came).
    ``started`` is set once its first text arrived."""
    no_eos = NO_EOS if model == MODEL else {"0": -100, "2": -100, "4": -100}  # SmolLM2's three end tokens
    body = {"model": model, "prompt": "Tell me a story.", "max_tokens": tokens, "stream": True, "logit_bias": no_eos}
    body["stream_options"] = {"include_usage": True}  # a chunk may hold two tokens (one UTF-8 character)
    chunks, done = 0, False
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: ") and (usage := json.loads(line[6:]).get("usage")):
                chunks = usage["completion_tokens"]
            elif line.startswith("data: ") and started is not None:
                started.set()
    results.append((chunks, done))


def test_a_model_loaded_beside_running_streams_serves_once_warm(server: Server) -> None:
    results: list[tuple[int, bool]] = []
    started = [threading.Event() for _ in range(4)]
    streams = [threading.Thread(target=stream_tokens, args=(server, MODEL, 160, results, s)) for s in started]
    for thread in streams:
        thread.start()
    assert all(event.wait(60) for event in started)
    response = httpx.post(
        f"{server.url}/v1/admin/models",
        json={"id": CHAT_MODEL, "embedded": CHAT_MODEL, "parallel": 2},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    assert response.json() == {"id": CHAT_MODEL, "object": "model", "status": "loading"}
    assert wait_for(lambda: everywhere(server, CHAT_MODEL, "ready"), timeout=60)
    for thread in streams:
        thread.join(timeout=120)
    assert results == [(160, True)] * 4  # no stream was cut while the model loaded beside them
    for _ in range(4):  # new connections: both workers answer
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            headers={"Connection": "close"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
    assert admin_models(server)[CHAT_MODEL]["source"] == "loaded"
    again = httpx.post(f"{server.url}/v1/admin/models", json={"id": CHAT_MODEL, "embedded": CHAT_MODEL}, timeout=30)
    assert again.status_code == 409 and again.json()["error"]["code"] == "model_exists"


def test_an_unloaded_model_finishes_its_running_streams_first(server: Server) -> None:
    assert CHAT_MODEL in admin_models(server), "loaded by the test before"
    results: list[tuple[int, bool]] = []
    started = threading.Event()
    stream = threading.Thread(target=stream_tokens, args=(server, CHAT_MODEL, 128, results, started))
    stream.start()
    assert started.wait(60)
    assert httpx.delete(f"{server.url}/v1/admin/models/{CHAT_MODEL}", timeout=10).status_code == 202

    def refused() -> bool:
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": CHAT_MODEL, "prompt": "hi", "max_tokens": 1},
            headers={"Connection": "close"},
            timeout=30,
        )
        return response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"

    assert wait_for(lambda: all(refused() for _ in range(4)), timeout=30)  # gone for new requests, everywhere
    stream.join(timeout=120)
    assert results == [(128, True)]  # the running one finished
    # Every worker's own report, unloading included (the admin listing shows only the desired models).
    assert wait_for(
        lambda: not any(CHAT_MODEL in status["models"] for status in worker_statuses(server.state_dir)), timeout=60
    )
    assert CHAT_MODEL not in admin_models(server)
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    info = [line for line in metrics.splitlines() if line.startswith(f'llmserve_model_info{{model="{CHAT_MODEL}"')]
    assert info and all(line.endswith(" 0.0") for line in info)  # kept in the files, at 0 once unloaded
    assert httpx.delete(f"{server.url}/v1/admin/models/{CHAT_MODEL}", timeout=10).status_code == 404


def test_a_load_that_cannot_work_is_refused_before_anything_changes(server: Server, directory: Path) -> None:
    corrupt = directory / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(4096))
    for body, code in (
        ({"id": "missing", "path": str(directory / "missing.gguf")}, 400),
        ({"id": "corrupt", "path": str(corrupt)}, 400),
        ({"id": "both", "path": str(corrupt), "embedded": MODEL}, 400),
        ({"id": "bad name!", "embedded": MODEL}, 400),
        ({"id": "typed", "embedded": MODEL, "parallel": "2"}, 400),
    ):
        response = httpx.post(f"{server.url}/v1/admin/models", json=body, timeout=30)
        assert response.status_code == code, (body, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert set(admin_models(server)) == {MODEL}


def test_the_cli_loads_and_unloads_and_every_worker_follows(server: Server, directory: Path) -> None:
    config = ["--config", str(directory / "llmserve.toml")]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LLMSERVE, "models", *args], capture_output=True, text=True, env=cli_env(directory))

    loaded = cli("load", "chat-small", *config, "--embedded", CHAT_MODEL, "--parallel", "2")
    assert loaded.returncode == 0, loaded.stderr
    assert wait_for(lambda: everywhere(server, "chat-small", "ready"), timeout=60)
    status = cli("status", *config)
    assert status.stdout.count("chat-small=ready") == 2, status.stdout
    listing = cli("list", *config)
    assert "chat-small  loaded  embedded smollm2-135m-instruct" in listing.stdout, listing.stdout
    assert cli("unload", "chat-small", *config).returncode == 0
    assert wait_for(lambda: everywhere(server, "chat-small", None), timeout=60)
    refused = cli("unload", "chat-small", *config)
    assert refused.returncode != 0 and "no model named 'chat-small'" in refused.stderr


def test_a_load_over_the_memory_budget_is_refused(tmp_path: Path) -> None:
    """Gemma with 4 slots takes about 1210 MiB by the estimate, SmolLM2 with 4 about 620 MiB more, and a
    SmolLM2 with one short slot about 110."""
    server = start_server(tmp_path, "memory_budget_mib = 1700\n" + CONFIG)
    try:
        response = httpx.post(f"{server.url}/v1/admin/models", json={"id": CHAT_MODEL, "embedded": CHAT_MODEL})
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "memory_budget_exceeded"
        assert "over the memory budget of 1700 MiB" in error["message"]
        small = {"embedded": CHAT_MODEL, "parallel": 1, "context_length": 512, "batch_tokens": 32, "embeddings": False}
        assert httpx.post(f"{server.url}/v1/admin/models", json={"id": CHAT_MODEL, **small}).status_code == 202
    finally:
        stop_server(server)
