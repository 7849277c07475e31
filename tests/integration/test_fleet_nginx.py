"""Two llmserve instances behind the shipped nginx configuration: requests spread, a SIGTERM loses no
request, and a stream whose tokens come slower than nginx's read timeout survives on heartbeats."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.fleet import (
    FLEET_MODEL,
    Balancer,
    Instance,
    Load,
    balanced,
    instances,
    resumed_in_steps,
    simulated_config,
    start_nginx,
    stream,
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Instance], Balancer]]:
    base = tmp_path_factory.mktemp("nginx-fleet")
    members = instances(base, 2, agent=False, config=simulated_config(), graceful_timeout="20")
    with balanced(base, members, start_nginx) as balancer:
        yield members, balancer


def generated(instance: Instance) -> int:
    assert instance.server is not None
    return int(instance.server.engine_stats(FLEET_MODEL)["generated_tokens"])


def test_requests_spread_over_both_instances(fleet: tuple[list[Instance], Balancer]) -> None:
    members, balancer = fleet
    before = [generated(member) for member in members]
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda _: stream(balancer.url, 16), range(18)))
    assert all(outcome.finished for outcome in outcomes), [o for o in outcomes if not o.finished][:3]
    tokens = [generated(member) - already for member, already in zip(members, before, strict=True)]
    assert sum(tokens) == 18 * 16
    assert min(tokens) >= 4 * 16, tokens  # least_conn with 6 at a time over 2 x 3 slots: about 9 each


def test_a_resume_is_passed_on_until_the_instance_that_holds_the_stream(
    fleet: tuple[list[Instance], Balancer],
) -> None:
    """nginx cannot remember which instance generated a stream; for a resume it asks the instances in turn
    until one holds it (the others' 404 means "not mine"), so every resume succeeds."""
    _, balancer = fleet
    read = resumed_in_steps(balancer.url, resumes=7)
    assert read.ended and read.events[read.last] == "[DONE]"
    assert sorted(read.events) == list(range(1, read.last + 1))


def test_a_sigterm_loses_no_request(fleet: tuple[list[Instance], Balancer]) -> None:
    members, balancer = fleet
    leaving = members[0]
    assert leaving.server is not None
    with Load(balancer.url, clients=4, max_tokens=20) as load:
        time.sleep(1.5)
        leaving.server.process.send_signal(signal.SIGTERM)
        leaving.server.process.wait(timeout=30)
        time.sleep(1.5)
    assert len(load.outcomes) > 10
    assert load.failed == [], load.failed[:3]


def test_nginx_answers_an_error_object_when_no_instance_can(fleet: tuple[list[Instance], Balancer]) -> None:
    members, balancer = fleet
    for member in members:
        member.stop()
    body = {"model": FLEET_MODEL, "prompt": "hi", "max_tokens": 2}
    response = httpx.post(f"{balancer.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "bad_gateway"


def test_a_stream_slower_than_the_read_timeout_survives_on_heartbeats(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.mktemp("nginx-heartbeats")
    # A token every 2.5 s, a heartbeat every 0.5 s, and nginx giving up after 1 s without a byte.
    (slow,) = instances(base, 1, agent=False, config=simulated_config(step_seconds=2.5), heartbeat_interval="0.5")
    slow.start()
    balancer = start_nginx(base, [slow], read_timeout="1s")
    try:
        started = time.monotonic()
        outcome = stream(balancer.url, 3)
        assert outcome.finished, outcome
        assert time.monotonic() - started > 3 * 1.0  # it outlived nginx's read timeout several times over
    finally:
        balancer.stop()
        slow.stop()
