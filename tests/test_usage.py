"""Usage accounting without the model: how a step's time is split, how a request's end becomes a record,
the record's way into the ledger, GET /v1/usage through the Flask test client, and the ledger commands.
(tests/integration/test_usage.py runs the same through the real server.)"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from llmserve.accounting import EXTENSION as ACCOUNTING
from llmserve.accounting import Accounting, Origin, end_of_error, end_of_generation
from llmserve.api.request import ledger_request_id
from llmserve.api.runner import EngineTime
from llmserve.application import create_app
from llmserve.cli import main
from llmserve.engine.jobs import Finished, FinishReason, GenerationSpec, Job, Rejected, RejectReason
from llmserve.engine.slots import charge_step
from llmserve.engine.stream import EventStream
from llmserve.errors import (
    ClientDisconnected,
    EngineFailure,
    QueueFull,
    QueueTimeout,
    RateLimited,
    ServiceUnavailable,
)
from llmserve.keys import FileKeyStore
from llmserve.ledger.owner import JOBS_LOCK, OwnerLock
from llmserve.ledger.prices import ModelPrice, PriceSettings
from llmserve.ledger.report import parse_moment
from llmserve.ledger.settings import LedgerSettings, default_url
from llmserve.ledger.store import Ledger, open_ledger, usage_records
from llmserve.request_context import current_request
from llmserve.settings import Settings, TenantSettings
from tests.ledger_support import T0, make_record, postgres_schema

MODEL = "gemma-3-270m"


class NullSink:
    def push(self, event: object) -> None:
        pass


def job() -> Job:
    return Job(GenerationSpec((1, 2, 3), 4), NullSink())


# -- the engine's split of a step ------------------------------------------------------------------------


def test_a_step_is_split_by_the_tokens_each_job_put_into_it() -> None:
    decoding, prefilling, waiting = job(), job(), job()
    charge_step(0.2, [decoding, prefilling, waiting], [1, 99, 0])
    charge_step(0.1, [decoding], [1])
    assert decoding.engine_seconds == pytest.approx(0.002 + 0.1)
    assert prefilling.engine_seconds == pytest.approx(0.198)
    assert waiting.engine_seconds == 0.0


def test_the_shares_of_many_steps_add_up_to_their_time() -> None:
    jobs = [job() for _ in range(8)]
    total = 0.0
    for step in range(1000):
        seconds = 0.01 + step % 7 / 1000
        charge_step(seconds, jobs, [1 + (step + index) % 5 for index in range(8)])
        total += seconds
    assert sum(j.engine_seconds for j in jobs) == pytest.approx(total, rel=1e-12)


def test_a_step_without_tokens_charges_nobody() -> None:
    idle = job()
    charge_step(0.5, [idle], [0])
    assert idle.engine_seconds == 0.0


def test_engine_time_is_complete_once_every_job_has_reported() -> None:
    stream = EventStream()
    time_of = EngineTime(3)
    time_of.note(0, Finished(FinishReason.STOP, 0.25))
    assert not time_of.settle(stream, 0.0)
    stream.push(1, Rejected(RejectReason.QUEUE_TIMEOUT, 1.0))
    stream.push(2, Finished(FinishReason.CANCELLED, 0.5))
    assert time_of.settle(stream, 0.0)
    assert time_of.seconds == 0.75


# -- how a request's end is recorded -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (ClientDisconnected("gone"), 499, "cancelled"),
        (QueueTimeout("slow", retry_after=1), 503, "timeout"),
        (ServiceUnavailable("stopping", retry_after=1), 503, "shutting_down"),
        (EngineFailure("broken"), 500, "error"),
        (RuntimeError("a bug"), 500, "error"),
    ],
)
def test_errors_after_the_door_are_recorded_with_their_status(error: BaseException, status: int, reason: str) -> None:
    end = end_of_error(error)
    assert end is not None and (end.status, end.finish_reason) == (status, reason)


@pytest.mark.parametrize(
    "error",
    [QueueFull("full", retry_after=1), RateLimited("queue", kind="requests", retry_after=1, code="tenant_queue_full")],
)
def test_refusals_at_the_door_are_not_recorded(error: BaseException) -> None:
    assert end_of_error(error) is None


@pytest.mark.parametrize(
    ("reasons", "cancelled_by", "expected"),
    [
        ({0: "stop"}, None, "stop"),
        ({0: "stop", 1: "length"}, None, "length"),
        ({0: "tool_calls", 1: "stop"}, None, "tool_calls"),
        ({0: "stop"}, "client_disconnected", "cancelled"),
        ({}, "shutting_down", "shutting_down"),
        ({}, "engine_error", "error"),
        ({}, "grammar_budget_exceeded", "error"),
    ],
)
def test_a_generation_has_one_finish_reason(reasons: dict[int, str], cancelled_by: str | None, expected: str) -> None:
    end = end_of_generation(cancelled_by, reasons)
    assert (end.status, end.finish_reason) == (200, expected)


def test_a_client_chosen_request_id_is_made_unique_for_the_ledger(app: Flask) -> None:
    with app.test_request_context("/v1/completions", headers={"X-Request-ID": "mine-1"}):
        first, second = ledger_request_id(), ledger_request_id()
    assert first.startswith("mine-1~") and second.startswith("mine-1~") and first != second
    with app.test_request_context("/v1/completions"):
        assert ledger_request_id() == current_request().request_id  # generated: unique already


class SlowWork:
    """Engine work whose last event comes only after the response is complete (a stop sequence)."""

    def __init__(self, seconds: float) -> None:
        self.admitted_at: float | None = 0.0
        self._seconds = seconds
        self.checks = 0

    @property
    def engine_seconds(self) -> float:
        return self._seconds if self.checks > 1 else 0.0

    def settle(self, timeout: float) -> bool:
        self.checks += 1
        return self.checks > 1


@pytest.fixture
def priced_settings(tmp_path: Path) -> Settings:
    prices = PriceSettings(version="v7", models={"*": ModelPrice(prompt_per_1k=2.0, engine_second=10.0)})
    return Settings(
        cache_dir=tmp_path / "cache",
        state_dir=tmp_path / "state",
        prices=prices,
        ledger=LedgerSettings(flush_interval=0.05, backup_interval=0),
    )


def test_a_record_waits_for_the_engine_time_then_reaches_the_ledger_priced(priced_settings: Settings) -> None:
    open_ledger(default_url(priced_settings.state_dir)).close()  # what the gunicorn master does
    app = create_app(priced_settings)
    accounting: Accounting = app.extensions[ACCOUNTING]
    accounting.start()
    try:
        origin = Origin("req-slow", "k9", "embeddings", 0.0, MODEL, "a5fd3b62230a")
        accounting.record_embeddings(SlowWork(0.25), "default", origin, prompt_tokens=500)
    finally:
        accounting.stop()  # waits for the record, then writes it
    ledger = Ledger.open(default_url(priced_settings.state_dir), migrate=False)
    try:
        [row] = ledger.query(group_by=None)
        assert (row["requests"], row["prompt_tokens"], row["engine_seconds"]) == (1, 500, 0.25)
        assert row["cost"] == pytest.approx(500 * 2.0 / 1000 + 0.25 * 10.0)
        with ledger.engine.connect() as connection:
            [record] = connection.execute(select(usage_records)).mappings()
        assert (record["key_id"], record["model"], record["model_version"]) == ("k9", MODEL, "a5fd3b62230a")
    finally:
        ledger.close()
    sample = accounting.metrics.cost.labels(MODEL, "default")._value.get()
    assert sample == pytest.approx(3.5)


def test_without_a_started_ledger_records_are_counted_but_not_stored(app: Flask) -> None:
    accounting: Accounting = app.extensions[ACCOUNTING]
    accounting.record_embeddings(SlowWork(0.5), "default", Origin("req-1", None, "embeddings", 0.0, MODEL, None), 10)
    accounting.stop()
    assert accounting.ledger is None
    assert accounting.metrics.engine_seconds.labels(MODEL, "default")._value.get() == 0.5


# -- GET /v1/usage ---------------------------------------------------------------------------------------


@pytest.fixture
def usage_app(tmp_path: Path) -> Iterator[tuple[FlaskClient, dict[str, str]]]:
    tenants = {"alpha": TenantSettings(), "beta": TenantSettings()}
    app = create_app(Settings(cache_dir=tmp_path / "cache", state_dir=tmp_path / "state", tenants=tenants))
    store = FileKeyStore(tmp_path / "state")
    keys = {
        "alpha": store.create("alpha")[1],
        "beta": store.create("beta")[1],
        "admin": store.create(None, admin=True)[1],
    }
    ledger = open_ledger(default_url(tmp_path / "state"))
    ledger.insert_many(
        [make_record(1, tenant="alpha"), make_record(2, tenant="alpha"), make_record(3, tenant="beta", model="other")]
    )
    app.extensions[ACCOUNTING].ledger = ledger
    yield app.test_client(), keys
    ledger.close()


def get_usage(client: FlaskClient, key: str, **params: str) -> Any:
    return client.get("/v1/usage", query_string=params, headers={"Authorization": f"Bearer {key}"})


def test_a_tenant_sees_its_own_usage_only(usage_app: tuple[FlaskClient, dict[str, str]]) -> None:
    client, keys = usage_app
    response = get_usage(client, keys["alpha"])
    assert response.status_code == 200
    assert response.get_json() == {
        "object": "list",
        "data": [
            {
                "period": "2026-11-27T00:00:00Z",
                "tenant": "alpha",
                "model": MODEL,
                "requests": 2,
                "errors": 0,
                "prompt_tokens": 200,
                "cached_tokens": 40,
                "completion_tokens": 20,
                "engine_seconds": 1.0,
                "cost": 0.5,
            }
        ],
    }
    denied = get_usage(client, keys["alpha"], tenant="beta")
    assert denied.status_code == 403 and denied.get_json()["error"]["code"] == "permission_denied"


def test_the_admin_sees_every_tenant_and_may_pick_one(usage_app: tuple[FlaskClient, dict[str, str]]) -> None:
    client, keys = usage_app
    everyone = get_usage(client, keys["admin"], group_by="hour").get_json()["data"]
    assert [(row["tenant"], row["period"]) for row in everyone] == [
        ("alpha", "2026-11-27T10:00:00Z"),
        ("beta", "2026-11-27T10:00:00Z"),
    ]
    beta = get_usage(client, keys["admin"], tenant="beta", model="other").get_json()["data"]
    assert [(row["tenant"], row["model"], row["requests"]) for row in beta] == [("beta", "other", 1)]
    window = {"start": str(T0.timestamp() + 90), "end": "2026-11-27T10:05:00+00:00"}
    assert [row["requests"] for row in get_usage(client, keys["admin"], **window).get_json()["data"]] == [1, 1]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start": "soon"}, "start"),
        ({"end": "2026-13-01"}, "end"),
        ({"start": "2026-11-28", "end": "2026-11-27"}, "start"),
        ({"group_by": "minute"}, "group_by"),
        ({"page": "2"}, "page"),
    ],
)
def test_bad_parameters_get_a_400_naming_them(
    usage_app: tuple[FlaskClient, dict[str, str]], params: dict[str, str], param: str
) -> None:
    client, keys = usage_app
    response = get_usage(client, keys["admin"], **params)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == param


def test_a_server_without_a_ledger_says_so(client: FlaskClient) -> None:
    response = client.get("/v1/usage")
    assert response.status_code == 404 and "no usage ledger" in response.get_json()["error"]["message"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27", "2026-11-27T00:00:00+00:00"),
        ("2026-11-27T11:30:00+01:00", "2026-11-27T10:30:00+00:00"),
        ("2026-11-27T10:30:00Z", "2026-11-27T10:30:00+00:00"),
        ("1795773600", "2026-11-27T10:00:00+00:00"),
        ("1795773600.5", "2026-11-27T10:00:00.500000+00:00"),
    ],
)
def test_report_bounds_are_iso_times_or_unix_seconds(text: str, expected: str) -> None:
    assert parse_moment(text).isoformat() == expected


@pytest.mark.parametrize("text", ["soon", "", "1e400", "99999999999999999999"])
def test_other_bounds_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_moment(text)


# -- the ledger commands -----------------------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [name for name in os.environ if name.startswith("LLMSERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LLMSERVE_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_backup_then_restore_into_a_fresh_state_dir(state_dir: Path, tmp_path: Path, monkeypatch: Any) -> None:
    ledger = open_ledger(default_url(state_dir))
    ledger.insert_many([make_record(i, tenant=f"t{i % 3}") for i in range(50)])
    ledger.close()
    runner = CliRunner()
    taken = runner.invoke(main, ["backup", "--dir", str(tmp_path / "copies")])
    assert taken.exit_code == 0, taken.output
    backup_file = Path(taken.stdout.strip())
    assert backup_file.parent == tmp_path / "copies" and backup_file.with_name(backup_file.name + ".sha256").is_file()

    held = OwnerLock(state_dir / JOBS_LOCK)
    assert held.try_acquire()  # as a running server would
    try:
        refused = runner.invoke(main, ["restore", str(backup_file)])
        assert refused.exit_code != 0 and "stop it before restoring" in refused.output
    finally:
        held.release()

    monkeypatch.setenv("LLMSERVE_STATE_DIR", str(tmp_path / "fresh"))
    restored = runner.invoke(main, ["restore", str(backup_file)])
    assert restored.exit_code == 0, restored.output
    target = tmp_path / "fresh" / "ledger.db"
    assert restored.stdout == f"restored {target} from {backup_file} (checksum verified): 50 usage records\n"
    report = runner.invoke(main, ["usage", "report", "--format", "json", "--group-by", "hour"])
    monkeypatch.setenv("LLMSERVE_STATE_DIR", str(state_dir))
    original = runner.invoke(main, ["usage", "report", "--format", "json", "--group-by", "hour"])
    assert report.stdout == original.stdout
    assert sum(row["requests"] for row in json.loads(report.stdout)) == 50


def test_a_damaged_backup_is_not_restored(state_dir: Path, tmp_path: Path) -> None:
    ledger = open_ledger(default_url(state_dir))
    ledger.insert_many([make_record(1)])
    ledger.close()
    runner = CliRunner()
    backup_file = Path(runner.invoke(main, ["backup"]).stdout.strip())
    assert backup_file.parent == state_dir / "backups"
    damaged = bytearray(backup_file.read_bytes())
    damaged[200] ^= 0xFF
    backup_file.write_bytes(damaged)
    refused = runner.invoke(main, ["restore", str(backup_file)])
    assert refused.exit_code != 0 and "does not match its checksum" in refused.output


def test_the_report_filters_and_groups(state_dir: Path) -> None:
    ledger = open_ledger(default_url(state_dir))
    ledger.insert_many([make_record(i, tenant="a" if i < 3 else "b") for i in range(5)])
    ledger.close()
    report = CliRunner().invoke(main, ["usage", "report", "--tenant", "b", "--since", "2026-11-27T10:04:00Z"])
    assert report.exit_code == 0, report.output
    assert report.stdout.splitlines() == [
        "period,tenant,model,requests,errors,prompt_tokens,cached_tokens,completion_tokens,engine_seconds,cost",
        f"2026-11-27T00:00:00Z,b,{MODEL},1,0,100,20,10,0.5,0.25",
    ]
    bad = CliRunner().invoke(main, ["usage", "report", "--since", "last week"])
    assert bad.exit_code == 2 and "--since" in bad.output


def test_backups_of_a_postgresql_ledger_are_left_to_pg_dump(state_dir: Path, monkeypatch: Any) -> None:
    with postgres_schema() as url:
        monkeypatch.setenv("LLMSERVE_LEDGER__URL", url)
        refused = CliRunner().invoke(main, ["backup"])
    assert refused.exit_code != 0 and "pg_dump" in refused.output


def test_a_ledger_that_cannot_be_opened_is_named_without_its_password(state_dir: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("LLMSERVE_LEDGER__URL", "postgresql+psycopg://llmserve:hunter2@127.0.0.1:1/ledger")
    failed = CliRunner().invoke(main, ["usage", "report"])
    assert failed.exit_code != 0
    assert "cannot open the usage ledger at postgresql+psycopg://llmserve:***@127.0.0.1:1/ledger" in failed.output
    assert "hunter2" not in failed.output
