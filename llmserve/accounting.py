"""Usage accounting: one priced usage record for every request the server took on, written to the ledger.

Which requests get a record. Every request whose work the server accepted (it passed authentication,
quotas and validation and its jobs went to the engine), whatever its end: completed (``stop``,
``length``, ``tool_calls``), cancelled by its client while queued or running (``cancelled``, an abandoned
stream included), timed out waiting for a slot (``timeout``), failed (``error``) or ended by a shutdown
(``shutting_down``). Requests refused at the door get none, since no work was taken on: invalid requests
(400, 404, 413, 415), bad keys (401, 403), quota refusals (429, ``tenant_queue_full`` included) and a full
queue (503 ``queue_full``). A request that ended before it held a slot records no tokens: nothing was
computed for it, and its token quota is given back too.

Engine time. The engine splits each step's time among the sequences in it by the tokens each put into
the batch and reports a job's total in its ``Finished`` event. Jobs cancelled as the response ended (a
stop sequence, a client that left) are usually still finishing on the engine thread then: their record
waits in a greenlet for their last events (one engine step, normally) instead of delaying the response.

Writes. Records go to this worker's ``LedgerWriter``, which never blocks the hub and writes batches every
``ledger.flush_interval`` seconds: reports and ``GET /v1/usage`` lag by up to that much, and a worker
killed with SIGKILL loses at most that much.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from flask import Flask, current_app
from gevent.pool import Group

from llmserve.errors import APIError, ClientDisconnected, QueueFull, QueueTimeout, RateLimited, ServiceUnavailable
from llmserve.keys import KEYS_FILE
from llmserve.ledger.jobs import JobRunner, start_jobs
from llmserve.ledger.prices import PriceTable
from llmserve.ledger.records import UsageRecord
from llmserve.ledger.store import Ledger
from llmserve.ledger.writer import LedgerWriter
from llmserve.metrics import LLMMetrics
from llmserve.settings import Settings

if TYPE_CHECKING:
    from llmserve.api.runner import GenerationRun

log = logging.getLogger(__name__)

EXTENSION = "llmserve.accounting"
# Seconds a record waits for the engine to report its cancelled jobs (one step, normally).
SETTLE_TIMEOUT = 10.0
# ``stop`` runs after the drain, inside lifecycle.DRAIN_MARGIN (2 s) before gunicorn's SIGKILL: waiting
# records, then the jobs, then the writer, which waits for its thread up to its timeout plus 1 s.
STOP_SETTLE_TIMEOUT = 0.2
STOP_JOBS_TIMEOUT = 0.2
STOP_WRITER_TIMEOUT = 0.3
# With several choices the record names the one that ended least cleanly; other reasons rank as 1.
_FINISH_SEVERITY = {"stop": 0, "length": 2}
_CANCEL_REASONS = {
    "client_disconnected": "cancelled",
    "shutting_down": "shutting_down",
    "engine_error": "error",
    "grammar_budget_exceeded": "error",
}


class EngineWork(Protocol):
    """A request's jobs on the engine, as far as its record needs them."""

    admitted_at: float | None

    @property
    def engine_seconds(self) -> float: ...

    def settle(self, timeout: float) -> bool: ...


@dataclass(frozen=True)
class End:
    """How a request ended, as its record says: the HTTP status sent and one finish reason."""

    status: int
    finish_reason: str


def end_of_error(error: BaseException) -> End | None:
    """The end an error gave a request; None when the error refused it at the door (nothing is recorded)."""
    if isinstance(error, QueueFull | RateLimited):
        return None
    if isinstance(error, ClientDisconnected):
        return End(error.status, "cancelled")
    if isinstance(error, QueueTimeout):
        return End(error.status, "timeout")
    if isinstance(error, ServiceUnavailable):
        return End(error.status, "shutting_down")
    return End(error.status if isinstance(error, APIError) else 500, "error")


def end_of_generation(cancelled_by: str | None, finish_reasons: Mapping[int, str]) -> End:
    """A response that was sent (a stream is 200 once it started, however it ended), with the finish
    reasons its client was told."""
    if cancelled_by is not None:
        return End(200, _CANCEL_REASONS.get(cancelled_by, cancelled_by))
    reasons = set(finish_reasons.values()) or {"stop"}
    return End(200, max(sorted(reasons), key=lambda reason: _FINISH_SEVERITY.get(reason, 1)))


@dataclass(frozen=True)
class Origin:
    """What a usage record says about a request besides its usage: which request, whose key, which
    endpoint and model, and when it arrived (monotonic seconds)."""

    request_id: str  # unique per record: see ``api.request.ledger_request_id``
    key_id: str | None
    endpoint: str
    started: float
    model: str
    model_version: str | None


