"""Warm standby's flag, its admin endpoints, /readyz and the CLI, through the Flask test client and
click's runner (tests/test_agent.py: the agent's answer; tests/integration/test_standby.py: HAProxy)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient

from llmserve.application import create_app
from llmserve.cli import main
from llmserve.keys import FileKeyStore
from llmserve.settings import Settings, TenantSettings
from llmserve.standby import Standby


def test_the_flag_says_whether_it_changed(tmp_path: Path) -> None:
    standby = Standby(tmp_path)
    assert not standby.on and not standby.set(False)
    assert standby.set(True) and standby.on and not standby.set(True)
    assert standby.set(False) and not standby.on


def test_the_admin_key_switches_standby_and_readiness_reports_it(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", tenants={"alpha": TenantSettings()})
    store = FileKeyStore(settings.state_dir)
    _, admin = store.create(None, admin=True)
    _, tenant = store.create("alpha")
    client: FlaskClient = create_app(settings).test_client()
    admin_key, tenant_key = ({"Authorization": f"Bearer {key}"} for key in (admin, tenant))
    assert client.post("/v1/admin/standby", headers=tenant_key).status_code == 403
    assert client.post("/v1/admin/standby", headers=admin_key).json["standby"] is True
    assert client.get("/v1/admin/instance", headers=admin_key).json["standby"] is True
    assert client.get("/readyz").json["standby"] is True  # ready or not, it says so
    assert client.post("/v1/admin/activate", headers=admin_key).json["standby"] is False
    assert "standby" not in client.get("/readyz").json
    assert not Standby(settings.state_dir).on


def test_the_cli_switches_the_same_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVE_STATE_DIR", str(tmp_path / "state"))
    runner = CliRunner()
    assert runner.invoke(main, ["standby"]).output == "in standby\n"
    assert Standby(tmp_path / "state").on
    assert runner.invoke(main, ["activate"]).output == "activated\n"
    assert runner.invoke(main, ["activate"]).output == "not in standby\n"
