"""Shared by the ledger tests: usage records to store, and ledger URLs on SQLite and a real PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from llmserve.ledger.records import UsageRecord
from tests.conftest import missing_service

# PostgreSQL runs on every development and CI machine; each test gets a schema of its own in it.
POSTGRES_URL = os.environ.get("LLMSERVE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


def make_record(number: int, **changes: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"req-{number}",
        "tenant": "acme",
        "key_id": "k1",
        "model": "gemma-3-270m",
        "endpoint": "chat.completions",
        "started_at": T0 + timedelta(minutes=number),
        "prompt_tokens": 100,
        "cached_tokens": 20,
        "completion_tokens": 10,
        "queue_seconds": 0.01,
        "ttft_seconds": 0.2,
        "total_seconds": 1.5,
        "engine_seconds": 0.5,
        "finish_reason": "stop",
        "status": 200,
        "cost": 0.25,
        "price_version": "2026-11",
    }
    values.update(changes)
    return UsageRecord(**values)


@contextmanager
def postgres_object(kind: str, prefix: str) -> Iterator[str]:
    """A fresh PostgreSQL ``kind`` (SCHEMA or DATABASE) named ``prefix`` + random, dropped afterwards.

    Without a server the test is skipped, except under ``make test``, where PostgreSQL must be there.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE {kind} "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        missing_service(f"no PostgreSQL at {POSTGRES_URL}: {exc.orig}")
    try:
        yield name
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP {kind} "{name}" ' + ("CASCADE" if kind == "SCHEMA" else "WITH (FORCE)")))
        admin.dispose()


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A URL whose connections use a fresh schema, dropped afterwards."""
    with postgres_object("SCHEMA", "llmserve_test") as schema:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


@contextmanager
def ledger_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'state' / 'ledger.db'}"
    else:
        with postgres_schema() as url:
            yield url
