"""API keys in the ledger's database: one store for every replica that shares it.

Workers keep a snapshot of the records, read when they start and again every ``refresh_interval``
seconds on a native thread (a query on the hub would stall every request of the worker), so a key
revoked on any host is refused everywhere within that time. A key the snapshot does not hold makes the
thread read at once (at most every ``MISS_INTERVAL`` seconds, so that made-up keys cannot flood the
database), so a key created on one host works on every host from its first request. A database that
cannot be reached keeps the last snapshot in use (and the log says so): keys that worked go on
working, and a revocation waits for the database to answer again. The CLI reads and writes the table
directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from _queue import Empty, SimpleQueue

from sqlalchemy import insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from llmserve.keys import ApiKey, KeyStore, KeyStoreError, new_key, revoked
from llmserve.ledger.native import start_new_thread, wait_until
from llmserve.ledger.store import LedgerUnavailable, api_keys, open_ledger

log = logging.getLogger(__name__)

MISS_INTERVAL = 0.5  # seconds between reads asked for by keys the snapshot does not hold
MISS_WAIT = 2.0  # seconds a request waits for such a read


class LedgerKeyStore(KeyStore):
    def __init__(self, url: str, refresh_interval: float) -> None:
        try:
            self._engine = open_ledger(url).engine  # migrated: the table exists
        except LedgerUnavailable as exc:
            raise KeyStoreError(str(exc)) from None
        self._refresh_interval = refresh_interval
        self._snapshot = self._read()
        self._reads = 0  # snapshots the following thread has read
        self._wake: SimpleQueue[None] = SimpleQueue()
        self._last_miss = -MISS_INTERVAL
        self._following = False

    def follow(self) -> None:
        """Refresh the snapshot every ``refresh_interval`` seconds from now on (a worker's requests then read
        only the snapshot)."""
        self._following = True
        start_new_thread(self._refresh_forever, ())

    def _refresh_forever(self) -> None:
        failing = False
        while True:
            with contextlib.suppress(Empty):
                self._wake.get(timeout=self._refresh_interval)
            try:
                self._snapshot = self._read()
                self._reads += 1
            except KeyStoreError as exc:
                if not failing:
                    log.warning("%s; keys stay as last read until it answers", exc)
                failing = True
                continue
            if failing:
                log.info("the key store answers again")
            failing = False

    def _read(self) -> dict[str, ApiKey]:
        try:
            with self._engine.connect() as connection:
                rows = connection.execute(select(api_keys)).mappings().all()
        except SQLAlchemyError as exc:
            raise KeyStoreError(
                f"cannot read the keys from the ledger's database: {getattr(exc, 'orig', None) or exc}"
            ) from None
        return {row["id"]: ApiKey(**row) for row in rows}

    @property
    def reads(self) -> int:
        """Snapshots the following thread has read."""
        return self._reads

    def records(self) -> dict[str, ApiKey]:
        return self._snapshot if self._following else self._read()

    def look_up_new(self, key_id: str) -> ApiKey | None:
        """Have the thread read the table now, once per ``MISS_INTERVAL``, and wait for it (the waiting greenlet
        lets the others run)."""
        now = time.monotonic()
        if not self._following or now - self._last_miss < MISS_INTERVAL:
            return None
        self._last_miss = now
        seen = self._reads
        self._wake.put(None)
        wait_until(lambda: self._reads != seen, MISS_WAIT)
        return self._snapshot.get(key_id)

    def create(self, tenant: str | None, *, admin: bool = False) -> tuple[ApiKey, str]:
        record, presented = new_key(tenant, admin=admin, taken=set(self._read()))
        self._write(insert(api_keys).values(**dataclasses.asdict(record)))
        return record, presented

    def revoke(self, key_id: str) -> ApiKey:
        record = self._read().get(key_id)
        if record is None:
            raise KeyStoreError(f"no key with id {key_id!r}")
        record = revoked(record)
        self._write(
            update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked.is_(None)).values(revoked=record.revoked)
        )
        return record

    def _write(self, statement: object) -> None:
        try:
            with self._engine.begin() as connection:
                connection.execute(statement)  # type: ignore[call-overload]
        except SQLAlchemyError as exc:
            raise KeyStoreError(
                f"cannot write the key to the ledger's database: {getattr(exc, 'orig', None) or exc}"
            ) from None
