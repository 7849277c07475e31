"""A fleet with tenants behind the shipped HAProxy configuration: API keys shared through the ledger's
PostgreSQL database (key_store = "ledger"), so that a key created with the CLI on one host works on all
three replicas at once and, once revoked, fails on all of them within seconds; TLS ending at the
balancer; and each client counted by its own address behind it (trusted_proxies), not the balancer's."""

from __future__ import annotations

import random
import ssl
import subprocess
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.integration.conftest import LLMSERVE, cli_env, wait_for
from tests.integration.fleet import (
    FLEET_MODEL,
    HAProxy,
    Instance,
    instances,
    running,
    simulated_config,
    start_haproxy,
)
from tests.ledger_support import POSTGRES_URL, postgres_object

TENANT = "\n[tenants.alpha]\nweight = 1\n"
AUTH_FAILURES = 3  # per client address and minute, counted in Redis for the whole fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Instance]]:
    base = tmp_path_factory.mktemp("fleet-keys")
    with postgres_object("DATABASE", "llmserve_keys") as name:
        url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        members = instances(
            base,
            3,
            agent=True,
            config=simulated_config() + TENANT,
            key_store="ledger",
            key_refresh_interval="0.5",
            ledger__url=url,
            trusted_proxies='["127.0.0.1"]',
            rate_limit_storage="redis://127.0.0.1:6379/14",
            auth_failures_per_minute=str(AUTH_FAILURES),
        )
        with running(members):
            yield members


def cli(member: Instance, *arguments: str) -> str:
    env = cli_env(member.directory) | {f"LLMSERVE_{key.upper()}": value for key, value in member.settings.items()}
    result = subprocess.run([LLMSERVE, "keys", *arguments], capture_output=True, text=True, env=env, check=True)
    return result.stdout.strip()


def fresh_client() -> str:
    """An address no earlier request came from, so that failed-authentication counters of other tests (and
    of earlier runs, which Redis keeps for a minute) do not turn these tests' 401s into 429s."""
    return f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"


def status(member: Instance, key: str, client: str) -> int:
    """The status of a completion sent directly to ``member`` for ``client``: 127.0.0.1 is a trusted proxy,
    so the instance believes the X-Forwarded-For it sets."""
    assert member.server is not None
    body = {"model": FLEET_MODEL, "prompt": "hi", "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}", "X-Forwarded-For": client}
    return httpx.post(f"{member.server.url}/v1/completions", json=body, headers=headers, timeout=30).status_code


def test_a_key_created_on_one_host_works_on_every_replica_at_once(fleet: list[Instance]) -> None:
    key, client = cli(fleet[0], "create", "--tenant", "alpha"), fresh_client()
    assert [status(member, key, client) for member in fleet] == [200, 200, 200]
    assert [status(member, key[:-2] + "xx", client) for member in fleet] == [401, 401, 401]


def test_a_revoked_key_fails_on_every_replica_within_seconds(fleet: list[Instance]) -> None:
    key, client = cli(fleet[1], "create", "--tenant", "alpha"), fresh_client()
    assert [status(member, key, client) for member in fleet] == [200, 200, 200]
    key_id = key.removeprefix("sk-llmserve-").split("-")[0]
    cli(fleet[2], "revoke", key_id)
    # Each poll from a new address: the polls' own 401s must not reach the failed-authentication limit.
    assert wait_for(lambda: all(status(member, key, fresh_client()) == 401 for member in fleet), 10)
    listed = cli(fleet[0], "list")
    assert f"{key_id}  tenant=alpha" in listed and "revoked=-" not in listed.split(key_id)[1].splitlines()[0]


@pytest.fixture(scope="module")
def proxy(fleet: list[Instance], tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAProxy]:
    balancer = start_haproxy(tmp_path_factory.mktemp("fleet-keys-haproxy"), fleet)
    assert balancer.wait_for_servers(lambda servers: all(row["status"] == "UP" for row in servers.values()))
    yield balancer
    balancer.stop()


def client_from(address: str, proxy: HAProxy) -> httpx.Client:
    """A client connecting from ``address`` (any 127.x.y.z is this host), trusting the test certificate."""
    trusting = ssl.create_default_context(cafile=str(proxy.certificate))
    transport = httpx.HTTPTransport(local_address=address, verify=trusting)
    return httpx.Client(base_url=proxy.tls_url, transport=transport, timeout=30)


def test_behind_tls_each_client_is_counted_by_its_own_address(fleet: list[Instance], proxy: HAProxy) -> None:
    key = cli(fleet[0], "create", "--tenant", "alpha")
    body = {"model": FLEET_MODEL, "prompt": "hi", "max_tokens": 2}
    network = f"127.{random.randrange(1, 250)}.{random.randrange(1, 250)}"  # counters of earlier runs stay clean
    guesser, bystander = f"{network}.2", f"{network}.3"
    with client_from(guesser, proxy) as client:
        bad = {"Authorization": "Bearer sk-llmserve-000000000000-guess"}
        statuses = [
            client.post("/v1/completions", json=body, headers=bad).status_code for _ in range(AUTH_FAILURES + 1)
        ]
        assert statuses == [401] * AUTH_FAILURES + [429]
        good = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert good.status_code == 200  # valid keys from that address still pass
    with client_from(bystander, proxy) as client:
        assert client.post("/v1/completions", json=body, headers=bad).status_code == 401  # not the guesser's 429
    logs = "".join(member.server.log.read_text() for member in fleet if member.server is not None)
    assert f'"client": "{guesser}"' in logs and f'"client": "{bystander}"' in logs
