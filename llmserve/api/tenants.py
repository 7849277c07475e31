"""GET /v1/tenants/me (a tenant's own limits and usage) and GET /v1/tenants (all of them, admin only).

Running and queued counts are summed over every worker's models on this host, from the status files the
workers write about once a second; quota counts are shared when quotas live in Redis.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from llmserve.api.openapi import Operation, documented
from llmserve.api.request import server_settings
from llmserve.models.state import tenant_loads, worker_statuses
from llmserve.quotas import current_quotas
from llmserve.tenancy import Tenant, current_tenancy, current_tenant, require_admin

blueprint = Blueprint("tenants", __name__)


def _view(tenant: Tenant, loads: dict[str, tuple[int, int]]) -> dict[str, Any]:
    running, queued = loads.get(tenant.name, (0, 0))
    return {
        "object": "tenant",
        "id": tenant.name,
        **tenant.limits.model_dump(mode="json"),
        "running": running,
        "queued": queued,
        "quota_remaining": current_quotas().remaining(tenant),
    }


def _host_loads() -> dict[str, tuple[int, int]]:
    return tenant_loads(worker_statuses(server_settings().state_dir))


@blueprint.get("/v1/tenants/me")
@documented(Operation("This key's tenant: its limits, load and quota left"))
def my_tenant() -> Response:
    return jsonify(_view(current_tenant(), _host_loads()))


@blueprint.get("/v1/tenants")
@documented(Operation("Every tenant (admin key)", errors=(403,)))
def list_tenants() -> Response:
    require_admin()
    loads = _host_loads()
    return jsonify({"object": "list", "data": [_view(tenant, loads) for tenant in current_tenancy().tenants.values()]})
