"""Request ids, the one structured line per request, and the JSON and text log formats (Flask test client)."""

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response, stream_with_context
from flask.testing import FlaskClient
from gunicorn.config import Config
from pydantic import ValidationError

from llmserve.logs import REQUEST_LOGGER, GunicornLogger, logging_config
from llmserve.request_context import current_request
from llmserve.settings import Settings, SettingsError, load_settings

HANDLER_FIELDS = {
    "tenant": "acme",
    "model": "gemma-3-270m",
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "cached_tokens": 0,
    "queue_ms": 1.5,
    "ttft_ms": 20.25,
    "finish_reason": "stop",
}


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captures the request lines, at every level."""
    caplog.set_level(logging.DEBUG, logger=REQUEST_LOGGER)
    return caplog


def request_lines(lines: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The request lines logged so far in this test."""
    return [record for record in lines.records if record.name == REQUEST_LOGGER]


def formatter(log_format: str) -> logging.Formatter:
    """The formatter exactly as logging_config describes it to dictConfig."""
    config = dict(logging_config(Settings(log_format=log_format))["formatters"][log_format])
    factory = config.pop("()")
    return factory(**config)


@pytest.fixture
def handler_route(app: Flask) -> str:
    @app.get("/test-handler-fields")
    def handler_fields() -> dict[str, Any]:
        current_request().log.update(HANDLER_FIELDS)
        return {"ok": True}

    return "/test-handler-fields"


def get(client: FlaskClient, path: str, **kwargs: Any) -> Any:
    response = client.get(path, **kwargs)
    response.close()  # what the WSGI server does once the body is sent: the line is written now
    return response


# Request ids


def test_a_request_without_an_id_gets_a_generated_one(client: FlaskClient, lines: pytest.LogCaptureFixture) -> None:
    response = get(client, "/v1/models")
    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert request_lines(lines)[-1].request_id == request_id  # type: ignore[attr-defined]
    assert get(client, "/v1/models").headers["X-Request-ID"] != request_id


def test_a_valid_incoming_id_is_honoured(client: FlaskClient, lines: pytest.LogCaptureFixture) -> None:
    offered = "req_01HZX:trace/7-" + "x" * 100
    response = get(client, "/v1/models", headers={"X-Request-ID": offered})
    assert response.headers["X-Request-ID"] == offered
    assert request_lines(lines)[-1].request_id == offered  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "offered",
    ["x" * 129, "abc\x01def", "abc\tdef", "abc\x7f", "with spaces", "caf\u00e9", ""],
    ids=["too-long", "control", "tab", "delete", "spaces", "non-ascii", "empty"],
)
def test_an_invalid_incoming_id_is_replaced(client: FlaskClient, offered: str) -> None:
    request_id = get(client, "/v1/models", headers={"X-Request-ID": offered}).headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)


# The request line


