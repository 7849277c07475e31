"""Request ids and one structured log line per request.

Every request gets an id: the client's ``X-Request-ID`` when it is 1-128 printable ASCII characters
without spaces, else a fresh one; the response echoes it. The line is written when the response is
closed, so a streamed response is logged when its stream ends (however it ends), with its real duration,
token counts and finish reason.

The line's fields: ``request_id``, ``method``, ``path`` (no query string), ``status``, ``duration_ms``,
``client`` (the peer address), then whatever the handlers put into ``flask.g.request_log``, a dict created
empty for every request (``g.request_log.update(...)``; the same dict all request long, so a stream's
generator or close callback may add to it):

=====================  =======  ==========================================================
``tenant``             str      the authenticated tenant
``model``              str      the model id served
``prompt_tokens``      int      prompt tokens, counted once however many choices share them
``completion_tokens``  int      tokens generated, all choices together
``cached_tokens``      int      prompt tokens reused from the KV cache
``queue_ms``           float    time waiting for a free slot
``ttft_ms``            float    time from arrival to the first token
``finish_reason``      str      ``stop``, ``length``, ... (several choices: comma-separated)
``error_code``         str      the OpenAI error ``code`` of an error response
``prompt``/``output``  str      only when ``settings.log_prompts`` is on
=====================  =======  ==========================================================

Nothing here reads a request body: prompts and outputs reach the log only if a handler adds them, which
handlers do only when ``log_prompts`` is on.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from flask import Flask, Response, g, request

from llmserve.logs import RECORD_ATTRIBUTES, REQUEST_LOGGER

log = logging.getLogger(REQUEST_LOGGER)

REQUEST_ID_HEADER = "X-Request-ID"
# Probes and scrapes arrive every few seconds from every balancer, kubelet and Prometheus; their lines
# would drown the rest. A failing probe is still logged at INFO.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_VALID_ID = re.compile(r"[\x21-\x7e]{1,128}")


def _request_id() -> str:
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    return offered if _VALID_ID.fullmatch(offered) else uuid.uuid4().hex


def init_app(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.request_id = _request_id()
        g.started = time.monotonic()
        g.request_log = {}

    @app.after_request
    def _finish(response: Response) -> Response:
        # A hook registered earlier may have ended the request before ``_start`` ran.
        request_id = g.get("request_id") or _request_id()
        response.headers[REQUEST_ID_HEADER] = request_id
        started = g.get("started", time.monotonic())
        fields: dict[str, Any] = g.setdefault("request_log", {})
        line: dict[str, Any] = {
            "request_id": request_id,
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": 0.0,
            "client": request.remote_addr,
        }
        level = logging.DEBUG if request.path in PROBE_PATHS and response.status_code < 400 else logging.INFO

        def _log_line() -> None:
            line["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
            for key, value in fields.items():
                # A name LogRecord uses itself would make logging raise; the fixed fields win.
                if key not in line and key not in RECORD_ATTRIBUTES:
                    line[key] = value
            log.log(
                level,
                "%s %s %d %.1fms %s",
                line["method"],
                line["path"],
                line["status"],
                line["duration_ms"],
                request_id,
                extra=line,
            )

        response.call_on_close(_log_line)
        return response
