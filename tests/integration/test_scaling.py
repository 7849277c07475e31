"""The scaling signal on a real server: llmserve_desired_replicas rises above one instance under a backlog
and falls to 0 once the server is idle."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.conftest import MODEL, Server, long_stream_body, start_server, stop_server, wait_for

pytestmark = pytest.mark.slow

STREAMS = 3  # on one slot: one decoding, two queued


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("scaling"), model__embedded=MODEL, model__parallel="1")
    yield running
    stop_server(running)


def desired(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    match = re.search(r"^llmserve_desired_replicas (\S+)$", text, re.MULTILINE)
    assert match, "llmserve_desired_replicas is not exported"
    return float(match.group(1))


def test_the_signal_rises_under_a_backlog_and_falls_when_idle(one_slot: Server) -> None:
    assert wait_for(lambda: desired(one_slot) == 0.0, timeout=30)
    stop = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{one_slot.url}/v1/completions", json=long_stream_body(400), timeout=300) as reply:
            for _ in reply.iter_bytes():
                if stop.is_set():
                    return  # leaving cancels the generation (or the queued request)

    clients = [threading.Thread(target=stream) for _ in range(STREAMS)]
    for client in clients:
        client.start()
    try:
        assert wait_for(lambda: one_slot.engine_stats()["queued"] == STREAMS - 1, timeout=60)
        # One busy slot at 0.8 utilisation is 1.25 instances; two queued requests, before any request
        # has finished, two more slots' worth: 1.25 + 2.5.
        assert wait_for(lambda: desired(one_slot) == pytest.approx(3.75), timeout=30)
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=120)
    assert wait_for(lambda: one_slot.engine_stats()["slots_busy"] == 0, timeout=60)
    assert wait_for(lambda: desired(one_slot) == 0.0, timeout=30)
