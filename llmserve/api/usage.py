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
from typing import Any

import gevent
from flask import Blueprint, Response, jsonify, request

from llmserve.errors import InvalidRequest, NotFound, PermissionDenied
from llmserve.ledger.report import format_moment, parse_moment
from llmserve.ledger.store import SUMS
from llmserve.service import current_service
from llmserve.tenancy import current_principal

blueprint = Blueprint("usage", __name__)

PARAMETERS = ("start", "end", "model", "tenant", "group_by")
GROUPINGS = ("day", "hour")


def _argument(name: str) -> str | None:
    return request.args.get(name) or None


def _moment(name: str) -> datetime | None:
    raw = _argument(name)
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
def usage() -> Response:
    unknown = sorted(set(request.args) - set(PARAMETERS))
    if unknown:
        raise InvalidRequest(f"Unrecognized query parameter: {unknown[0]}", param=unknown[0])
    since, until = _moment("start"), _moment("end")
    if since is not None and until is not None and since >= until:
        raise InvalidRequest("start must be before end.", param="start")
    group_by = _argument("group_by") or "day"
    if group_by not in GROUPINGS:
        raise InvalidRequest(f"Invalid value for 'group_by': expected day or hour, got {group_by!r}.", param="group_by")
    tenant = _visible_tenant(_argument("tenant"))
    ledger = current_service().accounting.ledger
    if ledger is None:
        raise NotFound("This server keeps no usage ledger (ledger.enabled is off).")
    query = {"tenant": tenant, "model": _argument("model"), "since": since, "until": until, "group_by": group_by}
    # SQLite and PostgreSQL calls block in C: run them on a native thread, never on the hub.
    rows = gevent.get_hub().threadpool.apply(ledger.query, kwds=query)
    return jsonify({"object": "list", "data": [_view(row) for row in rows]})
