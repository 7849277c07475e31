"""Tenants, API keys and request quotas through the Flask test client (the model is never loaded; the
token quota and the queues are tested against the real server)."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from llmserve.application import create_app
from llmserve.cli import main
from llmserve.errors import RateLimited
from llmserve.keys import FileKeyStore
from llmserve.quotas import Quotas, current_quotas
from llmserve.settings import Settings, SettingsError, TenantSettings, load_settings
from llmserve.tenancy import Tenant

MODEL = "gemma-3-270m"
TENANTS = {
    "alpha": TenantSettings(weight=3, requests_per_minute=2),
    "beta": TenantSettings(models=("smollm2-135m-instruct",)),
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", tenants=TENANTS)


@pytest.fixture
def store(settings: Settings) -> FileKeyStore:
    return FileKeyStore(settings.state_dir)


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    yield create_app(settings)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_key_is_stored_only_as_a_hash_in_a_private_file(store: FileKeyStore) -> None:
    record, key = store.create("alpha")
    assert key.startswith("sk-llmserve-") and record.id in key
    content = store.path.read_text()
    secret = key.removeprefix(f"sk-llmserve-{record.id}-")  # may itself hold "-": it is URL-safe base64
    assert len(secret) == 43
    assert key not in content and secret not in content
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert store.authenticate(key) == record
    assert store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.authenticate("sk-llmserve-nothing") is None
    assert store.authenticate("") is None


def test_a_revoked_key_is_refused_by_a_store_that_already_loaded_it(store: FileKeyStore, settings: Settings) -> None:
    _, key = store.create("alpha")
    worker_view = FileKeyStore(settings.state_dir)
    assert worker_view.authenticate(key) is not None
    record = store.create("alpha")[0]
    store.revoke(store.list()[0].id)
    assert worker_view.authenticate(key) is None
    assert [k.id for k in worker_view.list() if k.active] == [record.id]


def test_missing_and_wrong_keys_get_openai_401s(client: FlaskClient, store: FileKeyStore) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.json["error"]["code"] == "missing_api_key"
    response = client.get("/v1/models", headers=bearer("sk-llmserve-abc-def"))
    assert response.status_code == 401
    assert response.json["error"] == {
        "message": "Incorrect API key provided: sk-llmse***-def.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }


def test_bearer_and_x_api_key_are_both_accepted(client: FlaskClient, store: FileKeyStore) -> None:
    _, key = store.create("alpha")
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": key}).status_code == 200


def test_probes_and_metrics_need_no_key(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code in (200, 503)
    assert client.get("/readyz").status_code == 503  # the model is not loaded in these tests
    assert client.get("/metrics").status_code == 200


def test_a_tenant_sees_only_the_models_it_may_use(client: FlaskClient, store: FileKeyStore) -> None:
    _, alpha = store.create("alpha")
    _, beta = store.create("beta")
    listed = [m["id"] for m in client.get("/v1/models", headers=bearer(alpha)).json["data"]]
    assert listed == [MODEL, "smollm2-135m-instruct"]
    assert [m["id"] for m in client.get("/v1/models", headers=bearer(beta)).json["data"]] == ["smollm2-135m-instruct"]
    for response in (
        client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=bearer(beta)),
        client.get(f"/v1/models/{MODEL}", headers=bearer(beta)),
    ):
        assert response.status_code == 404
        assert response.json["error"]["code"] == "model_not_found"


def test_admin_endpoints_need_the_admin_key(client: FlaskClient, store: FileKeyStore) -> None:
    _, tenant_key = store.create("alpha")
    _, admin_key = store.create(None, admin=True)
    assert client.get("/v1/tenants", headers=bearer(tenant_key)).status_code == 403
    listing = client.get("/v1/tenants", headers=bearer(admin_key))
    assert listing.status_code == 200
    assert [t["id"] for t in listing.json["data"]] == ["alpha", "beta"]
    assert listing.json["data"][0]["weight"] == 3
    refused = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=bearer(admin_key))
    assert refused.status_code == 403
    assert refused.json["error"]["code"] == "permission_denied"


def test_with_tenants_the_metrics_need_the_admin_key_or_a_trusted_network(
    client: FlaskClient, store: FileKeyStore
) -> None:
    """The metrics name every tenant and its traffic; loopback is trusted by default, a proxied request
    (X-Forwarded-For) and any other address are not."""
    _, tenant_key = store.create("alpha")
    _, admin_key = store.create(None, admin=True)
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert client.get("/metrics", environ_base=remote).status_code == 403
    assert client.get("/metrics", environ_base=remote, headers=bearer(tenant_key)).status_code == 403
    assert client.get("/metrics", environ_base=remote, headers=bearer(admin_key)).status_code == 200
    refused = client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert refused.status_code == 403
    assert refused.json["error"]["code"] == "permission_denied"
    assert client.get("/metrics").status_code == 200  # a scrape from this host


def test_metrics_networks_can_trust_no_address(settings: Settings) -> None:
    client = create_app(settings.model_copy(update={"metrics_networks": []})).test_client()
    assert client.get("/metrics").status_code == 403


def test_without_tenants_anyone_who_reaches_the_server_reads_the_metrics(tmp_path: Path) -> None:
    client = create_app(Settings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state")).test_client()
    assert client.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.9"}).status_code == 200


def test_a_tenant_sees_its_own_limits_and_what_is_left(client: FlaskClient, store: FileKeyStore) -> None:
    _, key = store.create("alpha")
    client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=bearer(key))
    me = client.get("/v1/tenants/me", headers=bearer(key)).json
    assert me["id"] == "alpha"
    assert me["requests_per_minute"] == 2
    assert me["quota_remaining"]["requests"]["remaining"] == 1


def test_the_request_quota_answers_429_with_retry_after(client: FlaskClient, store: FileKeyStore) -> None:
    _, key = store.create("alpha")
    _, other = store.create("beta")
    body = {"model": MODEL, "prompt": "hi"}
    first = client.post("/v1/completions", json=body, headers=bearer(key))  # 503: the model is loading
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}, headers=bearer(key))
    refused = client.post("/v1/completions", json=body, headers=bearer(key))
    assert refused.status_code == 429
    assert refused.json["error"]["type"] == "requests"
    assert refused.json["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 61  # the window is one minute
    assert client.post("/v1/embeddings", json={"model": MODEL, "input": "x"}, headers=bearer(key)).status_code == 429
    # Another tenant's quota is its own (beta has none), and non-model endpoints are not counted.
    assert client.post("/v1/completions", json=body, headers=bearer(other)).status_code != 429
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200


def test_repeated_bad_keys_from_one_address_get_429_but_good_keys_pass(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"auth_failures_per_minute": 3}))
    client = app.test_client()
    _, good = FileKeyStore(settings.state_dir).create("alpha")
    statuses = [client.get("/v1/models", headers=bearer(f"sk-llmserve-x{i}-y")).status_code for i in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    assert client.get("/v1/models", headers=bearer(good)).status_code == 200


def test_without_tenants_loopback_needs_no_key(tmp_path: Path) -> None:
    client = create_app(Settings(cache_dir=tmp_path, state_dir=tmp_path)).test_client()
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/tenants/me").json["id"] == "default"


def test_a_public_address_without_tenants_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVE_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="llmserve keys create --tenant NAME"):
        load_settings()
    monkeypatch.setenv("LLMSERVE_ALLOW_UNAUTHENTICATED", "true")
    assert load_settings().host == "0.0.0.0"


def test_tenants_come_from_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "llmserve.toml"
    config.write_text('[tenants.team-a]\nweight = 2\ntokens_per_minute = 1000\npriority = "batch"\n')
    monkeypatch.setenv("LLMSERVE_CONFIG", str(config))
    tenant = load_settings().tenants["team-a"]
    assert (tenant.weight, tenant.tokens_per_minute, tenant.priority) == (2, 1000, "batch")
    config.write_text('[tenants."bad name!"]\n')
    with pytest.raises(SettingsError, match="tenant name"):
        load_settings()


def test_the_keys_commands_create_list_and_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("LLMSERVE_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "llmserve.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n[tenants.alpha]\n')
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "--config", str(config), "--tenant", "alpha"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("sk-llmserve-")
    unknown = runner.invoke(main, ["keys", "create", "--config", str(config), "--tenant", "nobody"])
    assert unknown.exit_code != 0 and "no tenant 'nobody'" in unknown.output
    listed = runner.invoke(main, ["keys", "list", "--config", str(config)])
    key_id = listed.stdout.split()[0]
    assert "tenant=alpha" in listed.stdout and "revoked=-" in listed.stdout
    assert runner.invoke(main, ["keys", "revoke", "--config", str(config), key_id]).exit_code == 0
    assert FileKeyStore(tmp_path / "state").authenticate(key) is None
    records = json.loads((tmp_path / "state" / "keys.json").read_text())
    assert records[0]["revoked"] is not None


@pytest.fixture
def quotas(app: Flask) -> Quotas:
    with app.app_context():
        return current_quotas()


def left(quotas: Quotas, tenant: Tenant) -> int:
    return quotas.remaining(tenant)["tokens"]["remaining"]  # type: ignore[index]


def test_tokens_are_reserved_then_settled_to_what_was_used(quotas: Quotas) -> None:
    tenant = Tenant("t", TenantSettings(tokens_per_minute=1000))
    reservation = quotas.reserve_tokens(tenant, 300, needed=20)
    assert left(quotas, tenant) == 700
    quotas.settle(reservation, 50)
    assert left(quotas, tenant) == 950
    quotas.settle(quotas.reserve_tokens(tenant, 100, needed=20), 160)  # beyond its reservation: charged too
    assert left(quotas, tenant) == 790


def test_a_request_wanting_more_than_a_minute_reserves_the_minute_and_one_needing_more_never_runs(
    quotas: Quotas,
) -> None:
    tenant = Tenant("t", TenantSettings(tokens_per_minute=1000))
    reservation = quotas.reserve_tokens(tenant, 5000, needed=30)  # max_tokens defaulted to the whole context
    assert reservation is not None and reservation.amount == 1000
    with pytest.raises(RateLimited) as busy:
        quotas.reserve_tokens(tenant, 10, needed=10)
    assert busy.value.retry_after is not None and busy.value.retry_after >= 1
    with pytest.raises(RateLimited) as too_large:
        quotas.reserve_tokens(tenant, 1200, needed=1200)
    assert too_large.value.retry_after is None  # waiting would not help


def test_a_refund_never_reaches_a_later_window(quotas: Quotas) -> None:
    tenant = Tenant("t", TenantSettings(tokens_per_minute=1000))
    reservation = quotas.reserve_tokens(tenant, 400, needed=10)
    assert reservation is not None
    stale = replace(reservation, window_reset=time.time() - 1)  # reserved in a window that has ended
    quotas.settle(stale, 0)
    assert left(quotas, tenant) == 600
