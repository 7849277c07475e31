"""Aliases through the real server: sessions stick to one version and split by the canary's weight, a
canary made bad (the chaos_error_rate drill) is rolled back by the judge with no failed client request,
and blue-green is a weight of 100 and a promotion."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.models.routing import BUCKETS, bucket
from tests.integration.conftest import MODEL, Server, start_server, stop_server, wait_for

pytestmark = pytest.mark.slow

CHAT_MODEL = "smollm2-135m-instruct"
CONFIG = f"""
[model]
parallel = 4
threads = 1
embeddings = false
[models.{MODEL}]
embedded = "{MODEL}"
[models.{CHAT_MODEL}]
embedded = "{CHAT_MODEL}"
[models.chat-bad]
embedded = "{CHAT_MODEL}"
chaos_error_rate = 1.0
[aliases.chat]
stable = "{CHAT_MODEL}"
[canary]
min_requests = 10
window = 60
interval = 0.5
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("aliases"), CONFIG)
    yield running
    stop_server(running)


def set_alias(server: Server, **routing: Any) -> None:
    response = httpx.put(f"{server.url}/v1/admin/aliases/chat", json=routing, timeout=10)
    assert response.status_code == 200, response.text


def alias(server: Server) -> dict[str, Any]:
    aliases = httpx.get(f"{server.url}/v1/admin/aliases", timeout=10).json()["data"]
    return next(entry for entry in aliases if entry["id"] == "chat")


def answered_by(server: Server, session: str, client: httpx.Client | None = None) -> str:
    body = {"model": "chat", "prompt": "Once upon a time", "max_tokens": 2, "user": session}
    response = (client or httpx).post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    model: str = response.json()["model"]
    return model


def test_sessions_stick_and_split_by_the_canary_weight(server: Server) -> None:
    assert "chat" in [card["id"] for card in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]]
    set_alias(server, stable=CHAT_MODEL, canary=MODEL, canary_weight=30)
    probe = next(f"probe-{n}" for n in count() if bucket("default", f"probe-{n}") < 0.30 * BUCKETS)
    assert wait_for(lambda: answered_by(server, probe) == MODEL, 10)  # every worker routes by the new weight
    sessions = [f"user-{number}" for number in range(80)]
    with httpx.Client() as client:
        routed = {session: answered_by(server, session, client) for session in sessions}
        # The same session again, however often: the same version.
        assert all(answered_by(server, session, client) == routed[session] for session in sessions[:10])
    expected = {s: MODEL if bucket("default", s) < 0.30 * BUCKETS else CHAT_MODEL for s in sessions}
    assert routed == expected
    share = sum(model == MODEL for model in routed.values()) / len(sessions)
    assert 0.15 <= share <= 0.45, share  # within tolerance of the weight (80 sessions)
    set_alias(server, stable=CHAT_MODEL)


def test_a_bad_canary_is_rolled_back_and_no_client_sees_an_error(server: Server) -> None:
    set_alias(server, stable=CHAT_MODEL, canary="chat-bad", canary_weight=50)
    # A session the earlier alias sent to the old canary: answered by stable once the worker follows.
    probe = next(f"probe-{n}" for n in count() if bucket("default", f"probe-{n}") < 0.30 * BUCKETS)
    assert wait_for(lambda: answered_by(server, probe) == CHAT_MODEL, 10)
    statuses: list[int] = []
    models: list[str] = []

    def client(number: int) -> None:
        with httpx.Client() as http:
            for turn in range(8):
                body = {"model": "chat", "prompt": "Hello", "max_tokens": 2, "user": f"client-{number}-{turn}"}
                response = http.post(f"{server.url}/v1/completions", json=body, timeout=60)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    models.append(response.json()["model"])

    threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert statuses == [200] * 64  # the canary's failures were answered by stable
    assert set(models) == {CHAT_MODEL}
    assert wait_for(lambda: alias(server)["canary_weight"] == 0, timeout=30)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'llmserve_canary_rollbacks_total{alias="chat",canary="chat-bad"} 1.0' in metrics
    retries = re.search(r'^llmserve_canary_retries_total\{alias="chat"\} (\S+)$', metrics, re.MULTILINE)
    # The judge needs 3 canary failures to be sure (significance 0.001 against the 5% bound), and every
    # one of them was a request answered by stable.
    assert retries is not None and float(retries.group(1)) >= 3
    assert 'llmserve_model_requests_total{model="chat-bad",outcome="error"' in metrics
    assert "canary chat-bad rolled back to weight 0" in server.log.read_text(errors="replace")


def test_blue_green_switches_every_session_then_promotes(server: Server) -> None:
    set_alias(server, stable=CHAT_MODEL, canary=MODEL, canary_weight=100)  # sessions all move to the canary
    assert wait_for(lambda: all(answered_by(server, f"bg-{n}") == MODEL for n in range(5)), 10)
    promoted = httpx.post(f"{server.url}/v1/admin/aliases/chat/promote", timeout=10)
    assert promoted.status_code == 200
    assert promoted.json() == {
        "id": "chat",
        "object": "alias",
        "stable": MODEL,
        "canary": None,
        "canary_weight": 0.0,
        "promote_after": None,
    }
    assert wait_for(lambda: all(answered_by(server, f"bg-{n}") == MODEL for n in range(10)), 10)


def test_alias_changes_that_cannot_work_are_refused(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/v1/admin/aliases"
    assert httpx.put(f"{url}/chat", json={"stable": "nothing"}, timeout=10).status_code == 404
    assert httpx.put(f"{url}/{MODEL}", json={"stable": CHAT_MODEL}, timeout=10).status_code == 400
    same = httpx.put(f"{url}/chat", json={"stable": CHAT_MODEL, "canary": CHAT_MODEL}, timeout=10)
    assert same.status_code == 400 and "must differ" in same.json()["error"]["message"]
    assert httpx.post(f"{url}/none/promote", timeout=10).status_code == 404


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    directory = tmp_path_factory.mktemp("golden")
    golden = directory / "golden.jsonl"
    config = CONFIG.replace("chaos_error_rate = 1.0", "") + f'golden_set = "{golden}"\ngolden_margin = 0.34\n'
    running = start_server(directory, config)
    yield running, golden
    stop_server(running)


def test_a_canary_whose_golden_answers_differ_is_refused_before_any_traffic(gated: tuple[Server, Path]) -> None:
    """The golden set holds stable's own greedy answers: a copy of stable passes, another model does not."""
    server, golden = gated
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Roses are red,"]
    cases = []
    for prompt in prompts:
        body = {"model": CHAT_MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        cases.append(json.dumps({"prompt": prompt, "expect": answer, "max_tokens": 4}))
    golden.write_text("\n".join(cases) + "\n")
    refused = httpx.put(
        f"{server.url}/v1/admin/aliases/chat", json={"stable": CHAT_MODEL, "canary": MODEL, "canary_weight": 10}
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "quality_gate_failed"
    assert alias(server)["canary"] is None  # unchanged: the canary got no traffic
    passed = httpx.put(
        f"{server.url}/v1/admin/aliases/chat",
        json={"stable": CHAT_MODEL, "canary": "chat-bad", "canary_weight": 10},  # here a plain copy of stable
        timeout=120,
    )
    assert passed.status_code == 200, passed.text
    scores = passed.json()["golden_set"]
    assert scores["stable"]["total"] == 3 and scores["canary"]["passed"] >= scores["stable"]["passed"] - 1
    assert alias(server)["canary"] == "chat-bad"
