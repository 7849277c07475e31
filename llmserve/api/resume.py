"""Resumable streams: a generation that outlives its client's connection, and GET /v1/streams/{id},
where a client that lost its connection reads what it missed and follows the rest.

A client opts in per request with ``X-Stream-Resumable: true`` (or the server opts every stream in with
``streams.resumable``); the response then says ``X-Stream-Resumable: true`` and names the stream in
``X-Stream-Id`` (the response's id). Every event carries ``id: N``. When the client leaves, the
generation goes on for up to ``streams.grace`` seconds with nobody reading, writing its events to the
stream's journal (``llmserve.resumable``); a reconnect with ``Last-Event-ID: N`` and the same tenant's
key gets the events after N, then the rest as they come. Without the opt-in, a client leaving cancels
its generation, as it always did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import gevent
from flask import Blueprint, Flask, Response, current_app, request, stream_with_context

from llmserve.api import sse
from llmserve.api.openapi import EVENT_STREAM, Operation, documented
from llmserve.api.sse import HEADERS, HEARTBEAT
from llmserve.errors import InvalidRequest, RateLimited, ServiceUnavailable, StreamNotFound
from llmserve.lifecycle import IN_FLIGHT, InFlight
from llmserve.metrics import LLMMetrics, current_metrics
from llmserve.models.served import ServedModel
from llmserve.resumable import Journal, Journals, JournalsFull
from llmserve.settings import Settings
from llmserve.tenancy import current_tenant

log = logging.getLogger(__name__)

blueprint = Blueprint("streams", __name__)
EXTENSION = "llmserve.journals"
RESUMABLE_HEADER = "X-Stream-Resumable"
STREAM_ID_HEADER = "X-Stream-Id"
LAST_EVENT_ID = "Last-Event-ID"
PUBLISH_INTERVAL = 5.0  # seconds between sweeps and reports of the journals while there are any


def init_app(app: Flask, settings: Settings) -> None:
    limits = settings.streams.limits(settings.heartbeat_interval)
    app.extensions[EXTENSION] = Journals(settings.state_dir / "streams", limits)
    app.register_blueprint(blueprint)


def current_journals() -> Journals:
    journals: Journals = current_app.extensions[EXTENSION]
    return journals


class _Watch:
    """While a worker has opened journals: sweep the expired ones and report their bytes, until none is left."""

    running = False

    @classmethod
    def ensure(cls, journals: Journals, metrics: LLMMetrics) -> None:
        if not cls.running:
            cls.running = True
            gevent.spawn(cls._run, journals, metrics)

    @classmethod
    def _run(cls, journals: Journals, metrics: LLMMetrics) -> None:
        try:
            while True:
                journals.sweep()
                count, size = journals.usage()
                metrics.stream_journal_bytes.set(size)
                if not count:
                    return
                gevent.sleep(PUBLISH_INTERVAL)
        finally:
            cls.running = False


def wants_resumable(default: bool) -> bool:
    """Whether this request's stream is resumable: its header, else the server's setting."""
    asked = request.headers.get(RESUMABLE_HEADER)
    if asked is None:
        return default
    if asked.lower() not in ("true", "false"):
        raise InvalidRequest(f"{RESUMABLE_HEADER} must be true or false, got {asked!r}.", param=RESUMABLE_HEADER)
    return asked.lower() == "true"


def open_journal(stream_id: str, tenant: str) -> Journal:
    """The journal of a new resumable stream; a 429 (the tenant's share) or 503 (the server's) when full."""
    journals = current_journals()
    try:
        journal = journals.create(stream_id, tenant)
    except JournalsFull as exc:
        if exc.tenant:
            raise RateLimited(str(exc), kind="requests", retry_after=1, code="resumable_streams_exhausted") from None
        raise ServiceUnavailable(str(exc), retry_after=1) from None
    _Watch.ensure(journals, current_metrics())
    return journal


def resumable_response(
    chunks: Iterator[dict[str, Any] | None],
    on_close: Callable[[], None],
    journal: Journal,
    model: ServedModel,
    grace: float,
    draining: Callable[[], bool],
) -> Response:
    """The SSE response of a resumable stream: ``sse.stream_response`` whose generation, once its client
    left, goes on holding its model and the worker's drain (``Parked``)."""
    in_flight: InFlight = current_app.extensions[IN_FLIGHT]

    def keep() -> Callable[[], None]:
        model.hold()
        done = in_flight.keep()

        def release() -> None:
            model.release()
            done()

        return release

    response = sse.stream_response(chunks, on_close, Parked(journal, grace, keep, draining))
    response.headers.update({RESUMABLE_HEADER: "true", STREAM_ID_HEADER: journal.stream_id})
    return response


class Parked:
    """Keeps a resumable stream's generation going after its client left, while someone may still want it:
    until it ends, or until nobody has read it for ``grace`` seconds (then it is cancelled). While the
    worker drains it runs to its end (or the drain's deadline): its journal outlives the worker, and a
    client can resume from the next one."""

    def __init__(
        self,
        journal: Journal,
        grace: float,
        keep: Callable[[], Callable[[], None]],
        draining: Callable[[], bool],
    ) -> None:
        self.journal = journal
        self._grace = grace
        self._keep = keep  # holds what the generation needs (its model, the drain's count); returns the release
        self._draining = draining
        self._metrics: LLMMetrics = current_metrics()

    def park(self, frames: Generator[str, None, None], on_close: Callable[[], None]) -> None:
        release = self._keep()
        self._metrics.streams_parked.inc()
        gevent.spawn(self._generate_alone, frames, on_close, release)

    def _generate_alone(
        self, frames: Generator[str, None, None], on_close: Callable[[], None], release: Callable[[], None]
    ) -> None:
        left = time.time()
        try:
            for _ in frames:
                if self.journal.unread_for(left) > self._grace and not self._draining():
                    log.info("stream %s: nobody read it for %.0fs; cancelled", self.journal.stream_id, self._grace)
                    break
        finally:
            frames.close()
            self.journal.finish()
            try:
                on_close()
            finally:
                release()
                self._metrics.streams_parked.dec()


@blueprint.get("/v1/streams/<stream_id>")
@documented(
    Operation("Resume a resumable stream after Last-Event-ID", errors=(400, 401, 403, 404), media=(EVENT_STREAM,))
)
def resume_stream(stream_id: str) -> Response:
    journal = current_journals().find(stream_id, current_tenant().name)
    if journal is None:
        raise StreamNotFound(f"No resumable stream {stream_id!r} for this key: it never was, or it expired.")
    after = _last_event_id()
    current_metrics().stream_resumes.inc()

    def body() -> Iterator[str]:
        for frame in journal.frames(after, gevent.sleep):
            yield HEARTBEAT if frame is None else frame

    headers = {**HEADERS, STREAM_ID_HEADER: stream_id}
    return Response(stream_with_context(body()), mimetype="text/event-stream", headers=headers)


def _last_event_id() -> int:
    raw = request.headers.get(LAST_EVENT_ID, "0")
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidRequest(
            f"{LAST_EVENT_ID} must be a number of an event of the stream, got {raw!r}.", param=LAST_EVENT_ID
        )
    return int(raw)
