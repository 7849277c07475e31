"""The usage ledger: the store on SQLite and PostgreSQL alike, migrations, the writer, prices, reports and
the jobs' single owner."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy import inspect
from sqlalchemy.exc import DataError, OperationalError

from llmserve.ledger import report
from llmserve.ledger.jobs import JobRunner, start_jobs
from llmserve.ledger.migrate import alembic_config
from llmserve.ledger.native import wait_until
from llmserve.ledger.owner import JOBS_LOCK, OwnerLock
from llmserve.ledger.prices import PriceSettings, PriceTable
from llmserve.ledger.records import UsageRecord
from llmserve.ledger.settings import LedgerSettings, default_url
from llmserve.ledger.store import CONNECT_TIMEOUT, HOUR, Ledger, LedgerUnavailable, hour_of, metadata, open_ledger
from llmserve.ledger.writer import LedgerWriter
from tests.ledger_support import T0, ledger_url, make_record

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_url(request.param, tmp_path) as value:
        yield value


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    opened = Ledger.open(url)
    yield opened
    opened.close()


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger.open(default_url(tmp_path / "state"))
    yield opened
    opened.close()


def without_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "id"} for row in rows]


# -- store ---------------------------------------------------------------------------------------------------


def test_insert_many_stores_every_record(ledger: Ledger) -> None:
    assert ledger.insert_many([make_record(i) for i in range(5)]) == 5
    assert ledger.insert_many([]) == 0
    assert ledger.count() == 5


def test_a_duplicate_request_id_is_ignored_not_raised(ledger: Ledger) -> None:
    ledger.insert_many([make_record(1)])
    again = [make_record(1, tenant="other", cost=9.0), make_record(2), make_record(2)]
    assert ledger.insert_many(again) == 1
    assert ledger.count() == 2
    assert ledger.query(tenant="other") == []  # the first write of req-1 stands


def test_query_sums_per_tenant_and_model(ledger: Ledger) -> None:
    ledger.insert_many(
        [
            make_record(1),
            make_record(2, status=429, prompt_tokens=0, cached_tokens=0, completion_tokens=0, cost=0.0),
            make_record(3, model="other-model"),
            make_record(4, tenant="beta", engine_seconds=2.0, cost=1.0),
        ]
    )
    rows = ledger.query()
    assert [(row["tenant"], row["model"]) for row in rows] == [
        ("acme", "gemma-3-270m"),
        ("acme", "other-model"),
        ("beta", "gemma-3-270m"),
    ]
    assert rows[0] == {
        "tenant": "acme",
        "model": "gemma-3-270m",
        "requests": 2,
        "errors": 1,
        "prompt_tokens": 100,
        "cached_tokens": 20,
        "completion_tokens": 10,
        "engine_seconds": pytest.approx(1.0),
        "cost": pytest.approx(0.25),
    }
    assert all(type(rows[0][name]) is int for name in ("requests", "errors", "prompt_tokens"))
    assert type(rows[0]["cost"]) is float
    assert rows[2]["engine_seconds"] == pytest.approx(2.0)


def test_query_filters_by_tenant_model_and_half_open_time_range(ledger: Ledger) -> None:
    ledger.insert_many([make_record(i) for i in range(10)] + [make_record(100, tenant="beta")])
    assert [row["requests"] for row in ledger.query(tenant="acme")] == [10]
    assert ledger.query(model="nope") == []
    since, until = T0 + timedelta(minutes=2), T0 + timedelta(minutes=5)
    assert ledger.query(tenant="acme", since=since, until=until)[0]["requests"] == 3  # minutes 2, 3, 4
    assert ledger.query(tenant="beta", until=T0 + timedelta(minutes=100)) == []


def test_query_groups_by_utc_hour_and_day(ledger: Ledger) -> None:
    # 22:30 and 23:30 on the 27th, then 00:30 on the 28th; 23:45 on the 27th in UTC-05:00 is 04:45 on the 28th.
    late = datetime(2026, 11, 27, 22, 30, tzinfo=UTC)
    ledger.insert_many(
        [
            make_record(1, started_at=late),
            make_record(2, started_at=late + timedelta(minutes=10)),
            make_record(3, started_at=late + HOUR),
            make_record(4, started_at=late + 2 * HOUR),
            make_record(5, started_at=datetime(2026, 11, 27, 23, 45, tzinfo=timezone(timedelta(hours=-5)))),
        ]
    )
    hourly = ledger.query(group_by="hour")
    assert [(row["period"], row["requests"]) for row in hourly] == [
        (datetime(2026, 11, 27, 22, tzinfo=UTC), 2),
        (datetime(2026, 11, 27, 23, tzinfo=UTC), 1),
        (datetime(2026, 11, 28, 0, tzinfo=UTC), 1),
        (datetime(2026, 11, 28, 4, tzinfo=UTC), 1),
    ]
    daily = ledger.query(group_by="day")
    assert [(row["period"], row["requests"], row["prompt_tokens"]) for row in daily] == [
        (datetime(2026, 11, 27, tzinfo=UTC), 3, 300),
        (datetime(2026, 11, 28, tzinfo=UTC), 2, 200),
    ]
    assert daily[0]["cost"] == pytest.approx(0.75)
    assert "period" not in ledger.query()[0]


def test_roll_up_is_idempotent_and_agrees_with_the_records(ledger: Ledger) -> None:
    ledger.insert_many([make_record(i * 7, tenant=f"t{i % 3}") for i in range(30)])  # 10:00 to 13:23
    hours = [T0 + n * HOUR for n in range(4)]
    for hour in hours:
        ledger.roll_up(hour)
    assert [ledger.roll_up(hour) for hour in hours] == [3, 3, 3, 3]
    from_records = ledger.query(group_by="hour")
    assert ledger.query(group_by="hour", rollups=True) == from_records
    assert ledger.query(group_by="day", rollups=True) == ledger.query(group_by="day")

    ledger.insert_many([make_record(1000, started_at=T0 + timedelta(minutes=59), tenant="t0")])  # arrives late
    assert ledger.query(group_by="hour", rollups=True) == from_records  # not rolled up yet
    ledger.roll_up(T0)
    assert ledger.query(group_by="hour", rollups=True) == ledger.query(group_by="hour")
    assert ledger.roll_up(T0 + 10 * HOUR) == 0


def test_roll_up_and_rollup_reports_need_whole_hours(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="start of an hour"):
        ledger.roll_up(T0 + timedelta(minutes=5))
    with pytest.raises(ValueError, match="start of an hour"):
        ledger.roll_up(T0.replace(tzinfo=None))
    with pytest.raises(ValueError, match="whole-hour"):
        ledger.query(since=T0 + timedelta(minutes=5), rollups=True)


def test_times_come_back_as_aware_utc(ledger: Ledger) -> None:
    tokyo = timezone(timedelta(hours=9))
    ledger.insert_many([make_record(1, started_at=datetime(2026, 11, 27, 19, 30, 15, 250000, tzinfo=tokyo))])
    with ledger.engine.connect() as connection:
        (stored,) = connection.execute(metadata.tables["usage_records"].select()).mappings().all()
    assert stored["started_at"] == datetime(2026, 11, 27, 10, 30, 15, 250000, tzinfo=UTC)
    assert stored["started_at"].tzinfo is UTC
    assert stored["started_hour"] == datetime(2026, 11, 27, 10, tzinfo=UTC)
    assert hour_of(stored["started_at"]) == stored["started_hour"]


# -- migrations --------------------------------------------------------------------------------------------


def test_opening_twice_migrates_once_and_the_schema_matches_the_tables(url: str) -> None:
    first = Ledger.open(url)
    first.insert_many([make_record(1)])
    second = Ledger.open(url)  # already at head: changes nothing
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with second.engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head
        assert compare_metadata(MigrationContext.configure(connection), metadata) == []
        tables = set(inspect(connection).get_table_names())
    assert tables == {"alembic_version", "usage_records", "usage_hourly", "api_keys"}
    assert second.count() == 1
    first.close()
    second.close()


def test_concurrent_opens_of_a_new_ledger_all_succeed(url: str) -> None:
    errors: list[BaseException] = []
    opened: list[Ledger] = []

    def open_one() -> None:
        try:
            opened.append(Ledger.open(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [ledger.count() for ledger in opened] == [0, 0, 0, 0]
    for ledger in opened:
        ledger.close()


def test_sqlite_ledger_is_in_wal_mode_with_normal_sync(sqlite_ledger: Ledger) -> None:
    with sqlite_ledger.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    assert sqlite_ledger.sqlite_path is not None
    assert sqlite_ledger.sqlite_path.name == "ledger.db"


# -- writer ------------------------------------------------------------------------------------------------


def test_records_from_many_threads_all_land(ledger: Ledger) -> None:
    writer = LedgerWriter(ledger, flush_interval=0.05)
    writer.start()

    def submit_many(thread: int) -> None:
        for i in range(250):
            assert writer.submit(make_record(thread * 1000 + i))

    threads = [threading.Thread(target=submit_many, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert writer.close(timeout=30)
    assert ledger.count() == 2000
    assert writer.pending == 0
    assert writer.dropped == 0


def test_a_full_batch_is_written_without_waiting_for_the_interval(sqlite_ledger: Ledger) -> None:
    writer = LedgerWriter(sqlite_ledger, flush_interval=60, batch_size=100)
    writer.start()
    for i in range(100):
        writer.submit(make_record(i))
    assert wait_until(lambda: sqlite_ledger.count() == 100, 10)
    writer.submit(make_record(100))
    time.sleep(0.2)
    assert sqlite_ledger.count() == 100  # one record waits for the interval...
    assert writer.close(timeout=10)  # ...or for close
    assert sqlite_ledger.count() == 101


def test_a_failing_database_is_retried_and_nothing_is_lost(
    sqlite_ledger: Ledger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_insert = sqlite_ledger.insert_many
    attempts: list[int] = []

    def flaky_insert(records: list[UsageRecord]) -> int:
        attempts.append(len(records))
        if len(attempts) <= 2:
            raise OperationalError("INSERT INTO usage_records ...", {}, Exception("database is locked"))
        return real_insert(records)

    monkeypatch.setattr(sqlite_ledger, "insert_many", flaky_insert)
    writer = LedgerWriter(sqlite_ledger, flush_interval=0.01, retry_initial=0.05)
    writer.start()
    for i in range(50):
        writer.submit(make_record(i))
    assert wait_until(lambda: len(attempts) >= 3, 10)
    for i in range(50, 60):
        writer.submit(make_record(i))
    assert writer.close(timeout=10)
    assert sqlite_ledger.count() == 60
    failures = [r for r in caplog.records if r.name == "llmserve.ledger.writer" and r.levelno == logging.WARNING]
    assert len(failures) == 2
    assert "database is locked" in failures[0].getMessage()


def test_close_gives_up_at_its_deadline_and_says_what_was_lost(
    sqlite_ledger: Ledger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(records: list[UsageRecord]) -> int:
        raise OperationalError("INSERT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(sqlite_ledger, "insert_many", broken)
    writer = LedgerWriter(sqlite_ledger, flush_interval=0.01, retry_initial=0.05)
    writer.start()
    for i in range(7):
        writer.submit(make_record(i))
    started = time.monotonic()
    assert not writer.close(timeout=0.5)
    assert time.monotonic() - started < 3
    assert writer.pending == 7
    assert any("7 usage records could not be written" in r.getMessage() for r in caplog.records)


def test_a_full_buffer_drops_and_reports_the_count(sqlite_ledger: Ledger, caplog: pytest.LogCaptureFixture) -> None:
    writer = LedgerWriter(sqlite_ledger, max_pending=10)  # not started: nothing is written yet
    accepted = [writer.submit(make_record(i)) for i in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert writer.dropped == 5
    assert writer.close(timeout=10)
    assert sqlite_ledger.count() == 10
    assert any(r.levelno == logging.ERROR and "5 usage records dropped" in r.getMessage() for r in caplog.records)
    assert not writer.submit(make_record(99))  # after close


def test_a_record_the_database_refuses_does_not_hold_back_the_others(
    sqlite_ledger: Ledger, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_insert = sqlite_ledger.insert_many

    def picky_insert(records: list[UsageRecord]) -> int:
        if any(record.request_id == "req-3" for record in records):
            raise DataError("INSERT", {}, Exception("value too long for type character varying(64)"))
        return real_insert(records)

    monkeypatch.setattr(sqlite_ledger, "insert_many", picky_insert)
    writer = LedgerWriter(sqlite_ledger, flush_interval=0.01)
    writer.start()
    for i in range(6):
        writer.submit(make_record(i))
    assert writer.close(timeout=10)
    assert sqlite_ledger.count() == 5
    refused = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refused) == 1
    assert "req-3" in refused[0].getMessage()


WRITER_UNDER_GEVENT = """
from gevent import monkey
monkey.patch_all()
import sys, threading
import gevent
from llmserve.ledger.jobs import JobRunner
from llmserve.ledger.native import wait_until
from llmserve.ledger.store import Ledger
from llmserve.ledger.writer import LedgerWriter
from tests.ledger_support import make_record

