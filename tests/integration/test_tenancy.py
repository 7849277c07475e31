"""Tenants through the real server: keys, token quotas, per-tenant queues, fair sharing, and one quota
shared by two workers through a real Redis."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.integration.conftest import (
    LLMSERVE,
    MODEL,
    NO_EOS,
    Server,
    cli_env,
    create_key,
    long_stream_body,
    start_server,
    stop_server,
    wait_for,
)

pytestmark = pytest.mark.slow

TENANTS = """
[tenants.alpha]
tokens_per_minute = 100

[tenants.beta]
max_running = 1
max_queued = 1

[tenants.gamma]
tokens_per_minute = 1000
"""
REDIS_URL = "redis://127.0.0.1:6379/15"


@pytest.fixture(scope="module")
def tenant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenants")


@pytest.fixture(scope="module")
def tenant_server(tenant_dir: Path) -> Iterator[Server]:
    running = start_server(tenant_dir, config=TENANTS, model__parallel="4")
    yield running
    stop_server(running)


def client_for(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_wrong_and_revoked_keys_get_401(tenant_server: Server, tenant_dir: Path) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        client_for(tenant_server, "sk-llmserve-0123-nope").models.list()
    assert wrong.value.code == "invalid_api_key"
    key = create_key(tenant_dir, "gamma")
    client = client_for(tenant_server, key)
    assert [model.id for model in client.models.list()] == [MODEL, "smollm2-135m-instruct"]
    key_id = key.removeprefix("sk-llmserve-").split("-")[0]
    revoke = [LLMSERVE, "keys", "revoke", "--config", str(tenant_dir / "llmserve.toml"), key_id]
    subprocess.run(revoke, check=True, capture_output=True, env=cli_env(tenant_dir))
    with pytest.raises(openai.AuthenticationError):
        client.models.list()  # the running workers see the revocation at once


def test_token_quota_runs_out_with_a_429_and_retry_after(tenant_server: Server, tenant_dir: Path) -> None:
    client = client_for(tenant_server, create_key(tenant_dir, "alpha"))
    request = dict(model=MODEL, prompt="One, two,", max_tokens=40, temperature=0, logit_bias=NO_EOS)
    for _ in range(2):  # each reserves and uses its prompt plus 40 tokens, of 100 a minute
        client.completions.create(**request)  # type: ignore[call-overload]
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(**request)  # type: ignore[call-overload]
    response = refused.value.response
    assert response.json()["error"]["type"] == "tokens"
    assert 1 <= int(response.headers["Retry-After"]) <= 61
    assert int(response.headers["x-ratelimit-limit-tokens"]) == 100
    metrics = httpx.get(f"{tenant_server.url}/metrics").text
    assert 'llmserve_rejections_total{model="gemma-3-270m",reason="rate_limit_exceeded"}' in metrics
    assert 'llmserve_errors_total{code="rate_limit_exceeded",status="429"}' in metrics


def test_readiness_details_are_for_those_who_may_read_the_metrics(tenant_server: Server) -> None:
    """The plain answer stays open to balancers; the engine details (tenants' load) do not go through a proxy."""
    direct = httpx.get(f"{tenant_server.url}/readyz", timeout=5)
    proxied = httpx.get(f"{tenant_server.url}/readyz", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=5)
    assert direct.status_code == proxied.status_code == 200
    assert "alpha" in direct.json()["models"][MODEL]["engine"]["tenants"]
    version = direct.json()["models"][MODEL]["version"]
    assert proxied.json()["models"][MODEL] == {"status": "ready", "version": version, "backend": "llama.cpp"}


def test_unused_reserved_tokens_are_given_back(tenant_server: Server, tenant_dir: Path) -> None:
    key = create_key(tenant_dir, "gamma")
    client = client_for(tenant_server, key)
    result = client.completions.create(model=MODEL, prompt="Hello", max_tokens=500, stop=[" "], temperature=0)
    assert result.usage is not None and result.usage.completion_tokens < 20
    me = httpx.get(f"{tenant_server.url}/v1/tenants/me", headers={"x-api-key": key}).json()
    used = result.usage.prompt_tokens + result.usage.completion_tokens
    assert me["quota_remaining"]["tokens"]["remaining"] == 1000 - used


def test_a_tenant_over_its_queue_cap_gets_429_while_others_are_served(tenant_server: Server, tenant_dir: Path) -> None:
    beta = create_key(tenant_dir, "beta")
    headers = {"Authorization": f"Bearer {beta}"}
    url = f"{tenant_server.url}/v1/completions"
    queued: dict[str, httpx.Response] = {}
    with httpx.stream("POST", url, json=long_stream_body(400), headers=headers, timeout=120) as running:
        assert running.status_code == 200
        waiter = threading.Thread(
            target=lambda: queued.update(r=httpx.post(url, json=long_stream_body(2), headers=headers, timeout=120))
        )
        waiter.start()
        assert wait_for(lambda: tenant_server.engine_stats()["tenants"]["beta"]["queued"] == 1)
        with pytest.raises(openai.RateLimitError) as refused:
            client_for(tenant_server, beta).completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert refused.value.code == "tenant_queue_full"
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        # beta holds one slot of four; another tenant is not held up by beta's queue.
        other = client_for(tenant_server, create_key(tenant_dir, "gamma"))
        assert other.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices
    waiter.join()
    assert queued["r"].status_code == 200  # it got beta's slot once the stream was closed


@pytest.fixture
def shared_quota_servers(tmp_path: Path) -> Iterator[Server]:
    redis.Redis.from_url(REDIS_URL).flushdb()
    config = "[tenants.alpha]\nrequests_per_minute = 4\n"
    running = start_server(  # one model: the two workers' engines are the two "ready in" lines
        tmp_path,
        config=config,
        workers="2",
        model__id=MODEL,
        model__parallel="1",
        model__threads="1",
        rate_limit_storage=REDIS_URL,
    )
    yield running
    stop_server(running)


def test_two_workers_enforce_one_combined_limit_through_redis(shared_quota_servers: Server, tmp_path: Path) -> None:
    key = create_key(tmp_path, "alpha")
    assert wait_for(lambda: shared_quota_servers.log.read_text().count("ready in") == 2, timeout=120)
    statuses = []
    for _ in range(8):  # a new connection each time: the kernel spreads them over both workers
        response = httpx.post(
            f"{shared_quota_servers.url}/v1/embeddings",
            json={"model": MODEL, "input": "hi"},
            headers={"Authorization": f"Bearer {key}", "Connection": "close"},
            timeout=60,
        )
        statuses.append(response.status_code)
    assert statuses.count(200) == 4 and statuses.count(429) == 4, statuses
    assert statuses[:4] == [200] * 4


def test_a_black_holed_redis_fails_open_within_the_timeout(tmp_path: Path) -> None:
    """Redis accepts the connection (the kernel does) but never answers: every quota call gives up after
    ``rate_limit_timeout`` and the request is served, uncounted, instead of hanging."""
    black_hole = socket.create_server(("127.0.0.1", 0), backlog=64)  # never accepted, never answered
    port = black_hole.getsockname()[1]
    config = "[tenants.alpha]\ntokens_per_minute = 10000\n"  # counted by the server's own calls to Redis
    server = start_server(
        tmp_path, config=config, rate_limit_storage=f"redis://127.0.0.1:{port}/0", rate_limit_timeout="0.2"
    )
    try:
        key = create_key(tmp_path, "alpha")
        for _ in range(2):
            response = httpx.post(
                f"{server.url}/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert response.status_code == 200
            assert response.json()["usage"]["completion_tokens"] == 2
        assert "quota storage unavailable" in server.log.read_text(errors="replace")
    finally:
        stop_server(server)
        black_hole.close()


def test_embeddings_wait_their_turn_fairly_and_within_the_queue_caps(tmp_path: Path) -> None:
    """Embedding requests go through a fair scheduler of their own: tenant A floods it beyond its
    max_queued (429s), and B's one request runs next after A's running one, not after all of A's."""
    config = "[tenants.a]\nmax_queued = 3\n[tenants.b]\n"
    server = start_server(tmp_path, config=config)
    try:
        a, b = create_key(tmp_path, "a"), create_key(tmp_path, "b")
        url = f"{server.url}/v1/embeddings"
        inputs = [f"sentence number {i} " + "about lighthouses and the sea " * 6 for i in range(24)]
        finished: list[str] = []
        answers: dict[str, tuple[int, str | None]] = {}

        def run(name: str, key: str) -> None:
            response = httpx.post(url, json={"model": MODEL, "input": inputs}, headers={"x-api-key": key}, timeout=300)
            code = None if response.status_code == 200 else response.json()["error"]["code"]
            answers[name] = (response.status_code, code)
            if response.status_code == 200:
                finished.append(name)

        threads = [threading.Thread(target=run, args=(f"a{i}", a)) for i in range(6)]
        for thread in threads:
            thread.start()
        assert wait_for(lambda: server.engine_stats()["tenants"]["a"]["queued"] == 3, timeout=60)
        threads.append(threading.Thread(target=run, args=("b", b)))
        threads[-1].start()
        for thread in threads:
            thread.join(timeout=300)
        assert set(answers.values()) == {(200, None), (429, "tenant_queue_full")}, answers
        assert answers["b"] == (200, None)
        assert finished.index("b") <= 2, finished  # after A's running request, and perhaps the next
    finally:
        stop_server(server)


def test_a_waiting_tenant_gets_the_next_slot_before_a_flooding_one(tmp_path: Path) -> None:
    """Two slots, tenant A holds both and has more waiting; B's single request takes the next free slot
    (first come, first served would put it behind all of A's)."""
    config = "[tenants.a]\n[tenants.b]\n"
    server = start_server(tmp_path, config=config, model__parallel="2")
    try:
        a, b = create_key(tmp_path, "a"), create_key(tmp_path, "b")
        url = f"{server.url}/v1/completions"
        finished: dict[str, float] = {}

        def run(name: str, key: str, tokens: int) -> None:
            body = {**long_stream_body(tokens), "stream": False}
            response = httpx.post(url, json=body, headers={"x-api-key": key}, timeout=300)
            assert response.status_code == 200
            finished[name] = time.monotonic()

        threads = [threading.Thread(target=run, args=(f"a{i}", a, 60)) for i in range(5)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        assert wait_for(lambda: server.engine_stats()["tenants"]["a"]["queued"] == 3)
        threads.append(threading.Thread(target=run, args=("b", b, 60)))
        threads[-1].start()
        for thread in threads:
            thread.join(timeout=300)
        later_a = sorted(finished[f"a{i}"] for i in range(2, 5))
        assert finished["b"] < later_a[1], finished  # B ran in the first slot that freed, beside a2 at most
    finally:
        stop_server(server)
