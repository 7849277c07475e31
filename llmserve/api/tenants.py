"""GET /v1/tenants/me (a tenant's own limits and usage) and GET /v1/tenants (all of them, admin only).

Running and queued counts are this worker's engines, summed over its models; quota counts are shared
when quotas live in Redis.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from llmserve.api.openapi import Operation, documented
from llmserve.models.registry import current_registry
from llmserve.quotas import current_quotas
from llmserve.tenancy import Tenant, current_tenancy, current_tenant, require_admin

blueprint = Blueprint("tenants", __name__)


def _view(tenant: Tenant) -> dict[str, Any]:
    loads = [model.engine.stats().tenants.get(tenant.name) for model in current_registry().models.values()]
    return {
        "object": "tenant",
        "id": tenant.name,
        **tenant.limits.model_dump(mode="json"),
        "running": sum(load.running for load in loads if load),
        "queued": sum(load.queued for load in loads if load),
        "quota_remaining": current_quotas().remaining(tenant),
    }


@blueprint.get("/v1/tenants/me")
@documented(Operation("This key's tenant: its limits, load and quota left"))
def my_tenant() -> Response:
    return jsonify(_view(current_tenant()))


@blueprint.get("/v1/tenants")
@documented(Operation("Every tenant (admin key)", errors=(403,)))
def list_tenants() -> Response:
    require_admin()
    return jsonify({"object": "list", "data": [_view(tenant) for tenant in current_tenancy().tenants.values()]})
