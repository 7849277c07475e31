"""OpenAI-style errors: one exception hierarchy, rendered by one set of handlers.

Every non-2xx response, from a bad parameter to an unknown route to a crash, leaves as
``{"error": {"message", "type", "param", "code"}}``. Internal exception text never reaches clients.
"""

from __future__ import annotations

import json
import logging
import math
import socket
from typing import Any

from flask import Flask, Response, jsonify
from gunicorn.util import write_nonblock
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed

from llmserve.request_context import current_request

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with everything needed to render it as the OpenAI API does."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationFailed(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class RateLimited(APIError):
    """A quota is used up for now; ``type`` says which one (``requests`` or ``tokens``), as OpenAI does."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after: float | None, code: str | None = None) -> None:
        super().__init__(message, retry_after=retry_after, code=code)
        self.type = kind


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class StreamNotFound(NotFound):
    """No resumable stream of that id for this key: never one, expired, or another tenant's."""

    code = "stream_not_found"


class StreamBufferExceeded(APIError):
    """A resumable stream produced more than its resume buffer holds (the ``streams.buffer_bytes`` setting)."""

    status = 400
    type = "invalid_request_error"
    code = "stream_buffer_exceeded"


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(APIError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class ClientDisconnected(APIError):
    """The client left before the response was ready; nobody reads this error, the log does."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"


class ServiceUnavailable(APIError):
    """The server cannot take this request now; clients should retry after ``retry_after`` seconds."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class QueueFull(ServiceUnavailable):
    code = "queue_full"


class QueueTimeout(ServiceUnavailable):
    code = "queue_timeout"


class EngineFailure(APIError):
    """The engine failed a request after admission; details are in the server log only."""

    status = 500
    type = "server_error"
    code = "engine_error"


class GrammarBudgetExceeded(APIError):
    """The request's structured output or tool grammar cost the engine more than the model allows."""

    status = 400
    type = "invalid_request_error"
    code = "grammar_budget_exceeded"


def from_validation_error(exc: ValidationError) -> InvalidRequest:
    """Name the first offending parameter the way OpenAI does (``messages[0].content``)."""
    first = exc.errors()[0]
    param = ""
    for part in first["loc"]:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _is_union_tag(part):
            param += f".{part}" if param else part
    if discriminator := (first.get("ctx") or {}).get("discriminator"):  # a union whose tag field is wrong
        param += f".{discriminator}" if param else discriminator
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param)
    if first["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    message = first["msg"].removeprefix("Value error, ")
    if not param:
        return InvalidRequest(message)
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param)


def _is_union_tag(part: str) -> bool:
    """pydantic names the union member it tried (``str``, ``list[str]``) in an error's location."""
    return part in {"str", "int", "float", "bool", "none"} or "[" in part or "-" in part


def render(error: APIError) -> Response:
    response = jsonify(error.body())
    response.status_code = error.status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return response


def respond_with(error: APIError) -> Response:
    """The error response, noting the error's code for the metrics and the request log."""
    current_request().error_code = error.code or error.type
    return render(error)


_HTTP_ERRORS: dict[int, type[APIError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def init_app(app: Flask) -> None:
    """Route every error, including werkzeug's own and unexpected crashes, through ``render``."""

    app.register_error_handler(APIError, respond_with)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> Response:
        status = error.code or 500
        cls = _HTTP_ERRORS.get(status)
        if cls is None:
            cls = InvalidRequest if 400 <= status < 500 else APIError
        api_error = cls(error.description or error.name)
        response = respond_with(api_error)
        response.status_code = status
        if isinstance(error, WerkzeugMethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(error.valid_methods))
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response:
        log.error("unhandled error while serving a request", exc_info=error)
        return respond_with(APIError("The server had an error while processing your request."))


def write_protocol_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    """gunicorn's answer to a request it cannot even parse (a bad request line, headers too large), as an
    error object rather than gunicorn's HTML page; installed over ``gunicorn.util.write_error``."""
    error = (InvalidRequest if status < 500 else APIError)(message or reason)
    body = json.dumps(error.body()).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
    write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body)
