"""SQLite ledger backups: online copies with checksums, verification, retention and restore."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from llmserve.ledger.backup import BackupError, backup, backups, prune, restore, ship, verify
from llmserve.ledger.jobs import JobRunner
from llmserve.ledger.owner import JOBS_LOCK, OwnerLock
from llmserve.ledger.settings import default_url
from llmserve.ledger.store import HOUR, Ledger, usage_hourly, usage_records
from llmserve.ledger.writer import LedgerWriter
from tests.ledger_support import T0, make_record


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def ledger(state_dir: Path) -> Iterator[Ledger]:
    opened = Ledger.open(default_url(state_dir))
    opened.insert_many([make_record(i, tenant=f"t{i % 2}") for i in range(200)])
    opened.roll_up(T0)
    opened.roll_up(T0 + HOUR)
    yield opened
    opened.close()


def contents(ledger: Ledger) -> dict[str, list[dict[str, Any]]]:
    with ledger.engine.connect() as connection:
        return {
            table.name: [
                dict(row) for row in connection.execute(table.select().order_by(*table.primary_key)).mappings()
            ]
            for table in (usage_records, usage_hourly)
        }


def test_a_restored_backup_holds_exactly_what_was_backed_up(ledger: Ledger, tmp_path: Path) -> None:
    path = backup(ledger, tmp_path / "backups", now=datetime(2026, 11, 27, 10, 15, 30, tzinfo=UTC))
    assert path.name == "ledger-20261127T101530Z.db"
    checksum = path.with_name(path.name + ".sha256").read_text()
    assert checksum == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"
    assert verify(path)
    with closing(sqlite3.connect(path)) as copy:
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one self-contained file

    fresh_state = tmp_path / "fresh"
    fresh_state.mkdir()
    restored_path = restore(path, fresh_state)
    assert restored_path == fresh_state / "ledger.db"
    restored = Ledger.open(default_url(fresh_state))
    assert contents(restored) == contents(ledger)
    assert restored.query(group_by="hour", rollups=True) == ledger.query(group_by="hour", rollups=True)
    restored.close()


def test_a_backup_taken_while_records_are_written_is_consistent(ledger: Ledger, tmp_path: Path) -> None:
    writer = LedgerWriter(ledger, flush_interval=0.001, batch_size=10)
    writer.start()
    for i in range(1000, 3000):
        writer.submit(make_record(i))
    path = backup(ledger, tmp_path / "backups")
    assert writer.close(timeout=30)
    assert verify(path)
    with closing(sqlite3.connect(path)) as copy:
        assert 200 <= copy.execute("SELECT count(*) FROM usage_records").fetchone()[0] <= 2200


def test_restore_replaces_a_live_ledger_and_its_write_ahead_log(
    ledger: Ledger, state_dir: Path, tmp_path: Path
) -> None:
    path = backup(ledger, tmp_path / "backups")
    expected = contents(ledger)
    ledger.insert_many([make_record(i) for i in range(5000, 5100)])  # after the backup: lands in the WAL
    wal = state_dir / "ledger.db-wal"
    unmerged = wal.read_bytes()
    ledger.close()  # the last connection merges the WAL into the file; a server killed with -9 leaves it
    wal.write_bytes(unmerged)
    restore(path, state_dir)
    assert not (state_dir / "ledger.db-wal").exists()
    reopened = Ledger.open(default_url(state_dir))
    assert contents(reopened) == expected
    reopened.close()


def test_a_corrupted_backup_fails_verify_and_is_not_restored(ledger: Ledger, state_dir: Path, tmp_path: Path) -> None:
    path = backup(ledger, tmp_path / "backups")
    before = contents(ledger)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not verify(path)
    with pytest.raises(BackupError, match="does not match its checksum"):
        restore(path, state_dir)
    assert contents(ledger) == before


def test_a_backup_without_its_checksum_is_incomplete(ledger: Ledger, tmp_path: Path) -> None:
    path = backup(ledger, tmp_path / "backups")
    path.with_name(path.name + ".sha256").unlink()
    assert not verify(path)
    assert not verify(tmp_path / "backups" / "ledger-20000101T000000Z.db")
    with pytest.raises(BackupError, match="no checksum"):
        restore(path, tmp_path / "elsewhere")


def test_a_file_that_is_not_a_database_fails_verify_even_with_a_matching_checksum(tmp_path: Path) -> None:
    path = tmp_path / "ledger-20261127T000000Z.db"
    path.write_bytes(b"not a database" * 100)
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    assert not verify(path)


def test_restore_refuses_while_a_server_holds_the_jobs_lock(ledger: Ledger, state_dir: Path, tmp_path: Path) -> None:
    path = backup(ledger, tmp_path / "backups")
    server = OwnerLock(state_dir / JOBS_LOCK)
    assert server.try_acquire()
    try:
        with pytest.raises(BackupError, match="stop it before restoring"):
            restore(path, state_dir)
    finally:
        server.release()
    restore(path, state_dir)


def test_retention_keeps_the_newest_backups(ledger: Ledger, tmp_path: Path) -> None:
    directory = tmp_path / "backups"
    taken = [backup(ledger, directory, now=T0 + timedelta(minutes=15 * n)) for n in range(6)]
    assert backups(directory) == taken
    removed = prune(directory, keep=4)
    assert removed == taken[:2]
    assert backups(directory) == taken[2:]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [p.name for p in taken[2:]] + [p.name + ".sha256" for p in taken[2:]]
    )
    assert prune(directory, keep=4) == []
    with pytest.raises(ValueError):
        prune(directory, keep=0)


def test_postgresql_ledgers_are_backed_up_with_pg_dump(tmp_path: Path) -> None:
    ledger = Ledger(create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test"))  # never connects
    with pytest.raises(BackupError, match="pg_dump"):
        backup(ledger, tmp_path)


def test_a_shipped_backup_is_checked_at_the_second_location_and_pruned_there(ledger: Ledger, tmp_path: Path) -> None:
    local, offsite = tmp_path / "backups", tmp_path / "offsite"
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    keys.chmod(0o600)
    taken = [backup(ledger, local, now=T0 + timedelta(minutes=15 * n)) for n in range(3)]
    for path in taken:
        ship(path, offsite, keep=2, companions=(keys, tmp_path / "absent.json"))
    assert backups(offsite) == [offsite / path.name for path in taken[1:]]
    assert all(verify(path) for path in backups(offsite))
    assert (offsite / "keys.json").read_text() == keys.read_text()
    assert (offsite / "keys.json").stat().st_mode & 0o777 == 0o600
    assert not list(offsite.glob("*.partial")) and not (offsite / "absent.json").exists()
    restored = Ledger.open(f"sqlite:///{restore(backups(offsite)[-1], tmp_path / 'rebuilt')}", migrate=False)
    try:  # a new host, rebuilt from the second location
        assert contents(restored) == contents(ledger)
    finally:
        restored.close()


def test_a_damaged_backup_is_not_shipped_as_good(ledger: Ledger, tmp_path: Path) -> None:
    path = backup(ledger, tmp_path / "backups")
    with path.open("r+b") as file:  # damaged after its checksum was written
        file.seek(100)
        file.write(b"\xff" * 16)
    with pytest.raises(BackupError, match="does not verify"):
        ship(path, tmp_path / "offsite", keep=2)


def test_each_scheduled_backup_is_shipped_and_one_that_cannot_be_stays_here(
    ledger: Ledger, state_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shipping = JobRunner(ledger, state_dir, offsite_dir=tmp_path / "offsite")
    shipping.back_up()
    assert [path.name for path in backups(tmp_path / "offsite")] == [path.name for path in backups(shipping.backup_dir)]
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    JobRunner(ledger, state_dir, backup_dir=tmp_path / "here", offsite_dir=blocked).back_up()
    assert len(backups(tmp_path / "here")) == 1
    assert "not shipped" in caplog.text