native_ident = monkey.get_original("_thread", "get_ident")
hub_thread = native_ident()
seen = {}
ledger = Ledger.open(sys.argv[1])
real_insert = ledger.insert_many
def insert(records):
    seen["writer"] = native_ident()
    return real_insert(records)
ledger.insert_many = insert
writer = LedgerWriter(ledger, flush_interval=0.01)
writer.start()
for i in range(300):
    writer.submit(make_record(i))
assert writer.close(10) and ledger.count() == 300
runner = JobRunner(ledger, __import__("pathlib").Path(sys.argv[2]), backup_interval=0, claim_interval=0.05)
ledger.roll_up = lambda hour: seen.setdefault("jobs", native_ident())
runner.start()
scheduler_thread = type(runner._scheduler._thread).__module__
assert wait_until(lambda: "jobs" in seen, 10)
runner.stop()
print(scheduler_thread, seen["writer"] != hub_thread, seen["jobs"] != hub_thread)
"""


def test_under_gevent_the_writer_and_jobs_run_on_native_threads(url: str, tmp_path: Path) -> None:
    """After patch_all, APScheduler's thread is a greenlet; the ledger's own threads must not be."""
    result = subprocess.run(
        [sys.executable, "-c", WRITER_UNDER_GEVENT, url, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["gevent.threading", "True", "True"]


# -- prices and records ------------------------------------------------------------------------------------


PRICES = {
    "version": "2026-11",
    "models": {
        "*": {"prompt_per_1k": 0.1, "completion_per_1k": 0.4, "engine_second": 0.01},
        "big-model": {"prompt_per_1k": 1.0, "completion_per_1k": 2.0},
    },
}


def test_cost_per_model_falls_back_to_the_default_price() -> None:
    table = PriceTable.from_dict(PRICES)
    assert table.version == "2026-11"
    assert table.cost_of("gemma-3-270m", 2000, 500, 3.0) == pytest.approx(0.2 + 0.2 + 0.03)
    assert table.cost_of("big-model", 2000, 500, 3.0) == pytest.approx(2.0 + 1.0)  # no engine price of its own


def test_priced_records_carry_their_cost_and_price_version() -> None:
    record = PriceTable.from_dict(PRICES).priced(make_record(1, cost=0.0, price_version=""))
    assert record.cost == pytest.approx(100 * 0.1 / 1000 + 10 * 0.4 / 1000 + 0.5 * 0.01)
    assert record.price_version == "2026-11"


def test_without_a_default_price_unlisted_models_cost_nothing() -> None:
    table = PriceTable(PriceSettings())
    assert table.version == "unpriced"
    assert table.cost_of("anything", 10_000, 10_000, 100.0) == 0.0


def test_price_settings_are_validated() -> None:
    with pytest.raises(ValidationError):
        PriceTable.from_dict({"models": {"*": {"prompt_per_1k": -1}}})
    with pytest.raises(ValidationError):
        PriceTable.from_dict({"models": {"*": {"per_token": 1}}})


def test_records_are_utc_and_name_a_known_endpoint() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_record(1, started_at=datetime(2026, 11, 27, 10, 0))
    with pytest.raises(ValueError, match="endpoint"):
        make_record(1, endpoint="images")
    paris = make_record(1, started_at=datetime(2026, 11, 27, 11, 0, tzinfo=timezone(timedelta(hours=1))))
    assert paris.started_at == T0
    assert paris.started_at.utcoffset() == timedelta(0)


# -- reports -----------------------------------------------------------------------------------------------


def test_reports_render_as_csv_and_json(sqlite_ledger: Ledger) -> None:
    sqlite_ledger.insert_many([make_record(1), make_record(2, tenant="beta", started_at=T0 + 25 * HOUR)])
    daily = sqlite_ledger.query(group_by="day")
    lines = list(csv.reader(io.StringIO(report.render(daily, "csv"))))
    assert lines[0] == list(report.COLUMNS)
    assert lines[1][:4] == ["2026-11-27T00:00:00Z", "acme", "gemma-3-270m", "1"]
    assert lines[2][:3] == ["2026-11-28T00:00:00Z", "beta", "gemma-3-270m"]
    objects = json.loads(report.render(daily, "json"))
    assert objects[0]["period"] == "2026-11-27T00:00:00Z"
    assert list(objects[0]) == list(report.COLUMNS)
    assert objects[1]["cost"] == pytest.approx(0.25)
    totals = list(csv.reader(io.StringIO(report.to_csv(sqlite_ledger.query()))))
    assert totals[0][0] == "tenant"
    assert report.to_json([]) == "[]\n"


# -- jobs --------------------------------------------------------------------------------------------------


def test_exactly_one_runner_owns_the_jobs_and_another_takes_over(sqlite_ledger: Ledger, tmp_path: Path) -> None:
    runners = [JobRunner(sqlite_ledger, tmp_path, backup_interval=0, claim_interval=0.05) for _ in range(2)]
    for runner in runners:
        runner.start()
    try:
        assert wait_until(lambda: any(runner.owner for runner in runners), 5)
        time.sleep(0.3)  # several claim rounds
        assert [runner.owner for runner in runners].count(True) == 1
        owner, other = runners if runners[0].owner else runners[::-1]
        owner.stop()
        assert not owner.owner
        assert wait_until(lambda: other.owner, 5)
    finally:
        for runner in runners:
            runner.stop()


def test_a_runner_takes_over_from_an_owner_killed_with_sigkill(sqlite_ledger: Ledger, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from llmserve.ledger.owner import OwnerLock; "
            "assert OwnerLock(Path(sys.argv[1])).try_acquire(); print('held', flush=True); time.sleep(60)",
            str(tmp_path / JOBS_LOCK),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    runner = JobRunner(sqlite_ledger, tmp_path, backup_interval=0, claim_interval=0.05)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        runner.start()
        time.sleep(0.3)
        assert not runner.owner
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert wait_until(lambda: runner.owner, 5)
    finally:
        runner.stop()
        holder.kill()
        holder.wait()


def test_the_owner_rolls_up_recent_hours_and_backs_up_at_once(sqlite_ledger: Ledger, tmp_path: Path) -> None:
    previous_hour = hour_of(datetime.now(UTC)) - HOUR
    sqlite_ledger.insert_many(
        [make_record(1, started_at=previous_hour + timedelta(minutes=5)), make_record(2, started_at=previous_hour)]
    )
    settings = LedgerSettings(backup_interval=15, backup_keep=3)
    runner = start_jobs(sqlite_ledger, settings, tmp_path)
    try:
        assert wait_until(lambda: bool(sqlite_ledger.query(rollups=True)), 10)
        assert sqlite_ledger.query(rollups=True)[0]["requests"] == 2
        assert wait_until(lambda: any((tmp_path / "backups").glob("ledger-*.db.sha256")), 10)
        assert runner.owner
    finally:
        runner.stop()
    assert OwnerLock(tmp_path / JOBS_LOCK).try_acquire()  # released on stop


def test_a_postgresql_that_never_answers_fails_within_the_connect_timeout() -> None:
    """The port accepts (the kernel does) and nothing ever answers: opening the ledger fails, clearly,
    after CONNECT_TIMEOUT instead of hanging the master's start or a worker's writer."""
    black_hole = socket.create_server(("127.0.0.1", 0), backlog=16)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{black_hole.getsockname()[1]}/test"
    outcome: list[BaseException] = []
    opener = threading.Thread(target=lambda: outcome.append(_refusal(url)), daemon=True)
    opener.start()
    opener.join(timeout=CONNECT_TIMEOUT * 6)
    black_hole.close()
    assert outcome, "opening the ledger hung"
    assert isinstance(outcome[0], LedgerUnavailable)


def _refusal(url: str) -> BaseException:
    try:
        open_ledger(url).close()
    except BaseException as exc:
        return exc
    raise AssertionError("a server that never answers was opened")
