"""Liveness and readiness probes.

``/healthz`` fails when an engine thread that was serving has died, or one has made no progress for
``watchdog_timeout`` seconds while work is pending (the worker then replaces itself too: see
``lifecycle.watch_engines``), or when no model could be loaded at all. A model that failed to load while
others serve does not fail it: restarting would not mend the file. ``/readyz`` is 200 once no model is
still loading and at least one is warm, and 503 again from the moment the worker starts draining; it
reports each model, and its engine details (tenants' load among them) are for callers that may read the
metrics. An instance in warm standby is ready (its models are warm) and says ``"standby": true``: its
agent check keeps the balancers' traffic away. Both answer from the hub without touching llama.cpp.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, jsonify

from llmserve.api.openapi import Operation, documented
from llmserve.api.request import server_settings
from llmserve.auth import may_observe
from llmserve.models.registry import current_registry
from llmserve.models.served import ServedModel
from llmserve.standby import Standby

blueprint = Blueprint("health", __name__)


def _probe(body: dict[str, Any], ok: bool) -> Response:
    response = jsonify(body)
    response.status_code = 200 if ok else 503
    return response


@blueprint.get("/healthz")
@documented(Operation("Liveness: 503 when an engine thread died or stalled", answers=(503,), public=True))
def healthz() -> Response:
    timeout = server_settings().watchdog_timeout
    models = current_registry().models.values()
    engines: dict[str, Any] = {}
    healthy = any(model.engine.alive for model in models)
    for model in models:
        engine, stalled_for = model.engine, model.stalled_for()
        stalled = stalled_for > timeout
        healthy = healthy and not stalled and (engine.alive or model.failed_to_load)
        engines[model.id] = {
            "engine": engine.state.value,
            "engine_thread": engine.thread_id,
            "stalled_seconds": round(stalled_for, 3) if stalled else 0.0,
        }
    return _probe({"status": "ok" if healthy else "unhealthy", "models": engines}, healthy)


def _model_readiness(model: ServedModel, observer: bool) -> dict[str, Any]:
    engine = model.engine
    view: dict[str, Any] = {"status": engine.state.value, "version": model.version, "backend": model.backend}
    if engine.failure:
        view["error"] = engine.failure if observer else "the model failed; see the server log"
    if model.ready and observer:
        view["engine"] = asdict(engine.stats())
    return view


@blueprint.get("/readyz")
@documented(Operation("Readiness: 503 until the models are warm and while draining", answers=(503,), public=True))
def readyz() -> Response:
    registry = current_registry()
    observer = may_observe()
    ready = registry.ready
    status = "ready" if ready else ("draining" if registry.draining else "loading" if registry.loading else "failed")
    models = {model.id: _model_readiness(model, observer) for model in registry.models.values()}
    standby = {"standby": True} if Standby(server_settings().state_dir).on else {}  # ready, and given no traffic
    response = _probe({"status": status, **standby, "models": models}, ready)
    if not ready:
        response.headers["Retry-After"] = "5"
    return response
