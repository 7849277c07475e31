"""Request ids and one structured log line per request.

Every request gets an id: the client's ``X-Request-ID`` when it is 1-128 printable ASCII characters
without spaces, else a fresh one; the response echoes it. The line is written when the response is
closed, so a streamed response is logged when its stream ends (however it ends), with its real duration,
token counts and finish reason.

The line's fields: ``request_id``, ``method``, ``path`` (no query string), ``status``, ``duration_ms``,
``client`` (the peer address), ``model`` and ``error_code`` when set, then whatever the handlers put into
the request context's ``log`` dict (``current_request().log.update(...)``; the same dict all request
long, so a stream's generator or close callback may add to it):

=====================  =======  ==========================================================
``tenant``             str      the authenticated tenant
``model``              str      the model that answered
``model_version``      str      its version (the GGUF's sha256 prefix)
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
import time
from typing import Any

from flask import Flask, Response, request

from llmserve.logs import RECORD_ATTRIBUTES, REQUEST_LOGGER
from llmserve.request_context import REQUEST_ID_HEADER, current_request

log = logging.getLogger(REQUEST_LOGGER)

# Probes and scrapes arrive every few seconds from every balancer, kubelet and Prometheus; their lines
# would drown the rest. A failing probe is still logged at INFO.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def init_app(app: Flask) -> None:
    @app.after_request
    def _finish(response: Response) -> Response:
        context = current_request()
        request_id, started = context.request_id, context.started
        response.headers[REQUEST_ID_HEADER] = request_id
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
            named = {"model": context.model, "error_code": context.error_code}
            for key, value in [*((k, v) for k, v in named.items() if v is not None), *context.log.items()]:
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
