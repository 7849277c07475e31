"""Which model answers a request that names an alias: a stable hash of the tenant and the session.

A session is the request's ``user`` field or its ``X-Session-Id`` header; the same tenant and session
always land in the same one of 10,000 buckets, so a conversation stays on one version while the canary's
weight holds, and raising the weight only moves sessions from stable to canary (never back and forth).
A request without a session key is its own session: it is routed by a fresh random key.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

from llmserve.settings import AliasSettings

BUCKETS = 10_000


class Role(StrEnum):
    STABLE = "stable"
    CANARY = "canary"


@dataclass(frozen=True)
class Route:
    """The model chosen for a request, and, when that is an alias's canary, the stable model a failure
    before the response started is retried on once."""

    model: str
    alias: str | None = None
    role: Role | None = None
    fallback: str | None = None


def bucket(tenant: str, session: str) -> int:
    digest = hashlib.sha256(f"{tenant}\0{session}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def route(name: str, alias: AliasSettings | None, tenant: str, session: str | None) -> Route:
    """Where a request for ``name`` goes: the model itself, or the alias's stable or canary model."""
    if alias is None:
        return Route(name)
    canary_share = alias.canary_weight / 100 * BUCKETS if alias.canary else 0
    if bucket(tenant, session or secrets.token_hex(8)) < canary_share:
        assert alias.canary is not None
        return Route(alias.canary, name, Role.CANARY, fallback=alias.stable)
    return Route(alias.stable, name, Role.STABLE)
