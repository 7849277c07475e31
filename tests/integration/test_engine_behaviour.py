"""How the server behaves under concurrency: a native engine thread, a responsive hub, cancellation,
back-pressure with honest 503s."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, NO_EOS, Server, long_stream_body, start_server, stop_server, wait_for

pytestmark = pytest.mark.slow


def test_the_engine_runs_on_its_own_native_thread(server: Server) -> None:
    health = httpx.get(f"{server.url}/healthz", timeout=5).json()
    (worker,) = server.worker_pids()
    engine_thread = health["models"][MODEL]["engine_thread"]
    assert engine_thread != worker  # not the worker's main (hub) thread
    assert Path(f"/proc/{worker}/task/{engine_thread}").exists()  # a real OS thread of the worker


def test_health_answers_quickly_while_streams_run(client: openai.OpenAI, server: Server) -> None:
    finished: list[str] = []

    def stream() -> None:
        chunks = client.completions.create(
            model=MODEL, prompt="Write about the sea.", max_tokens=48, logit_bias=NO_EOS, stream=True
        )
        finished.append("".join(c.choices[0].text for c in chunks))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: server.engine_stats()["slots_busy"] >= 2)
    latencies = []
    with httpx.Client(timeout=5) as http:
        while any(t.is_alive() for t in threads):
            started = time.perf_counter()
            assert http.get(f"{server.url}/healthz").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert len(finished) == 4 and all(finished)
    # A hub blocked by decoding would show waits of whole decode steps; this bound is loose on purpose.
    assert len(latencies) >= 5
    assert max(latencies) < 1.0, latencies


def test_a_client_that_disconnects_frees_its_slot(server: Server) -> None:
    with httpx.stream("POST", f"{server.url}/v1/completions", json=long_stream_body(2000), timeout=60) as response:
        events = (line for line in response.iter_lines() if line.startswith("data:"))
        for _ in range(3):
            next(events)
        assert server.engine_stats()["slots_busy"] == 1
    assert wait_for(lambda: server.engine_stats()["slots_busy"] == 0, timeout=5)
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert 'llmserve_cancellations_total{model="gemma-3-270m",reason="client_disconnected"}' in metrics
    # A client leaving is a cancellation, not an exception the request failed with.
    assert "llmserve_http_request_exceptions_total{" not in metrics


def test_a_non_streaming_client_that_leaves_frees_its_slot(server: Server) -> None:
    body = {**long_stream_body(3000), "stream": False}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
    # 3000 tokens take a minute; a slot free within seconds means the generation was cancelled.
    assert wait_for(lambda: server.engine_stats()["slots_busy"] == 0, timeout=5)


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("one-slot"),
        model__parallel="1",
        queue_size="1",
        queue_timeout="1.5",
        model__embeddings="false",
    )
    yield running
    stop_server(running)


def test_queue_full_and_queue_timeout_are_503_with_retry_after(one_slot_server: Server) -> None:
    url = f"{one_slot_server.url}/v1/completions"
    with httpx.stream("POST", url, json=long_stream_body(3000), timeout=60) as holder:
        assert holder.status_code == 200
        results: dict[str, httpx.Response] = {}
        waiting = threading.Thread(
            target=lambda: results.update(queued=httpx.post(url, json=long_stream_body(5), timeout=30))
        )
        waiting.start()
        assert wait_for(lambda: one_slot_server.engine_stats()["queued"] == 1)
        full = httpx.post(url, json=long_stream_body(5), timeout=30)
        waiting.join()
    assert full.status_code == 503
    assert full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["Retry-After"]) >= 1
    timed_out = results["queued"]
    assert timed_out.status_code == 503
    assert timed_out.json()["error"]["code"] == "queue_timeout"
    assert int(timed_out.headers["Retry-After"]) >= 1


def test_the_openai_client_sees_a_503_it_can_retry(one_slot_server: Server) -> None:
    client = one_slot_server.client(max_retries=0, timeout=30)
    url = f"{one_slot_server.url}/v1/completions"
    with httpx.stream("POST", url, json=long_stream_body(3000), timeout=60):
        assert wait_for(lambda: one_slot_server.engine_stats()["slots_busy"] == 1)
        with pytest.raises(openai.InternalServerError) as raised:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert raised.value.status_code == 503
    assert json.loads(raised.value.response.text)["error"]["type"] == "server_error"


def test_embeddings_can_be_switched_off(one_slot_server: Server) -> None:
    response = httpx.post(f"{one_slot_server.url}/v1/embeddings", json={"model": MODEL, "input": "x"}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"


def test_n_choices_compute_their_shared_prompt_once(server: Server, client: openai.OpenAI) -> None:
    prompt = "A report on the lighthouses of the northern coast, volume seven. " * 16
    before = server.engine_stats()["prompt_tokens"]
    result = client.completions.create(model=MODEL, prompt=prompt, n=3, max_tokens=4, temperature=0, logit_bias=NO_EOS)
    computed = server.engine_stats()["prompt_tokens"] - before
    assert result.usage is not None and result.usage.prompt_tokens_details is not None
    length = result.usage.prompt_tokens  # the prompt counts once, however many choices share it
    assert length > 64
    assert computed < 2 * length  # one prefill, two copies (each re-decodes only the last token)
    assert result.usage.prompt_tokens_details.cached_tokens < length  # what the computing choice found
    assert len({choice.text for choice in result.choices}) == 1


def test_a_follow_up_request_reuses_the_cached_conversation(client: openai.OpenAI) -> None:
    first = "User: tell me about the harbour of the old town and its boats.\nAssistant:" * 4
    answer = client.completions.create(model=MODEL, prompt=first, max_tokens=8, temperature=0)
    follow_up = first + answer.choices[0].text + "\nUser: and the fishermen?\nAssistant:"
    result = client.completions.create(model=MODEL, prompt=follow_up, max_tokens=4, temperature=0)
    assert result.usage is not None and result.usage.prompt_tokens_details is not None
    assert answer.usage is not None
    assert result.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens - 1


def test_another_sessions_prompt_does_not_evict_a_cached_one(client: openai.OpenAI) -> None:
    """Two sessions whose prompts share only an opening phrase, taking turns: each finds its own prompt
    still cached, because the second one went to a free slot instead of over the first's cache."""
    opening = "You are a helpful assistant. "
    sessions = [
        opening + f"Session {name}: " + f"notes on the {topic} and its history. " * 12
        for name, topic in [("one", "lighthouse of the northern cape"), ("two", "salt marshes of the southern estuary")]
    ]
    for prompt in sessions:
        client.completions.create(model=MODEL, prompt=prompt + "First question?", max_tokens=2, temperature=0)
    for prompt in sessions:
        result = client.completions.create(model=MODEL, prompt=prompt + "Next?", max_tokens=2, temperature=0)
        assert result.usage is not None and result.usage.prompt_tokens_details is not None
        assert result.usage.prompt_tokens_details.cached_tokens >= result.usage.prompt_tokens - 8, result.usage
