"""Per-tenant quotas and the failed-authentication limit, counted by flask-limiter.

- Requests per minute: a flask-limiter shared limit on the generation and embedding endpoints, keyed by
  tenant.
- Tokens per minute: a request reserves its prompt tokens plus its ``max_tokens`` before it is queued, and
  the unused part is given back once its response is complete (streams included). Counting uses the
  fixed-window strategy, the one whose storage records a charge larger than what remains, and which
  accepts a refund as a negative charge.
- Failed API-key attempts per client address: past the limit, an unknown key gets 429 instead of 401.
  A valid key is never refused by it, so one misbehaving client cannot lock out its neighbours behind the
  same address.

Storage is ``memory://`` (per worker process) or ``redis://`` (one count for all workers and replicas).
Responses carry OpenAI's ``x-ratelimit-*`` headers for whichever quotas the tenant has.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from limits import RateLimitItem, RateLimitItemPerMinute

from llmserve.errors import RateLimited, respond_with
from llmserve.request_context import current_request
from llmserve.settings import Settings
from llmserve.tenancy import Tenant, current_principal

log = logging.getLogger(__name__)

EXTENSION = "llmserve.quotas"
KEY_PREFIX = "llmserve"
# Redis reports a window's end as its remaining TTL in whole seconds; ends this close are the same window.
SAME_WINDOW_TOLERANCE = 2.0


def _tenant_key() -> str:
    tenant = current_principal().tenant
    return tenant.name if tenant is not None else "-admin-"


def _requests_per_minute() -> str:
    tenant = current_principal().tenant
    limit = tenant.limits.requests_per_minute if tenant is not None else None
    return f"{limit or 1}/minute"


def _no_request_quota() -> bool:
    tenant = current_principal().tenant
    return tenant is None or tenant.limits.requests_per_minute is None


@dataclass(frozen=True)
class TokenReservation:
    """Tokens set aside for one request, in the window that was current when they were."""

    tenant: str
    item: RateLimitItem
    amount: int
    window_reset: float


def _seconds_until(reset_at: float) -> float:
    return max(1.0, reset_at - time.time())


class Quotas:
    def __init__(self, settings: Settings) -> None:
        # A Redis that does not answer costs a request at most this long per quota call, then fails open;
        # without it a black-holed Redis would hang every metered request.
        timeouts: dict[str, Any] = {
            "socket_connect_timeout": settings.rate_limit_timeout,
            "socket_timeout": settings.rate_limit_timeout,
        }
        self.limiter = Limiter(
            key_func=_tenant_key,
            storage_uri=settings.rate_limit_storage,
            strategy="fixed-window",
            key_prefix=KEY_PREFIX,
            headers_enabled=False,  # ours below follow OpenAI's names, for tokens too
            in_memory_fallback_enabled=True,
            storage_options=timeouts if settings.rate_limit_storage.startswith("redis") else {},
        )
        self._auth_failures = RateLimitItemPerMinute(settings.auth_failures_per_minute)
        self.requests = self.limiter.shared_limit(_requests_per_minute, scope="requests", exempt_when=_no_request_quota)

    def init_app(self, app: Flask) -> None:
        self.limiter.init_app(app)
        app.extensions[EXTENSION] = self

        @app.errorhandler(RateLimitExceeded)
        def _requests_exhausted(error: RateLimitExceeded) -> Response:
            current = self.limiter.current_limit
            reset_at = current.reset_at if current is not None else time.time() + 60
            return respond_with(
                RateLimited(
                    f"Rate limit reached for requests per minute: limit {error.limit.limit.amount}. "
                    f"Please try again in {math.ceil(_seconds_until(reset_at))}s.",
                    kind="requests",
                    retry_after=_seconds_until(reset_at),
                )
            )

        @app.after_request
        def _headers(response: Response) -> Response:
            principal = current_request().principal
            if principal is not None and principal.tenant is not None:
                response.headers.extend(self._headers_for(principal.tenant))
            return response

    @contextmanager
    def _storage_outage_allowed(self, what: str) -> Iterator[None]:
        """Quotas fail open: while their storage (Redis) is unreachable, requests are served uncounted."""
        try:
            yield
        except self.limiter.storage.base_exceptions as exc:
            log.warning("quota storage unavailable, %s skipped: %s", what, exc)

    def _headers_for(self, tenant: Tenant) -> dict[str, str]:
        headers: dict[str, str] = {}
        current = self.limiter.current_limit
        if current is not None and tenant.limits.requests_per_minute is not None:
            headers["x-ratelimit-limit-requests"] = str(current.limit.amount)
            headers["x-ratelimit-remaining-requests"] = str(current.remaining)
            headers["x-ratelimit-reset-requests"] = f"{math.ceil(_seconds_until(current.reset_at))}s"
        if tenant.limits.tokens_per_minute is not None:
            item = RateLimitItemPerMinute(tenant.limits.tokens_per_minute)
            with self._storage_outage_allowed("token headers"):
                stats = self.limiter.limiter.get_window_stats(item, *_token_key(tenant.name))
                headers["x-ratelimit-limit-tokens"] = str(item.amount)
                headers["x-ratelimit-remaining-tokens"] = str(stats.remaining)
                headers["x-ratelimit-reset-tokens"] = f"{math.ceil(_seconds_until(stats.reset_time))}s"
        return headers

    def reserve_tokens(self, tenant: Tenant, wanted: int, needed: int) -> TokenReservation | None:
        """Set aside tokens of the tenant's per-minute quota before the request is queued, or raise a 429
        saying when they will be there. None when the tenant has no token quota.

        ``wanted`` is the prompt plus every choice's ``max_tokens``; ``needed`` the least the request can
        run with (its prompt plus one token per choice). A request may want more than a whole minute's
        quota (``max_tokens`` left to default to the context); it then reserves the whole quota and pays
        the rest when it settles. Only one that needs more can never run, and gets no Retry-After.
        """
        limit = tenant.limits.tokens_per_minute
        if limit is None:
            return None
        if needed > limit:
            raise RateLimited(
                f"Request too large for tokens per minute: limit {limit}, the prompt alone needs {needed}. "
                "Reduce the prompt.",
                kind="tokens",
                retry_after=None,
            )
        amount = min(wanted, limit)
        item = RateLimitItemPerMinute(limit)
        strategy = self.limiter.limiter
        identifiers = _token_key(tenant.name)
        with self._storage_outage_allowed("token reservation"):
            # test first, so that a refused request never shows as spent to other workers even briefly
            if not (strategy.test(item, *identifiers, cost=amount) and strategy.hit(item, *identifiers, cost=amount)):
                stats = strategy.get_window_stats(item, *identifiers)
                raise RateLimited(
                    f"Rate limit reached for tokens per minute: limit {limit}, remaining {stats.remaining}, "
                    f"requested {amount}. Please try again in {math.ceil(_seconds_until(stats.reset_time))}s.",
                    kind="tokens",
                    retry_after=_seconds_until(stats.reset_time),
                )
            reset_time = strategy.get_window_stats(item, *identifiers).reset_time
            return TokenReservation(tenant.name, item, amount, reset_time)
        return None

    def settle(self, reservation: TokenReservation | None, used: int) -> None:
        """Charge what the request really used: give back what it did not use, or charge what it used
        beyond its reservation. A refund only goes into the window it was reserved in, and never more
        than that window has counted: anything else would be credit the tenant never paid for."""
        if reservation is None or used == reservation.amount:
            return
        strategy = self.limiter.limiter
        identifiers = _token_key(reservation.tenant)
        with self._storage_outage_allowed("token settlement"):
            if used > reservation.amount:
                strategy.hit(reservation.item, *identifiers, cost=used - reservation.amount)
                return
            stats = strategy.get_window_stats(reservation.item, *identifiers)
            same_window = (
                reservation.window_reset > time.time()
                and abs(stats.reset_time - reservation.window_reset) < SAME_WINDOW_TOLERANCE
            )
            counted = reservation.item.amount - stats.remaining
            refund = min(reservation.amount - used, counted) if same_window else 0
            if refund > 0:
                strategy.hit(reservation.item, *identifiers, cost=-refund)

    def remaining(self, tenant: Tenant) -> dict[str, object]:
        """What is left of the tenant's quotas in their current windows (for the tenant views)."""
        result: dict[str, object] = {}
        strategy = self.limiter.limiter
        for kind, limit, identifiers in (
            ("requests", tenant.limits.requests_per_minute, (KEY_PREFIX, tenant.name, "requests")),
            ("tokens", tenant.limits.tokens_per_minute, _token_key(tenant.name)),
        ):
            if limit is not None:
                with self._storage_outage_allowed("quota view"):
                    stats = strategy.get_window_stats(RateLimitItemPerMinute(limit), *identifiers)
                    result[kind] = {
                        "limit_per_minute": limit,
                        "remaining": stats.remaining,
                        "reset_seconds": math.ceil(_seconds_until(stats.reset_time)),
                    }
        return result

    def authentication_failed(self) -> float | None:
        """Count a failed key from this client address; seconds to wait when it has failed too often."""
        address = request.remote_addr or "unknown"
        strategy = self.limiter.limiter
        with self._storage_outage_allowed("failed-key count"):
            if not strategy.hit(self._auth_failures, KEY_PREFIX, "auth-failures", address):
                stats = strategy.get_window_stats(self._auth_failures, KEY_PREFIX, "auth-failures", address)
                return _seconds_until(stats.reset_time)
        return None


def _token_key(tenant: str) -> tuple[str, ...]:
    return (KEY_PREFIX, "tokens", tenant)


def current_quotas() -> Quotas:
    quotas: Quotas = current_app.extensions[EXTENSION]
    return quotas
