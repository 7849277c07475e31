"""Lifecycle pieces that need no model: readiness while draining, requests in flight, systemd messages."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from llmserve import lifecycle
from llmserve.models.registry import EXTENSION


def test_readiness_turns_503_once_draining(app: Flask, client: FlaskClient) -> None:
    app.extensions[EXTENSION].drain(time.monotonic() + 10)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json["status"] == "draining"
    assert response.headers["Retry-After"] == "5"


def test_requests_count_as_in_flight_until_their_response_is_closed(app: Flask, client: FlaskClient) -> None:
    in_flight: lifecycle.InFlight = app.extensions[lifecycle.IN_FLIGHT]
    response = client.get("/v1/models")
    assert in_flight.count == 1  # the test client has not closed the response yet
    response.close()
    assert in_flight.count == 0
    client.get("/v1/nowhere").close()  # errors too
    assert in_flight.count == 0


def test_systemd_hears_only_what_the_server_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        monkeypatch.delenv(lifecycle.NOTIFY_ENV, raising=False)
        lifecycle.hide_notify_socket()
        assert "NOTIFY_SOCKET" not in os.environ  # gunicorn's own READY=1 goes nowhere
        assert lifecycle.notify("READY=1", "STATUS=serving")
        assert listener.recv(1024) == b"READY=1\nSTATUS=serving"
        lifecycle.announce_reload()
        assert listener.recv(1024).startswith(b"RELOADING=1\nMONOTONIC_USEC=")


def test_without_systemd_notify_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lifecycle.NOTIFY_ENV, raising=False)
    assert not lifecycle.notify("READY=1")
