"""Batched, non-blocking writes of usage records, on a real OS thread.

``submit`` only puts the record on a queue: it never waits for the database, so it is safe on the gevent
hub and on the engine thread. A native writer thread collects records and writes them in one transaction
every ``flush_interval`` seconds, or as soon as ``batch_size`` are pending.

When a write fails (database down, locked, full disk) the batch is kept and retried with exponential
backoff while new records keep collecting. A record is dropped only when ``max_pending`` records are
already waiting (counted, and the count logged as an error), or when the database refuses the record
itself (a value it cannot store: logged as an error with the record), so that one bad record cannot hold
back every record after it.

What can be lost: a ``kill -9`` (or gunicorn's SIGKILL after ``graceful_timeout``) loses the records not
yet committed: in normal operation at most ``flush_interval`` seconds of requests; while the database is
failing, everything waiting for it (at most ``max_pending`` records). ``close`` writes everything first.
"""

from __future__ import annotations

import logging
import time
from _queue import Empty, SimpleQueue

from sqlalchemy.exc import DataError, IntegrityError

from llmserve.ledger.native import allocate_lock, start_new_thread, wait_until
from llmserve.ledger.records import UsageRecord
from llmserve.ledger.store import Ledger

log = logging.getLogger(__name__)

_STOP = object()


class LedgerWriter:
    def __init__(
        self,
        ledger: Ledger,
        *,
        flush_interval: float = 0.5,
        batch_size: int = 100,
        max_pending: int = 100_000,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.ledger = ledger
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._queue: SimpleQueue[UsageRecord | object] = SimpleQueue()
        self._held = 0  # records taken off the queue and not yet committed; written by the writer thread only
        self._counts = allocate_lock()  # guards _dropped, bumped from any thread
        self._dropped = 0
        self._reported_dropped = 0
        self._started = False
        self._closing = False
        self._running = False
        self._deadline = float("inf")  # when close() stops retrying

    @property
    def pending(self) -> int:
        """Records submitted and not yet written."""
        return self._queue.qsize() + self._held

    @property
    def dropped(self) -> int:
        """Records refused because ``max_pending`` were already waiting, or submitted after ``close``."""
        return self._dropped

    def start(self) -> None:
        """Start the writer thread; call it in the process that writes (a gunicorn worker, after fork)."""
        if not self._started:
            self._started = self._running = True
            start_new_thread(self._run, ())

    def submit(self, record: UsageRecord) -> bool:
        """Queue the record for writing; never blocks. False if it had to be dropped."""
        if self._closing or self.pending >= self.max_pending:
            with self._counts:
                self._dropped += 1
            if self._closing:
                log.error("usage record %s not recorded: the ledger writer is not running", record.request_id)
            return False
        self._queue.put(record)
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Write everything submitted, then stop the thread; True when every record was written.

        Waits up to ``timeout`` seconds (cooperatively in a gevent worker); what is still unwritten then
        is logged as lost.
        """
        if not self._started:
            self.start()
        self._deadline = time.monotonic() + timeout
        self._closing = True
        self._queue.put(_STOP)
        return wait_until(lambda: not self._running, timeout + 1.0) and self.pending == 0

    def _run(self) -> None:
        batch: list[UsageRecord] = []
        stopping = False
        try:
            while not stopping:
                stopping = self._gather(batch, None, 1)
                if not stopping:
                    stopping = self._gather(batch, time.monotonic() + self.flush_interval, self.batch_size)
                if batch:
                    stopping = self._flush(batch, stopping)
        except Exception:
            log.exception("the ledger writer failed: %d usage records not written", self.pending)
            self._closing = True  # from now on every submitted record is refused with an error, never silently
        finally:
            self._running = False

    def _gather(self, batch: list[UsageRecord], deadline: float | None, limit: int | None) -> bool:
        """Move queued records into ``batch`` until it holds ``limit`` or ``deadline`` passes (None: wait
        for one). On the stop marker, take what is left without waiting and return True."""
        stopping = False
        while limit is None or len(batch) < limit:
            try:
                if stopping:
                    item = self._queue.get_nowait()
                else:
                    item = self._queue.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except Empty:
                break
            if item is _STOP:
                stopping, limit = True, None
                continue
            assert isinstance(item, UsageRecord)
            batch.append(item)
            self._held = len(batch)
        return stopping

    def _flush(self, batch: list[UsageRecord], stopping: bool) -> bool:
        """Write the batch, retrying with backoff (and taking in what arrives meanwhile) until it is stored,
        or, once closing, until the close deadline. Returns whether the stop marker has been seen."""
        delay = self.retry_initial
        while not self._write(batch):
            self._report_dropped()
            now = time.monotonic()
            if stopping and now >= self._deadline:
                log.error("%d usage records could not be written before shutdown: lost", len(batch))
                return True
            retry_at = min(now + delay, self._deadline) if stopping else now + delay
            stopping = self._gather(batch, retry_at, None) or stopping
            delay = min(delay * 2, self.retry_max)
        batch.clear()
        self._held = 0
        self._report_dropped()
        return stopping

    def _write(self, batch: list[UsageRecord]) -> bool:
        try:
            self.ledger.insert_many(batch)
        except (DataError, IntegrityError) as exc:
            # Something in the batch itself is refused: keep it from holding back every record after it.
            log.warning("a batch of %d usage records was refused (%s); writing them one by one", len(batch), exc)
            return self._write_each(batch)
        except Exception as exc:
            log.warning("writing %d usage records failed, will retry: %s", len(batch), exc)
            return False
        return True

    def _write_each(self, batch: list[UsageRecord]) -> bool:
        for index, record in enumerate(batch):
            try:
                self.ledger.insert_many([record])
            except (DataError, IntegrityError) as exc:
                log.error("usage record refused by the database, not recorded: %r (%s)", record, exc)
            except Exception as exc:
                log.warning("writing usage records failed, will retry: %s", exc)
                del batch[:index]
                self._held = len(batch)
                return False
        return True

    def _report_dropped(self) -> None:
        dropped = self._dropped
        if dropped != self._reported_dropped:
            log.error(
                "usage ledger buffer full (%d records waiting): %d usage records dropped so far",
                self.max_pending,
                dropped,
            )
            self._reported_dropped = dropped