def test_the_json_line_parses_and_has_the_request_fields(client: FlaskClient, lines: pytest.LogCaptureFixture) -> None:
    response = get(client, "/v1/models", headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 200
    (record,) = request_lines(lines)
    assert record.levelno == logging.INFO
    line = json.loads(formatter("json").format(record))
    assert list(line)[:5] == ["time", "level", "logger", "message", "pid"]
    assert line["pid"] == os.getpid()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert line["level"] == "INFO"
    assert line["logger"] == REQUEST_LOGGER
    assert line["request_id"] == "abc-123"
    assert line["method"] == "GET"
    assert line["path"] == "/v1/models"
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["client"] == "127.0.0.1"
    assert line["message"] == f"GET /v1/models 200 {line['duration_ms']:.1f}ms abc-123"
    assert "prompt" not in line and "output" not in line


def test_fields_handlers_put_in_the_request_log_are_logged(
    client: FlaskClient, handler_route: str, lines: pytest.LogCaptureFixture
) -> None:
    get(client, handler_route)
    line = json.loads(formatter("json").format(request_lines(lines)[-1]))
    assert {key: line[key] for key in HANDLER_FIELDS} == HANDLER_FIELDS
    assert line["path"] == handler_route


def test_handler_fields_never_replace_the_fixed_ones_or_break_logging(
    app: Flask, client: FlaskClient, lines: pytest.LogCaptureFixture
) -> None:
    @app.get("/test-clashing-fields")
    def clashing() -> dict[str, Any]:
        current_request().log.update(status=999, request_id="forged", message="x", name="y", tenant="acme")
        return {}

    get(client, "/test-clashing-fields", headers={"X-Request-ID": "real"})
    line = json.loads(formatter("json").format(request_lines(lines)[-1]))
    assert (line["status"], line["request_id"], line["logger"], line["tenant"]) == (200, "real", REQUEST_LOGGER, "acme")


def test_a_stream_is_logged_when_it_ends_with_what_it_added(
    app: Flask, client: FlaskClient, lines: pytest.LogCaptureFixture
) -> None:
    @app.get("/test-stream")
    def stream() -> Response:
        current_request().log.update(model_version="a5fd3b62230a", prompt_tokens=3)

        def body() -> Iterator[str]:
            try:
                yield "data: 1\n\n"
                yield "data: 2\n\n"
            finally:  # as sse.stream_response's on_close: the counts are final only now
                current_request().log.update(completion_tokens=2, finish_reason="length")

        return Response(stream_with_context(body()), mimetype="text/event-stream")

    response = client.get("/test-stream")
    assert response.headers["X-Request-ID"]
    assert request_lines(lines) == []  # the stream has not ended
    assert response.get_data(as_text=True) == "data: 1\n\ndata: 2\n\n"
    response.close()
    (record,) = request_lines(lines)
    line = json.loads(formatter("json").format(record))
    assert (line["prompt_tokens"], line["completion_tokens"], line["finish_reason"]) == (3, 2, "length")


def test_errors_are_logged_with_their_status_and_code(client: FlaskClient, lines: pytest.LogCaptureFixture) -> None:
    get(client, "/v1/models/gpt-9")
    record = request_lines(lines)[-1]
    assert (record.status, record.error_code) == (404, "model_not_found")  # type: ignore[attr-defined]
    assert record.levelno == logging.INFO


def test_successful_probes_log_at_debug_failing_ones_at_info(
    client: FlaskClient, lines: pytest.LogCaptureFixture
) -> None:
    assert get(client, "/metrics").status_code == 200
    assert get(client, "/readyz").status_code == 503  # the model is never loaded here
    metrics, readyz = request_lines(lines)
    assert (metrics.path, metrics.levelno) == ("/metrics", logging.DEBUG)  # type: ignore[attr-defined]
    assert (readyz.path, readyz.levelno) == ("/readyz", logging.INFO)  # type: ignore[attr-defined]


def test_the_text_format_renders_the_request_then_key_value_pairs(
    app: Flask, client: FlaskClient, lines: pytest.LogCaptureFixture
) -> None:
    @app.get("/test-text")
    def text() -> dict[str, Any]:
        current_request().log.update(tenant="acme", prompt_tokens=12, ttft_ms=20.25, prompt='say "hi" twice')
        return {}

    get(client, "/test-text", headers={"X-Request-ID": "abc-123"})
    record = request_lines(lines)[-1]
    rendered = formatter("text").format(record)
    duration = f"{record.duration_ms:.1f}ms"  # type: ignore[attr-defined]
    assert rendered.endswith(
        f"INFO [{os.getpid()}] {REQUEST_LOGGER}: GET /test-text 200 {duration} abc-123 "
        'client=127.0.0.1 tenant=acme prompt_tokens=12 ttft_ms=20.25 prompt="say \\"hi\\" twice"'
    )
    assert "\n" not in rendered


def test_the_text_format_appends_extra_fields_of_any_logger() -> None:
    record = logging.makeLogRecord({"name": "llmserve.engine", "msg": "slot %d freed", "args": (3,), "path": "/x"})
    assert formatter("text").format(record).endswith("llmserve.engine: slot 3 freed path=/x")


def test_json_records_carry_extra_fields_and_tracebacks() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        fields = {"name": "x", "levelname": "ERROR", "msg": "failed", "exc_info": sys.exc_info(), "slot": 3}
    record = logging.makeLogRecord(fields)
    line = json.loads(formatter("json").format(record))
    assert (line["level"], line["logger"], line["message"], line["slot"]) == ("ERROR", "x", "failed", 3)
    assert "RuntimeError: boom" in line["exc_info"]


# Configuration


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_logging_config_uses_the_chosen_format_and_level(log_format: str) -> None:
    config = logging_config(Settings(log_format=log_format, log_level="warning"))
    assert config["handlers"]["stderr"]["formatter"] == log_format
    assert set(config["formatters"]) == {log_format}
    assert config["root"] == {"level": "WARNING", "handlers": ["stderr"]}


def test_gunicorn_logs_through_the_root_handler_and_keeps_access_lines_off() -> None:
    cfg = Config()
    cfg.set("logger_class", "llmserve.logs.GunicornLogger")
    cfg.set("loglevel", "debug")
    assert cfg.logger_class is GunicornLogger
    logger = GunicornLogger(cfg)
    for log in (logger.error_log, logger.access_log):
        assert log.propagate
        assert not [handler for handler in log.handlers if getattr(handler, "_gunicorn", False)]
    assert logger.error_log.level == logging.DEBUG
    assert not logger.access_log_enabled


def test_log_settings_default_to_json_without_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMSERVE_LOG_FORMAT", raising=False)
    monkeypatch.delenv("LLMSERVE_LOG_PROMPTS", raising=False)
    settings = Settings()
    assert (settings.log_format, settings.log_prompts) == ("json", False)
    for name in ("log_format", "log_prompts"):
        assert Settings.model_fields[name].description


def test_log_format_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        Settings(log_format="xml")
    monkeypatch.setenv("LLMSERVE_LOG_FORMAT", "xml")
    with pytest.raises(SettingsError, match="LLMSERVE_LOG_FORMAT"):
        load_settings()
    monkeypatch.setenv("LLMSERVE_LOG_FORMAT", "text")
    assert load_settings().log_format == "text"
