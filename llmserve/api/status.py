"""GET /v1/status: the host's live state in one answer, what the console's status view polls (admin key).

Every worker of the host counts, not only the one that answers: each writes its models' state, load and
recent activity to its status file about once a second (``ModelRegistry.status``), and this sums them.
So the figures lag by up to a second, and a model shows the state of each worker that serves it.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from flask import Blueprint, Response, jsonify

from llmserve.api.admin import alias_view
from llmserve.api.openapi import Operation, documented
from llmserve.api.request import server_settings
from llmserve.models.activity import BUCKET_SECONDS, RATE_SECONDS, WINDOW_SECONDS, host_activity
from llmserve.models.registry import current_registry
from llmserve.models.state import tenant_loads, worker_statuses
from llmserve.standby import Standby
from llmserve.tenancy import require_admin

blueprint = Blueprint("status", __name__)
blueprint.before_request(require_admin)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _model_view(name: str, reports: dict[int, dict[str, Any]], now: float) -> dict[str, Any]:
    """One model as every worker that serves it reports it."""
    states = {pid: report["status"] for pid, report in reports.items()}
    activity = host_activity(((report.get("activity"), report.get("ttfts", [])) for report in reports.values()), now)
    versions = [report["version"] for report in reports.values() if report.get("version")]
    return {
        "id": name,
        "version": Counter(versions).most_common(1)[0][0] if versions else None,
        "status": next(iter(states.values())) if len(set(states.values())) == 1 else "mixed",
        "workers": {str(pid): state for pid, state in states.items()},
        "slots_total": sum(report.get("slots", 0) for report in reports.values()),
        "slots_busy": sum(report.get("busy", 0) for report in reports.values()),
        "queued": sum(report.get("queued", 0) for report in reports.values()),
        "tokens_per_second": round(activity.tokens_per_second, 2),
        "ttft_p50_seconds": _round(activity.ttft_percentile(0.5)),
        "ttft_p99_seconds": _round(activity.ttft_percentile(0.99)),
        "requests_with_first_token": len(activity.ttfts),
        "series": {
            "start": activity.first * BUCKET_SECONDS,
            "tokens_per_second": [round(tokens / BUCKET_SECONDS, 2) for tokens in activity.tokens],
            "queued": activity.queued,
        },
    }


@blueprint.get("/v1/status")
@documented(
    Operation("Every worker's models, load and recent activity, summed for the host (admin key)", errors=(403,))
)
def host_status() -> Response:
    state_dir = server_settings().state_dir
    statuses = worker_statuses(state_dir)
    reports: dict[str, dict[int, dict[str, Any]]] = {}
    for status in statuses:
        for name, report in status["models"].items():
            reports.setdefault(name, {})[status["pid"]] = report
    now = time.time()
    aliases = current_registry().aliases
    return jsonify(
        {
            "object": "status",
            "workers": len(statuses),
            "standby": Standby(state_dir).on,
            "bucket_seconds": BUCKET_SECONDS,
            "window_seconds": WINDOW_SECONDS,
            "rate_seconds": RATE_SECONDS,
            "models": [_model_view(name, by_worker, now) for name, by_worker in reports.items()],
            "aliases": [alias_view(name, alias) for name, alias in aliases.items()],
            "tenants": [
                {"id": name, "running": running, "queued": queued}
                for name, (running, queued) in sorted(tenant_loads(statuses).items())
            ],
        }
    )
