"""GET /v1/usage: usage and cost from the ledger, summed per period, tenant and model.

A tenant's key sees its own tenant's usage only; the admin key (and every caller of a server without
tenants) sees all tenants and may pick one. Workers buffer records for up to ``ledger.flush_interval``
seconds before writing them, so the newest requests may be missing for that long.

Query parameters: ``start`` and ``end`` (ISO 8601 or unix seconds; records that started in
[start, end)), ``model``, ``tenant`` (admin only) and ``group_by`` (``day``, the default, or ``hour``;
UTC).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from flask import Blueprint, Response, jsonify, request
from pydantic import Field, ValidationError

from llmserve.accounting import current_accounting
from llmserve.api.openapi import Operation, documented
from llmserve.api.schemas import StrictModel
from llmserve.errors import InvalidRequest, NotFound, PermissionDenied, from_validation_error
from llmserve.ledger.report import format_moment, parse_moment
from llmserve.ledger.store import SUMS
from llmserve.models.served import off_hub
from llmserve.tenancy import current_principal

blueprint = Blueprint("usage", __name__)


class UsageQuery(StrictModel):
    """The query parameters (of one given twice, the first)."""

    start: str | None = Field(None, description="ISO 8601 time or unix seconds: records that started at or after it.")
    end: str | None = Field(None, description="ISO 8601 time or unix seconds: records that started before it.")
    model: str | None = None
    tenant: str | None = Field(None, description="One tenant's usage (admin key only).")
    group_by: Literal["day", "hour"] = Field("day", description="Period of each row, in UTC.")


def _moment(query: UsageQuery, name: str) -> datetime | None:
    raw = getattr(query, name)
    if raw is None:
        return None
    try:
        return parse_moment(raw)
    except ValueError:
        raise InvalidRequest(
            f"Invalid value for '{name}': expected an ISO 8601 time or unix seconds, got {raw!r}.", param=name
        ) from None


def _visible_tenant(asked: str | None) -> str | None:
    """The tenant whose usage the caller may read: its own, or for the admin the one asked for (None: all)."""
    principal = current_principal()
    if principal.admin:
        return asked
    assert principal.tenant is not None  # only the admin has no tenant
    own = principal.tenant.name
    if asked is not None and asked != own:
        raise PermissionDenied("Your key may read its own tenant's usage only.")
    return own


def _view(row: dict[str, Any]) -> dict[str, Any]:
    view: dict[str, Any] = {"period": format_moment(row["period"])} if "period" in row else {}
    return view | {"tenant": row["tenant"], "model": row["model"]} | {name: row[name] for name in SUMS}


@blueprint.get("/v1/usage")
@documented(Operation("Usage and cost from the ledger", query=UsageQuery, errors=(400, 403, 404)))
def usage() -> Response:
    try:
        query = UsageQuery.model_validate(dict(request.args.items()))
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    since, until = _moment(query, "start"), _moment(query, "end")
    if since is not None and until is not None and since >= until:
        raise InvalidRequest("start must be before end.", param="start")
    tenant = _visible_tenant(query.tenant)
    ledger = current_accounting().ledger
    if ledger is None:
        raise NotFound("This server keeps no usage ledger (ledger.enabled is off).")
    rows = off_hub(  # SQLite and PostgreSQL calls block in C: on a native thread, never on the hub
        lambda: ledger.query(tenant=tenant, model=query.model, since=since, until=until, group_by=query.group_by)
    )
    return jsonify({"object": "list", "data": [_view(row) for row in rows]})
