"""Resumable streams on the real server: cut by a proxy and resumed by a client that follows the
protocol, owned by the tenant that started them, bounded, cancelled when abandoned, and finished during a
graceful drain."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from llmserve.keys import FileKeyStore
from llmserve.ledger.settings import default_url
from llmserve.ledger.store import Ledger, usage_records
from tests.integration.conftest import MODEL, NO_EOS, Server, start_server, stop_server, wait_for
from tests.integration.cutting_proxy import CuttingProxy
from tests.integration.resumable_client import Read, follow

GRACE = 3.0
CONFIG = f"""
heartbeat_interval = 0.5

[model]
parallel = 4
context_length = 4096

[streams]
grace = {GRACE}
buffer_bytes = 1048576

[tenants.alpha]
[tenants.beta]
"""
RESUMABLE = {"X-Stream-Resumable": "true"}


def story(max_tokens: int) -> dict[str, Any]:
    """A greedy streamed completion of exactly ``max_tokens`` tokens."""
    body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": max_tokens, "stream": True}
    return body | {"logit_bias": NO_EOS, "temperature": 0, "seed": 7}


@dataclass
class Deployment:
    server: Server
    keys: dict[str, str]
    ledger: Ledger

    def auth(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def start(
        self, url: str, body: dict[str, Any], *, resumable: bool = True, request_id: str = "r"
    ) -> AbstractContextManager[httpx.Response]:
        headers = self.auth("alpha") | {"X-Request-ID": request_id} | (RESUMABLE if resumable else {})
        return httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60)

    def resume(
        self, url: str, stream_id: str, after: int, tenant: str = "alpha"
    ) -> AbstractContextManager[httpx.Response]:
        headers = self.auth(tenant) | {"Last-Event-ID": str(after)}
        return httpx.stream("GET", f"{url}/v1/streams/{stream_id}", headers=headers, timeout=60)

    def record(self, request_id: str) -> dict[str, Any]:
        """The one record of the request sent with X-Request-ID ``request_id`` (the ledger adds a suffix)."""
        statement = select(usage_records).where(usage_records.c.request_id.startswith(f"{request_id}~"))

        def found() -> list[dict[str, Any]]:
            with self.ledger.engine.connect() as connection:
                return [dict(row) for row in connection.execute(statement).mappings()]

        assert wait_for(lambda: bool(found()), 15), f"no record for {request_id}"
        records = found()
        assert len(records) == 1, records
        return records[0]

    def idle(self) -> bool:
        return self.server.engine_stats()["slots_busy"] == 0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("resumable")
    store = FileKeyStore(directory / "state")
    keys = {tenant: store.create(tenant)[1] for tenant in ("alpha", "beta")}
    server = start_server(directory, CONFIG)
    ledger = Ledger.open(default_url(directory / "state"), migrate=False)
    try:
        yield Deployment(server, keys, ledger)
    finally:
        ledger.close()
        stop_server(server)


def request_id() -> str:
    return uuid.uuid4().hex


def test_a_cut_stream_resumed_is_the_stream_run_directly(deployment: Deployment) -> None:
    body = story(60)
    direct = Read()
    with deployment.start(deployment.server.url, body, resumable=False) as response:
        assert "X-Stream-Resumable" not in response.headers
        direct.consume(response)
    assert direct.ended
    port = int(deployment.server.url.rsplit(":", 1)[1])
    with CuttingProxy(("127.0.0.1", port), cut_after=2500) as proxy:
        rid = request_id()
        headers = deployment.auth("alpha") | {"X-Request-ID": rid}
        resumed, resumes = follow(proxy.url, "/v1/completions", body, headers)
        assert resumes >= 3 and proxy.cuts >= resumes  # the last cut may fall after the end
    assert resumed.ended and resumed.events[resumed.last] == "[DONE]"
    assert resumed.text() == direct.text() and len(resumed.events) == len(direct.events)
    assert sorted(resumed.events) == list(range(1, resumed.last + 1))  # none missing, none twice
    journal = deployment.server.state_dir / "streams" / f"{resumed.stream_id}.sse"
    assert resumed.frames() == journal.read_text()  # byte for byte what the server generated
    record = deployment.record(rid)
    assert record["resumed"] and record["completion_tokens"] == 60 and record["finish_reason"] == "length"


def test_a_stream_is_resumed_only_by_its_tenant_and_only_while_it_lasts(deployment: Deployment) -> None:
    url = deployment.server.url
    with deployment.start(url, story(3)) as response:
        stream_id = response.headers["X-Stream-Id"]
        response.read()
    for tenant, name in (("beta", stream_id), ("alpha", f"cmpl-{uuid.uuid4().hex}"), ("alpha", "cmpl-1%2E.")):
        with deployment.resume(url, name, 0, tenant) as answer:
            answer.read()
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "stream_not_found"
    with deployment.resume(url, stream_id, 0) as again:  # the whole stream, from the first event
        replay = Read()
        replay.consume(again)
        assert replay.ended and replay.last == 5  # 3 tokens, the finishing chunk, [DONE]
    headers = deployment.auth("alpha") | {"Last-Event-ID": "soon"}
    refused = httpx.get(f"{url}/v1/streams/{stream_id}", headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "Last-Event-ID"
    time.sleep(GRACE + 0.5)
    with deployment.resume(url, stream_id, 0) as expired:
        expired.read()
        assert expired.status_code == 404


def test_a_stream_past_its_buffer_ends_with_an_error_and_frees_its_slot(deployment: Deployment, tmp_path: Path) -> None:
    small = CONFIG.replace("buffer_bytes = 1048576", "buffer_bytes = 8192").replace("parallel = 4", "parallel = 1")
    server = start_server(tmp_path, small.replace("[tenants.alpha]\n[tenants.beta]\n", ""))
    try:
        read = Read()
        body = story(400)
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=RESUMABLE) as response:
            read.consume(response)
        error = json.loads(read.events[read.last])["error"]
        assert error["code"] == "stream_buffer_exceeded" and "8192-byte" in error["message"]
        assert 30 < read.last < 60  # about 190 bytes an event
        assert wait_for(lambda: server.engine_stats()["slots_busy"] == 0, 10)
    finally:
        stop_server(server)


def test_an_abandoned_stream_is_cancelled_after_the_grace_period(deployment: Deployment) -> None:
    rid = request_id()
    with deployment.start(deployment.server.url, story(4000), request_id=rid) as response:
        stream_id = response.headers["X-Stream-Id"]
        lines = response.iter_lines()
        while not next(lines).startswith("id: 3"):
            pass
    # Nobody reads it: it generates on for the grace period, then it is cancelled and its slot freed.
    assert not deployment.idle()
    assert wait_for(deployment.idle, GRACE + 10)
    record = deployment.record(rid)
    assert record["finish_reason"] == "cancelled" and 3 < record["completion_tokens"] < 4000
    assert not record["resumed"]
    journal = (deployment.server.state_dir / "streams" / f"{stream_id}.sse").read_text()
    assert journal.count("\n\n") > 3 and not journal.endswith(("[DONE]\n\n", '"}}\n\n'))  # no end, no error
    metrics = httpx.get(f"{deployment.server.url}/metrics").text
    assert "llmserve_streams_parked 0.0" in metrics and "llmserve_stream_resumes_total" in metrics


def test_a_drain_lets_a_parked_stream_finish(deployment: Deployment) -> None:
    """Last: it stops the server. A stream whose client left keeps its worker until it has generated."""
    rid = request_id()
    with deployment.start(deployment.server.url, story(120), request_id=rid) as response:
        stream_id = response.headers["X-Stream-Id"]
        next(response.iter_lines())
    deployment.server.process.send_signal(signal.SIGTERM)
    deployment.server.process.wait(timeout=60)
    journal = deployment.server.state_dir / "streams" / f"{stream_id}.sse"
    assert journal.read_text().endswith("data: [DONE]\n\n")
    assert deployment.record(rid)["completion_tokens"] == 120
