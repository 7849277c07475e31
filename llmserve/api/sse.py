"""Server-sent events as the OpenAI API sends them, each with an ``id:`` so that a stream can be resumed.

Each chunk is ``id: N`` and ``data: {json}``, N counting the stream's events from 1; the stream ends with
``data: [DONE]``. While nothing is ready a comment line keeps proxies with idle timeouts from cutting the
connection. An error after the stream started is sent as ``data: {"error": ...}`` and the stream ends
there.

A resumable stream (``api.resume``) writes every event to its journal as well, and when its client
leaves, its generation goes on without it: the same frames, from where the client stopped reading.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol

from flask import Response, request, stream_with_context

from llmserve.errors import APIError, StreamBufferExceeded
from llmserve.resumable import BufferExceeded, Journal

log = logging.getLogger(__name__)

HEARTBEAT = ": keep-alive\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def encode(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


class Frames:
    """A stream's events, numbered, and written to its journal too when it has one."""

    def __init__(self, journal: Journal | None) -> None:
        self.journal = journal
        self.sent = 0

    def of(self, chunks: Iterator[dict[str, Any] | None]) -> Generator[str, None, None]:
        """The frames of ``chunks`` (``None`` is a heartbeat), then the end: ``[DONE]`` or an error event."""
        try:
            for chunk in chunks:
                yield self._heartbeat() if chunk is None else self._frame(encode(chunk))
            yield self._frame("[DONE]", last=True)
        except BufferExceeded as exc:
            overflow = StreamBufferExceeded(f"The stream was ended: {exc} (the streams.buffer_bytes setting).")
            yield self._frame(encode(overflow.body()), last=True)
        except APIError as exc:
            yield self._frame(encode(exc.body()), last=True)
        except Exception:
            log.exception("stream failed after it started")
            failure = APIError("The server had an error while streaming the response.")
            yield self._frame(encode(failure.body()), last=True)

    def _frame(self, data: str, *, last: bool = False) -> str:
        frame = f"id: {self.sent + 1}\ndata: {data}\n\n"
        if self.journal is not None:
            self.journal.append(frame, last=last)  # a frame past the buffer is never sent: no id is skipped
        self.sent += 1
        return frame

    def _heartbeat(self) -> str:
        if self.journal is not None:
            self.journal.keep_alive()
        return HEARTBEAT


class Parking(Protocol):
    """What keeps a resumable stream's generation going once its client has left."""

    journal: Journal

    def park(self, frames: Generator[str, None, None], on_close: Callable[[], None]) -> None: ...


def stream_response(
    chunks: Iterator[dict[str, Any] | None], on_close: Callable[[], None], parking: Parking | None = None
) -> Response:
    """Stream ``chunks`` (``None`` means send a heartbeat); ``on_close`` runs however the stream ends, for
    a resumable stream (``parking``) once its generation has ended, whether or not its client stayed."""
    frames = Frames(parking.journal if parking is not None else None).of(chunks)

    def body() -> Iterator[str]:
        parked = False
        try:
            for frame in frames:  # noqa: UP028 (``yield from`` would close ``frames`` with this generator)
                yield frame
        except GeneratorExit:
            # The client left and the server closed the body. The request context sees GeneratorExit on
            # its way out, which prometheus-flask-exporter would count as the request's exception.
            request.prom_do_not_track = True  # type: ignore[attr-defined]
            if parking is not None:
                parking.park(frames, on_close)
                parked = True
            raise
        finally:
            if not parked:
                frames.close()
                if parking is not None:
                    parking.journal.finish()
                on_close()

    return Response(stream_with_context(body()), mimetype="text/event-stream", headers=HEADERS)
