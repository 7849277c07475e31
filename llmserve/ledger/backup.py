"""Online backups of a SQLite ledger, their checksums, retention and restore.

A backup is taken with SQLite's online backup API while the server keeps writing (WAL mode: readers and
the backup do not block the writer), into ``ledger-YYYYmmddTHHMMSSZ.db`` beside a ``.sha256`` file in
``sha256sum`` format (``sha256sum -c`` checks it too). The copy is switched out of WAL mode, so it is one
self-contained file. The checksum file is written last: a backup without one is incomplete.

Restore: stop the server first. ``restore`` refuses while a server holds the jobs lock of the state
directory, but a server starting in the middle of a restore is not detected.

With ``ledger.offsite_dir`` set, every backup is also copied to that second location (``ship``) with the
key file, checked there, and pruned there as here: what survives the loss of this host's disk.

PostgreSQL ledgers are not backed up here: that is ``pg_dump``'s job (or the database's own backups).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from llmserve.ledger.owner import JOBS_LOCK, OwnerLock
from llmserve.ledger.settings import LEDGER_FILE
from llmserve.ledger.store import Ledger

log = logging.getLogger(__name__)

PREFIX = "ledger-"
SUFFIX = ".db"
CHECKSUM_SUFFIX = ".sha256"
TIME_FORMAT = "%Y%m%dT%H%M%SZ"


class BackupError(Exception):
    """A backup cannot be taken or restored; the message says why."""


def backup(ledger: Ledger, backup_dir: Path, *, now: datetime | None = None) -> Path:
    """Copy the live ledger into ``backup_dir``; returns the new backup's path."""
    source = ledger.sqlite_path
    if source is None:
        raise BackupError(
            f"the ledger is a {ledger.engine.dialect.name} database: back it up with pg_dump "
            "(or the database's own backups), not with llmserve"
        )
    backup_dir.mkdir(parents=True, exist_ok=True)
    name = PREFIX + (now or datetime.now(UTC)).astimezone(UTC).strftime(TIME_FORMAT) + SUFFIX
    target = backup_dir / name
    partial = backup_dir / (name + ".partial")
    partial.unlink(missing_ok=True)
    with closing(sqlite3.connect(source)) as live, closing(sqlite3.connect(partial)) as copy:
        live.backup(copy)
        copy.execute("PRAGMA journal_mode=DELETE")
    _sync(partial)
    digest = _sha256(partial)
    os.replace(partial, target)
    _write_atomically(_checksum_path(target), f"{digest}  {name}\n")
    _sync_dir(backup_dir)
    return target


def verify(path: Path) -> bool:
    """True when the backup is complete, matches its checksum and SQLite finds it sound."""
    return _problem(path) is None


def backups(backup_dir: Path) -> list[Path]:
    """The backups in ``backup_dir``, oldest first (their names sort by time)."""
    return sorted(path for path in backup_dir.glob(f"{PREFIX}*{SUFFIX}") if path.is_file())


def prune(backup_dir: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest backups (and their checksums); returns what was deleted."""
    if keep < 1:
        raise ValueError("keep at least one backup")
    old = backups(backup_dir)[:-keep]
    for path in old:
        _checksum_path(path).unlink(missing_ok=True)
        path.unlink()
    return old


def ship(backup_path: Path, offsite_dir: Path, keep: int, companions: Iterable[Path] = ()) -> Path:
    """Copy a backup to ``offsite_dir``, a second location (another host's mount, a directory that rsync or
    rclone ships), with its checksum last, and check the copy there; then copy ``companions`` that exist
    (the key file) and keep the ``keep`` newest backups there. Returns the copy."""
    offsite_dir.mkdir(parents=True, exist_ok=True)
    target = offsite_dir / backup_path.name
    _copy_atomically(backup_path, target)
    _copy_atomically(_checksum_path(backup_path), _checksum_path(target))
    problem = _problem(target)
    if problem is not None:
        raise BackupError(f"the copy of {backup_path.name} in {offsite_dir} does not verify: {problem}")
    for companion in companions:
        if companion.is_file():
            _copy_atomically(companion, offsite_dir / companion.name)
    prune(offsite_dir, keep)
    _sync_dir(offsite_dir)
    return target


def restore(backup_path: Path, state_dir: Path) -> Path:
    """Replace the ledger of ``state_dir`` with a verified backup; returns the ledger's path.

    The server must be stopped: a running one would keep writing into the replaced file.
    """
    problem = _problem(backup_path)
    if problem:
        raise BackupError(f"will not restore {backup_path}: {problem}")
    lock = OwnerLock(state_dir / JOBS_LOCK)
    if not lock.try_acquire():
        raise BackupError(f"a server is running on {state_dir} (it holds {lock.path}): stop it before restoring")
    try:
        target = state_dir / LEDGER_FILE
        partial = state_dir / (LEDGER_FILE + ".restoring")
        shutil.copyfile(backup_path, partial)
        _sync(partial)
        if _sha256(partial) != _recorded_digest(backup_path):
            partial.unlink()
            raise BackupError(f"the copy of {backup_path} does not match its checksum; the ledger is unchanged")
        # The old file's write-ahead log would be replayed into the restored file: remove it first.
        for leftover in (Path(f"{target}-wal"), Path(f"{target}-shm")):
            leftover.unlink(missing_ok=True)
        os.replace(partial, target)
        _sync_dir(state_dir)
    finally:
        lock.release()
    log.info("ledger restored from %s", backup_path)
    return target


def _problem(path: Path) -> str | None:
    """Why the backup at ``path`` cannot be trusted, or None."""
    if not path.is_file():
        return "no such backup"
    if not _checksum_path(path).is_file():
        return "it has no checksum file (the backup did not finish)"
    if _sha256(path) != _recorded_digest(path):
        return "it does not match its checksum (the file is damaged or was changed)"
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)) as db:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        return f"SQLite cannot read it: {exc}"
    return None if result == "ok" else f"SQLite's quick_check failed: {result}"


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _recorded_digest(path: Path) -> str:
    """The digest in the backup's checksum file (``sha256sum`` format: digest, two spaces, name)."""
    return _checksum_path(path).read_text().partition(" ")[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_atomically(source: Path, target: Path) -> None:
    """``source`` to ``target`` with its permissions (a key file stays 0600), whole or not at all."""
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    shutil.copymode(source, partial)
    _sync(partial)
    os.replace(partial, target)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    _sync(partial)
    os.replace(partial, path)


def _sync(path: Path) -> None:
    with path.open("rb+") as fh:
        os.fsync(fh.fileno())


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
