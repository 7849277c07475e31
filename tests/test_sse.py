"""The SSE framing: numbered chunks, keep-alive comments, the closing [DONE], and errors after the start."""

from collections.abc import Iterator

from flask import Flask

from llmserve.api.sse import stream_response
from llmserve.errors import QueueTimeout


def body_of(app: Flask, chunks: Iterator[dict | None], closed: list[bool]) -> str:
    with app.test_request_context():
        response = stream_response(chunks, lambda: closed.append(True))
        return "".join(response.response)  # type: ignore[arg-type]


def test_chunks_heartbeats_and_done(app: Flask) -> None:
    closed: list[bool] = []
    text = body_of(app, iter([{"a": 1}, None, {"b": "é"}]), closed)
    assert text == 'id: 1\ndata: {"a":1}\n\n: keep-alive\n\nid: 2\ndata: {"b":"é"}\n\nid: 3\ndata: [DONE]\n\n'
    assert closed == [True]


def test_an_error_after_the_start_is_an_error_event_and_the_end(app: Flask) -> None:
    def failing() -> Iterator[dict | None]:
        yield {"a": 1}
        raise QueueTimeout("waited too long", retry_after=3)

    closed: list[bool] = []
    text = body_of(app, failing(), closed)
    assert text.startswith('id: 1\ndata: {"a":1}\n\nid: 2\ndata: {"error":')
    assert '"code":"queue_timeout"' in text
    assert "[DONE]" not in text
    assert closed == [True]


def test_unexpected_failures_do_not_leak_details(app: Flask) -> None:
    def crashing() -> Iterator[dict | None]:
        raise RuntimeError("secret")
        yield  # pragma: no cover

    text = body_of(app, crashing(), [])
    assert "secret" not in text
    assert '"type":"server_error"' in text
