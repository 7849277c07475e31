"""The ledger's tables and the one class that reads and writes them, on SQLite or PostgreSQL alike.

Every statement is the same on both databases. Time buckets are computed in Python, not with each
database's date functions: a record stores the UTC hour it started in (``started_hour``), reports group
by that column and fold hours into days in Python, and rollups select a half-open range of
``started_at``. All times are UTC, stored without a zone and returned timezone-aware.

``usage_records`` holds one row per request and is what reports read by default: it is always exact.
``usage_hourly`` holds one row per (hour, tenant, model), recomputed whole by ``roll_up``; it is the
compact form for long ranges and dashboards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Dialect,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    case,
    create_engine,
    delete,
    event,
    false,
    func,
    literal,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError

from llmserve.ledger.migrate import upgrade
from llmserve.ledger.records import UsageRecord

HOUR = timedelta(hours=1)
GroupBy = Literal["hour", "day"] | None


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out; stored without a zone, identically on both databases."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the ledger only takes timezone-aware times")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


metadata = MetaData()

usage_records = Table(
    "usage_records",
    metadata,
    Column("id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("key_id", String(64)),
    Column("model", String(128), nullable=False),
    Column("endpoint", String(32), nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("started_hour", UTCDateTime(), nullable=False),
    Column("prompt_tokens", Integer(), nullable=False),
    Column("cached_tokens", Integer(), nullable=False),
    Column("completion_tokens", Integer(), nullable=False),
    Column("queue_seconds", Double()),
    Column("ttft_seconds", Double()),
    Column("total_seconds", Double(), nullable=False),
    Column("engine_seconds", Double(), nullable=False),
    Column("finish_reason", String(255), nullable=False),
    Column("status", Integer(), nullable=False),
    Column("cost", Double(), nullable=False),
    Column("price_version", String(64), nullable=False),
    Column("model_version", String(64)),
    Column("resumed", Boolean(), nullable=False, server_default=false()),
    Index("ix_usage_records_tenant_started_at", "tenant", "started_at"),
    Index("ix_usage_records_started_at", "started_at"),
)

usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("hour", UTCDateTime(), primary_key=True),
    Column("tenant", String(64), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("requests", BigInteger(), nullable=False),
    Column("errors", BigInteger(), nullable=False),
    Column("prompt_tokens", BigInteger(), nullable=False),
    Column("cached_tokens", BigInteger(), nullable=False),
    Column("completion_tokens", BigInteger(), nullable=False),
    Column("engine_seconds", Double(), nullable=False),
    Column("cost", Double(), nullable=False),
    Index("ix_usage_hourly_tenant_hour", "tenant", "hour"),
)

# API keys, when a fleet keeps them in the ledger's database (``llmserve.ledger.keys``): digests only.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(64)),
    Column("digest", String(64), nullable=False),
    Column("created", String(32), nullable=False),
    Column("revoked", String(32)),
    Column("admin", Boolean(), nullable=False),
)

# The sums every report row carries, in this order.
SUMS = ("requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens", "engine_seconds", "cost")
_INTEGER_SUMS = frozenset(SUMS) - {"engine_seconds", "cost"}


def hour_of(moment: datetime) -> datetime:
    """The start of the UTC hour that holds ``moment``."""
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _record_sums() -> list[ColumnElement[Any]]:
    r = usage_records.c
    return [
        func.count().label("requests"),
        func.sum(case((r.status >= 400, 1), else_=0)).label("errors"),
        func.sum(r.prompt_tokens).label("prompt_tokens"),
        func.sum(r.cached_tokens).label("cached_tokens"),
        func.sum(r.completion_tokens).label("completion_tokens"),
        func.sum(r.engine_seconds).label("engine_seconds"),
        func.sum(r.cost).label("cost"),
    ]


def _normalised(row: dict[str, Any]) -> dict[str, Any]:
    # PostgreSQL sums integers into NUMERIC (Decimal); both databases must give the same Python types.
    for name in SUMS:
        row[name] = int(row[name]) if name in _INTEGER_SUMS else float(row[name])
    return row


class Ledger:
    """The usage ledger in one database; safe to share between threads (SQLAlchemy's engine pools connections)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Ledger:
        """Connect to the ledger at ``url``, first bringing its schema up to date unless ``migrate`` is off."""
        engine = _create_engine(url)
        if migrate:
            upgrade(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def sqlite_path(self) -> Path | None:
        """The database file of a SQLite ledger; None for PostgreSQL."""
        url = self.engine.url
        return Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None

    def insert_many(self, records: Iterable[UsageRecord]) -> int:
        """Store the records in one transaction; a request_id already stored is skipped. Returns rows added."""
        rows = [dataclasses.asdict(record) | {"started_hour": hour_of(record.started_at)} for record in records]
        if not rows:
            return 0
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        statement = (
            dialect.insert(usage_records)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(usage_records.c.request_id)
        )
        with self.engine.begin() as connection:
            return len(connection.execute(statement, rows).all())

    def count(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(usage_records)).scalar_one())

    def query(
        self,
        *,
        tenant: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        group_by: GroupBy = None,
        rollups: bool = False,
    ) -> list[dict[str, Any]]:
        """Sums per tenant and model (and per UTC hour or day: ``period``), for records in [since, until).

        ``rollups`` reads ``usage_hourly`` instead of the records: much less to read over months, but only
        as current as the last ``roll_up`` of each hour, and ``since``/``until`` must fall on whole hours.
        """
        if rollups:
            for bound in (since, until):
                if bound is not None and bound != hour_of(bound):
                    raise ValueError(f"reports from rollups need whole-hour bounds, got {bound.isoformat()}")
            table, moment, period = usage_hourly, usage_hourly.c.hour, usage_hourly.c.hour
            sums: list[ColumnElement[Any]] = [func.sum(table.c[name]).label(name) for name in SUMS]
        else:
            table, moment, period = usage_records, usage_records.c.started_at, usage_records.c.started_hour
            sums = _record_sums()
        keys: list[ColumnElement[Any]] = [table.c.tenant, table.c.model]
        if group_by is not None:
            keys.insert(0, period.label("period"))
        statement = select(*keys, *sums).group_by(*keys).order_by(*keys)
        if tenant is not None:
            statement = statement.where(table.c.tenant == tenant)
        if model is not None:
            statement = statement.where(table.c.model == model)
        if since is not None:
            statement = statement.where(moment >= since)
        if until is not None:
            statement = statement.where(moment < until)
        with self.engine.connect() as connection:
            rows = [_normalised(dict(row)) for row in connection.execute(statement).mappings()]
        return _by_day(rows) if group_by == "day" else rows

    def roll_up(self, hour: datetime) -> int:
        """Recompute the rollup rows of the UTC hour starting at ``hour``; returns the rows written.

        Deletes and rewrites the hour in one transaction, so running it again (after late records
        arrived, or twice by accident) leaves the same rows as running it once.
        """
        if hour.utcoffset() is None or hour != hour_of(hour):
            raise ValueError(f"roll_up needs the timezone-aware start of an hour, got {hour!r}")
        r = usage_records.c
        totals = (
            select(literal(hour, UTCDateTime()), r.tenant, r.model, *_record_sums())
            .where(r.started_at >= hour, r.started_at < hour + HOUR)
            .group_by(r.tenant, r.model)
        )
        columns = ["hour", "tenant", "model", *SUMS]
        with self.engine.begin() as connection:
            connection.execute(delete(usage_hourly).where(usage_hourly.c.hour == hour))
            written = connection.execute(
                usage_hourly.insert().from_select(columns, totals).returning(usage_hourly.c.hour)
            )
            return len(written.all())


class LedgerUnavailable(Exception):
    """The ledger cannot be opened; the message names it (without a password) and says why."""


def open_ledger(url: str) -> Ledger:
    """Connect to the ledger at ``url`` and migrate it, or say clearly why not (for the gunicorn master
    before any worker starts, and for the CLI)."""
    try:
        return Ledger.open(url, migrate=True)
    except Exception as exc:
        reason = getattr(exc, "orig", None) or exc  # the driver's own message, without SQLAlchemy's wrapping
        raise LedgerUnavailable(f"cannot open the usage ledger at {_without_password(url)}: {reason}") from exc


def _without_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return f"{url.partition(':')[0]}:... (not a valid SQLAlchemy URL)"


def _by_day(hourly: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    days: dict[tuple[datetime, str, str], dict[str, Any]] = {}
    for row in hourly:
        day = row["period"].replace(hour=0)
        merged = days.setdefault((day, row["tenant"], row["model"]), dict(row, period=day, **dict.fromkeys(SUMS, 0)))
        for name in SUMS:
            merged[name] += row[name]
    return [days[key] for key in sorted(days)]


CONNECT_TIMEOUT = 5  # seconds
STATEMENT_TIMEOUT = 30  # seconds; the largest write is one batch of records, the longest read a report


def _create_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        database = engine.url.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        return engine
    # A PostgreSQL server may restart under a long-lived worker: test each connection before use. One
    # that does not answer fails a connection after CONNECT_TIMEOUT and a statement after
    # STATEMENT_TIMEOUT, so that the ledger's writer retries instead of hanging.
    given = make_url(url).query.get("options")  # the URL's own (a search_path, say) come first
    given_options = [given] if isinstance(given, str) else list(given or ())
    options = " ".join([*given_options, f"-c statement_timeout={STATEMENT_TIMEOUT}s"])
    return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT, "options": options})


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL lets reports read while a worker writes; NORMAL syncs at checkpoints, not every commit (in WAL
    mode a power cut can lose the last transactions, never corrupt the file)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
