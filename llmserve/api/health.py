"""Liveness and readiness probes.

``/healthz`` fails when the engine thread has died or has made no progress for ``watchdog_timeout``
seconds while work is pending (the worker then replaces itself too: see ``lifecycle.watch_engine``).
``/readyz`` is 200 only once the model is loaded and a warm-up decode ran, and 503 again from the moment
the worker starts draining; its engine details (tenants' load among them) are for callers that may read
the metrics. Both answer from the hub without touching llama.cpp.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, jsonify

from llmserve.api.openapi import Operation, documented
from llmserve.auth import may_observe
from llmserve.engine.engine import EngineState
from llmserve.service import current_service

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
@documented(Operation("Liveness: 503 when the engine thread died or stalled", answers=(503,), public=True))
def healthz() -> Response:
    service = current_service()
    engine = service.engine
    stalled_for = service.stalled_for()
    stalled = stalled_for > service.settings.watchdog_timeout
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
@documented(Operation("Readiness: 503 until the model is warm and while draining", answers=(503,), public=True))
def readyz() -> Response:
    service = current_service()
    engine = service.engine
    ready = service.ready
    status = "ready" if ready else ("draining" if service.draining else engine.state.value)
    body: dict[str, Any] = {"status": status, "model": service.model_id}
    if engine.failure:
        body["error"] = "the model failed to load; see the server log"
    if engine.state is EngineState.READY and may_observe():
        body["engine"] = asdict(engine.stats())
    response = jsonify(body)
    response.status_code = 200 if ready else 503
    if not ready:
        response.headers["Retry-After"] = "5"
    return response
