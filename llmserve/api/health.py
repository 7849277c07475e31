"""Liveness and readiness probes.

``/healthz`` fails when the engine thread has died or has made no progress for ``watchdog_timeout``
seconds while work is pending, so a supervisor restarts the process. ``/readyz`` is 200 only once the
model is loaded and a warm-up decode ran. Both answer from the hub without touching llama.cpp.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, jsonify

from llmserve.engine.engine import EngineState
from llmserve.service import current_service

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    service = current_service()
    engine = service.engine
    stalled_for = time.monotonic() - engine.last_progress
    stalled = engine.busy and stalled_for > service.settings.watchdog_timeout
    healthy = engine.alive and not stalled
    body = {
        "status": "ok" if healthy else "unhealthy",
        "engine": engine.state.value,
        "engine_thread": engine.thread_id,
        "stalled_seconds": round(stalled_for, 3) if stalled else 0.0,
    }
    response = jsonify(body)
    response.status_code = 200 if healthy else 503
    return response


@blueprint.get("/readyz")
def readyz() -> Response:
    service = current_service()
    engine = service.engine
    ready = engine.state is EngineState.READY
    body: dict[str, Any] = {"status": "ready" if ready else engine.state.value, "model": service.model_id}
    if engine.failure:
        body["error"] = "the model failed to load; see the server log"
    if ready:
        body["engine"] = asdict(engine.stats())
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    if not ready:
        response.headers["Retry-After"] = "5"
    return response
