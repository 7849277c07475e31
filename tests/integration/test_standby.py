"""Warm standby behind the shipped HAProxy configuration (simulated backend): an instance started in
standby is warm but gets no request until it is activated through the admin API, then serves."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.fleet import HAProxy, Instance, balanced, instances, simulated_config, start_haproxy, stream

pytestmark = pytest.mark.slow

REQUESTS = 12


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Instance], HAProxy]]:
    base = tmp_path_factory.mktemp("standby")
    members = instances(base, 2, agent=True, config=simulated_config())
    members[1].settings["standby"] = "true"
    with balanced(base, members, start_haproxy) as proxy:
        yield members, proxy


def sent(proxy: HAProxy) -> dict[str, int]:
    return {name: int(row["stot"]) for name, row in proxy.servers().items()}


def send(proxy: HAProxy) -> dict[str, int]:
    """``REQUESTS`` streams through the balancer, six at a time; how many each server was sent."""
    before = sent(proxy)
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda _: stream(proxy.url, 12), range(REQUESTS)))
    assert all(outcome.finished for outcome in outcomes), [o for o in outcomes if not o.finished]
    return {name: count - before[name] for name, count in sent(proxy).items()}


def test_a_standby_instance_gets_no_traffic_until_activated(pair: tuple[list[Instance], HAProxy]) -> None:
    members, proxy = pair
    standby = members[1].server
    assert standby is not None
    assert proxy.wait_for_servers(
        lambda rows: rows["llmserve1"]["status"] == "UP" and rows["llmserve2"]["status"].startswith("DRAIN")
    )
    readiness = httpx.get(f"{standby.url}/readyz", timeout=5).json()
    assert readiness["status"] == "ready" and readiness["standby"] is True  # warm: activation loads nothing
    assert send(proxy) == {"llmserve1": REQUESTS, "llmserve2": 0}

    activated = httpx.post(f"{standby.url}/v1/admin/activate", timeout=5)
    assert activated.status_code == 200 and activated.json()["standby"] is False
    assert proxy.wait_for_servers(lambda rows: all(row["status"] == "UP" for row in rows.values()))
    assert send(proxy)["llmserve2"] >= 2  # six at a time over two instances of three slots each
