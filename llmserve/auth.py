"""Authentication: every request but the probes and ``/metrics`` gets a principal, or a 401.

With tenants configured, ``/metrics`` (and the engine details of ``/readyz``) show every tenant's traffic:
only the admin key or a client in ``metrics_networks`` may read them.

Keys are accepted as ``Authorization: Bearer KEY`` (what the OpenAI SDKs send) and as ``x-api-key``.
The hook runs before flask-limiter's, so the request quotas are counted against the tenant it found.
"""

from __future__ import annotations

from flask import Flask, request

from llmserve.errors import AuthenticationFailed, PermissionDenied, RateLimited
from llmserve.quotas import current_quotas
from llmserve.request_context import current_request
from llmserve.requestlog import PROBE_PATHS
from llmserve.tenancy import current_tenancy

METRICS_PATH = "/metrics"
OPENAPI_PATH = "/openapi.json"
CONSOLE_PATH = "/"
CONSOLE_ASSETS = "/console/"  # the console's scripts and styles, under one prefix
# Answered without a tenant key: the probes, the scrape (checked on its own below), the API's description
# and the console's page and assets (the console asks for a key and sends it with its API calls).
PUBLIC_PATHS = PROBE_PATHS | {OPENAPI_PATH, CONSOLE_PATH}


def presented_key() -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get("x-api-key") or None


def _masked(key: str) -> str:
    return f"{key[:8]}***{key[-4:]}" if len(key) > 16 else "***"


def may_observe() -> bool:
    """Whether this request may see the metrics and readiness details (see ``Tenancy.may_observe``)."""
    forwarded = "X-Forwarded-For" in request.headers or "Forwarded" in request.headers
    return current_tenancy().may_observe(request.remote_addr, forwarded, presented_key())


def authenticate() -> None:
    if request.path == METRICS_PATH and not may_observe():
        raise PermissionDenied(
            "The metrics show every tenant's traffic: they need the admin key, or a client address in metrics_networks."
        )
    if request.path in PUBLIC_PATHS or request.path.startswith(CONSOLE_ASSETS):
        return
    tenancy = current_tenancy()
    if tenancy.keyless is not None:
        current_request().principal = tenancy.keyless
        return
    key = presented_key()
    if key is None:
        raise AuthenticationFailed(
            "You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
            "(Authorization: Bearer YOUR_KEY) or in an x-api-key header.",
            code="missing_api_key",
        )
    principal = tenancy.principal_for(key)
    if principal is None:
        wait = current_quotas().authentication_failed()
        if wait is not None:
            raise RateLimited(
                "Too many requests with invalid API keys from this address; try again later.",
                kind="requests",
                retry_after=wait,
                code="too_many_failed_authentications",
            )
        raise AuthenticationFailed(f"Incorrect API key provided: {_masked(key)}.")
    current_request().principal = principal


def init_app(app: Flask) -> None:
    """Register the hook; call before the quotas' ``init_app`` so it runs first."""
    app.before_request(authenticate)
