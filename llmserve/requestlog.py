"""Request ids and one log line per request: id, route, status, tokens and timings; never prompt text.

The line is written when the response is closed, so a streamed response is logged with its real
duration and token counts.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request

log = logging.getLogger("llmserve.requests")

REQUEST_ID_HEADER = "X-Request-ID"
# Probes arrive every few seconds from every balancer and kubelet; their lines would drown the rest.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def init_app(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        offered = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = offered if _VALID_ID.match(offered) else uuid.uuid4().hex
        g.started = time.monotonic()

    @app.after_request
    def _finish(response: Response) -> Response:
        request_id = g.get("request_id", "-")
        response.headers[REQUEST_ID_HEADER] = request_id
        method, path, started = request.method, request.path, g.get("started", time.monotonic())
        status = response.status_code
        request_globals = g._get_current_object()  # outlives the request context

        level = logging.DEBUG if path in PROBE_PATHS and status < 400 else logging.INFO

        def _log_line() -> None:
            usage = request_globals.get("usage")
            tokens = f"{usage.prompt_tokens}/{usage.completion_tokens}" if usage is not None else "-"
            log.log(
                level,
                "request %s: %s %s -> %d tokens=%s seconds=%.3f",
                request_id,
                method,
                path,
                status,
                tokens,
                time.monotonic() - started,
            )

        response.call_on_close(_log_line)
        return response
