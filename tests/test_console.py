"""The console's page and assets, and GET /v1/status, through the Flask test client (the browser drives the
console against a real server in tests/integration/test_console.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from llmserve.application import create_app
from llmserve.keys import FileKeyStore
from llmserve.models.activity import BUCKET_SECONDS
from llmserve.models.state import WorkerStatus
from llmserve.settings import Settings, TenantSettings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", tenants={"alpha": TenantSettings()})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_page_and_its_assets_need_no_key_and_allow_only_their_own_origin(settings: Settings) -> None:
    client = create_app(settings).test_client()
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'src="/console/console.js"' in page.data
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    script, style = client.get("/console/console.js"), client.get("/console/console.css")
    assert (script.status_code, style.status_code) == (200, 200)
    assert script.mimetype == "text/javascript" and style.mimetype == "text/css"
    assert script.headers["X-Content-Type-Options"] == "nosniff"


def test_an_unknown_asset_or_a_path_outside_the_assets_is_a_json_404(client: FlaskClient) -> None:
    for path in ("/console/missing.js", "/console/../application.py", "/console/%2e%2e/application.py"):
        response = client.get(path)
        assert response.status_code == 404 and response.json["error"]["type"] == "invalid_request_error", path


def test_the_console_can_be_turned_off(tmp_path: Path) -> None:
    client = create_app(Settings(cache_dir=tmp_path / "cache", console=False)).test_client()
    for path in ("/", "/console/console.js"):
        response = client.get(path)
        assert response.status_code == 404 and response.is_json


def _report(state_dir: Path, pid: int, last: int, busy: int, queued: int, tenants: dict[str, list[int]]) -> None:
    model = {
        "status": "ready",
        "version": "abc",
        "slots": 4,
        "busy": busy,
        "queued": queued,
        "tenants": tenants,
        "activity": {"last": last, "tokens": [50, 100], "queued": [0, queued]},
        "ttfts": [0.2, 0.4],
    }
    WorkerStatus(state_dir, pid).write({"pid": pid, "models": {"gemma-3-270m": model}})


def test_status_sums_every_live_worker_of_the_host_for_the_admin_only(settings: Settings) -> None:
    store = FileKeyStore(settings.state_dir)
    _, admin = store.create(None, admin=True)
    _, tenant = store.create("alpha")
    parent = os.getppid()  # another live process, standing for a second worker
    last = int(time.time() // BUCKET_SECONDS) - 1  # the window still ends there should a bucket end meanwhile
    _report(settings.state_dir, os.getpid(), last, busy=2, queued=1, tenants={"alpha": [2, 1]})
    _report(settings.state_dir, parent, last, busy=1, queued=0, tenants={"alpha": [1, 0]})
    _report(settings.state_dir, 2**22 + 12345, last, busy=4, queued=9, tenants={})  # died unannounced
    client = create_app(settings).test_client()
    assert client.get("/v1/status").status_code == 401
    assert client.get("/v1/status", headers=bearer(tenant)).status_code == 403
    status = client.get("/v1/status", headers=bearer(admin)).json
    assert status["workers"] == 2 and status["standby"] is False
    [model] = status["models"]
    assert model["status"] == "ready" and set(model["workers"]) == {str(os.getpid()), str(parent)}
    assert (model["slots_total"], model["slots_busy"], model["queued"]) == (8, 3, 1)
    assert model["tokens_per_second"] == round(300 / 60, 2)
    assert model["series"]["tokens_per_second"][-2:] == [100 / BUCKET_SECONDS, 200 / BUCKET_SECONDS]
    assert (model["ttft_p50_seconds"], model["ttft_p99_seconds"]) == (0.2, 0.4)
    assert status["tenants"] == [{"id": "alpha", "running": 3, "queued": 1}]
    me = client.get("/v1/tenants/me", headers=bearer(tenant)).json
    assert (me["running"], me["queued"]) == (3, 1)  # every worker's, not only the one that answered