class Accounting:
    """Prices each finished request and hands its record to this worker's ledger writer.

    Created by the app factory; ``start`` opens the ledger in the gunicorn worker after fork (threads
    do not survive a fork) and ``stop`` closes it. Without ``start`` (or with ``ledger.enabled`` off)
    records are still priced and counted in the metrics, but not stored.
    """

    def __init__(self, settings: Settings, metrics: LLMMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.prices = PriceTable(settings.prices)
        self.ledger: Ledger | None = None
        self._writer: LedgerWriter | None = None
        self._jobs: JobRunner | None = None
        self._waiting = Group()

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION] = self

    def start(self) -> None:
        """Open the ledger (migrated by the gunicorn master), its writer thread and the jobs runner."""
        settings = self.settings.ledger
        if not settings.enabled:
            log.info("usage ledger disabled: usage is counted in the metrics only")
            return
        self.ledger = Ledger.open(settings.resolved_url(self.settings.state_dir), migrate=False)
        self._writer = LedgerWriter(self.ledger, flush_interval=settings.flush_interval)
        self._writer.start()
        state_dir = self.settings.state_dir
        self._jobs = start_jobs(self.ledger, settings, state_dir, offsite_companions=(state_dir / KEYS_FILE,))

    def stop(self) -> None:
        """Record what is still settling, stop the jobs, write what is buffered and close the ledger."""
        self._waiting.join(timeout=STOP_SETTLE_TIMEOUT)
        if self._jobs is not None:
            self._jobs.stop(STOP_JOBS_TIMEOUT)
        if self._writer is not None:
            self._writer.close(STOP_WRITER_TIMEOUT)  # logs what it could not write
        if self.ledger is not None:
            self.ledger.close()

    def record_generation(
        self,
        run: GenerationRun,
        tenant: str,
        origin: Origin,
        finish_reasons: Mapping[int, str],
        error: BaseException | None = None,
        *,
        resumed: bool = False,
    ) -> None:
        """Record a completion or chat request: ``finish_reasons`` are those its client was told, ``error``
        is what ended it, if anything did; ``resumed``, whether its client read it again after a break."""
        end = end_of_generation(run.cancelled_by, finish_reasons) if error is None else end_of_error(error)
        if end is None:
            return
        held_a_slot = run.admitted_at is not None
        usage = run.usage
        self._record(
            run,
            tenant,
            origin,
            end,
            prompt_tokens=usage.prompt_tokens if held_a_slot else 0,
            cached_tokens=usage.cached_tokens if held_a_slot else 0,
            completion_tokens=usage.completion_tokens,
            first_token_at=run.first_token_at,
            resumed=resumed,
        )

    def record_embeddings(
        self, work: EngineWork, tenant: str, origin: Origin, prompt_tokens: int, error: BaseException | None = None
    ) -> None:
        """Record an embeddings request; ``error`` is what ended it, if anything did."""
        end = End(200, "stop") if error is None else end_of_error(error)
        if end is None:
            return
        prompt_tokens = prompt_tokens if work.admitted_at is not None else 0
        self._record(work, tenant, origin, end, prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=0)

    def _record(
        self,
        work: EngineWork,
        tenant: str,
        origin: Origin,
        end: End,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        first_token_at: float | None = None,
        resumed: bool = False,
    ) -> None:
        """Build the record now; its engine time is added once the engine reported it."""
        now = time.monotonic()
        started = origin.started
        record = UsageRecord(
            request_id=origin.request_id,
            tenant=tenant,
            key_id=origin.key_id,
            model=origin.model,
            model_version=origin.model_version,
            endpoint=origin.endpoint,
            started_at=datetime.now(UTC) - timedelta(seconds=now - started),
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            completion_tokens=completion_tokens,
            queue_seconds=None if work.admitted_at is None else work.admitted_at - started,
            ttft_seconds=None if first_token_at is None else first_token_at - started,
            total_seconds=now - started,
            engine_seconds=0.0,
            finish_reason=end.finish_reason,
            status=end.status,
            resumed=resumed,
        )
        if work.settle(0.0):
            self._submit(record, work.engine_seconds)
        else:
            self._waiting.spawn(self._submit_when_settled, record, work)

    def _submit_when_settled(self, record: UsageRecord, work: EngineWork) -> None:
        if not work.settle(SETTLE_TIMEOUT):
            log.warning(
                "request %s: the engine did not report every job within %.0fs; recording the engine time reported",
                record.request_id,
                SETTLE_TIMEOUT,
            )
        self._submit(record, work.engine_seconds)

    def _submit(self, record: UsageRecord, engine_seconds: float) -> None:
        priced = self.prices.priced(replace(record, engine_seconds=engine_seconds))
        self.metrics.record_usage(priced.model, priced.tenant, priced.cost, priced.engine_seconds)
        if self._writer is not None:
            self._writer.submit(priced)


def current_accounting() -> Accounting:
    accounting: Accounting = current_app.extensions[EXTENSION]
    return accounting
