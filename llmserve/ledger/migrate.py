"""Schema migrations, run in code: the revisions live in ``migrations/`` inside the package, so an
installed server needs no ``alembic.ini``.

Several gunicorn workers (and a CLI command) may open the ledger at once; each upgrade runs under a lock
(an advisory lock on PostgreSQL, a file lock beside a SQLite file), so exactly one creates the tables and
the others find them at head. Upgrading a ledger that is already at head changes nothing.

A new revision, from a checkout::

    python -c "from alembic import command; from llmserve.ledger.migrate import alembic_config; \\
        command.revision(alembic_config(), 'what changes')"
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).with_name("migrations")
# Any constant shared by every process that migrates a ledger: "llmserve" in ASCII.
_PG_LOCK_KEY = 0x6C6C6D7365727665


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code; ``connection`` is the one ``migrations/env.py`` migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Bring the ledger's schema to the newest revision."""
    with _exclusive(engine), engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            # Held until this transaction ends: after the upgrade is committed.
            connection.execute(select(func.pg_advisory_xact_lock(_PG_LOCK_KEY)))
        command.upgrade(alembic_config(connection), "head")


@contextmanager
def _exclusive(engine: Engine) -> Iterator[None]:
    """A file lock beside a SQLite database file; nothing for other databases (they lock in SQL)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with Path(f"{database}.migrate-lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
