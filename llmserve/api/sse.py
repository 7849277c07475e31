"""Server-sent events as the OpenAI API sends them.

Each chunk is ``data: {json}\\n\\n``; the stream ends with ``data: [DONE]``. While nothing is ready a
comment line keeps proxies with idle timeouts from cutting the connection. An error after the stream
started is sent as ``data: {"error": ...}`` and the stream ends there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, request, stream_with_context

from llmserve.errors import APIError

log = logging.getLogger(__name__)

HEARTBEAT = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def stream_response(chunks: Iterator[dict[str, Any] | None], on_close: Callable[[], None]) -> Response:
    """Stream ``chunks`` (``None`` means send a heartbeat); ``on_close`` runs however the stream ends."""

    def body() -> Iterator[str]:
        try:
            for chunk in chunks:
                yield HEARTBEAT if chunk is None else event(chunk)
            yield DONE
        except GeneratorExit:
            # The client left and the server closed the body. The request context sees GeneratorExit on
            # its way out, which prometheus-flask-exporter would count as the request's exception.
            request.prom_do_not_track = True  # type: ignore[attr-defined]
            raise
        except APIError as exc:
            yield event(exc.body())
        except Exception:
            log.exception("stream failed after it started")
            yield event(APIError("The server had an error while streaming the response.").body())
        finally:
            on_close()

    return Response(stream_with_context(body()), mimetype="text/event-stream", headers=HEADERS)
