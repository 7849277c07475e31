"""One typed record per request, created by the app's first hook: what the request log, the errors, the
metrics, authentication and the views share about the request in flight, instead of names in
``flask.g``."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import Flask, g, request

if TYPE_CHECKING:
    from llmserve.tenancy import Principal

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_ID = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass
class RequestContext:
    request_id: str
    started: float  # monotonic seconds at arrival
    principal: Principal | None = None  # set by authentication
    model: str | None = None  # the served model that answers, once the request named one
    error_code: str | None = None  # the OpenAI error code of an error response
    large_body: bool = False  # its preparation runs off the hub
    in_flight: bool = False  # counted by lifecycle.InFlight until its response is sent
    # Further fields of the request's log line (tokens, timings, finish reason; see ``requestlog``).
    log: dict[str, Any] = field(default_factory=dict)


def _request_id() -> str:
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    return offered if _VALID_ID.fullmatch(offered) else uuid.uuid4().hex


def current_request() -> RequestContext:
    """This request's context; made on first use when a hook registered earlier ended the request first."""
    context: RequestContext | None = g.get("llmserve_request")
    if context is None:
        context = g.llmserve_request = RequestContext(_request_id(), time.monotonic())
    return context


def init_app(app: Flask) -> None:
    """Register first: every later hook and view finds the context."""

    @app.before_request
    def _begin() -> None:
        current_request()
