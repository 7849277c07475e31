"""Tenants and who is calling: the configured tenants, their API keys, and the principal of a request.

With no tenants configured the server is single-tenant: every request belongs to the ``default`` tenant
and needs no key (settings allow that only on loopback, or when told a proxy authenticates). With tenants
configured every request except the probes and ``/metrics`` needs a key; an admin key manages the server
and cannot generate.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from flask import Flask, current_app

from llmserve.errors import PermissionDenied
from llmserve.keys import FileKeyStore, KeyStore
from llmserve.ledger.keys import LedgerKeyStore
from llmserve.request_context import current_request
from llmserve.settings import Settings, TenantSettings
from scheduler import TenantShare

EXTENSION = "llmserve.tenancy"
DEFAULT_TENANT = "default"
PRIORITY_CLASSES = {"interactive": 0, "batch": 1}


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantSettings

    def share(self) -> TenantShare:
        """What the scheduler needs to know about this tenant."""
        return TenantShare(
            weight=self.limits.weight,
            priority=PRIORITY_CLASSES[self.limits.priority],
            max_running=self.limits.max_running,
            max_queued=self.limits.max_queued,
        )

    def may_use(self, model_id: str) -> bool:
        return not self.limits.models or model_id in self.limits.models


@dataclass(frozen=True)
class Principal:
    """Who sent the request: a tenant (through one of its keys, or implicitly), or the administrator."""

    tenant: Tenant | None
    key_id: str | None = None

    anonymous: bool = False

    @property
    def admin(self) -> bool:
        return self.tenant is None or self.anonymous


def open_key_store(settings: Settings) -> KeyStore:
    """The key store the settings name: the state directory's file, or the ledger's database."""
    if settings.key_store == "ledger":
        return LedgerKeyStore(settings.ledger.resolved_url(settings.state_dir), settings.key_refresh_interval)
    return FileKeyStore(settings.state_dir)


class Tenancy:
    def __init__(self, settings: Settings) -> None:
        configured = settings.tenants or {DEFAULT_TENANT: TenantSettings()}
        self.tenants = {name: Tenant(name, limits) for name, limits in configured.items()}
        self.keys = open_key_store(settings)
        # Without tenants every caller is the default tenant, and may also use the admin endpoints.
        self.keyless = Principal(self.tenants[DEFAULT_TENANT], anonymous=True) if not settings.multi_tenant else None
        self.observer_networks = tuple(ipaddress.ip_network(network) for network in settings.metrics_networks)

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION] = self

    def start(self) -> None:
        """In a worker: keep a shared key store's snapshot fresh."""
        if isinstance(self.keys, LedgerKeyStore):
            self.keys.follow()

    def shares(self) -> dict[str, TenantShare]:
        return {name: tenant.share() for name, tenant in self.tenants.items()}

    def principal_for(self, presented: str) -> Principal | None:
        """The principal owning key ``presented``; None for an unknown or revoked key, or a key whose
        tenant is no longer configured."""
        record = self.keys.authenticate(presented)
        if record is None:
            return None
        if record.admin:
            return Principal(None, record.id)
        tenant = self.tenants.get(record.tenant or "")
        return Principal(tenant, record.id) if tenant is not None else None

    def may_observe(self, address: str | None, forwarded: bool, presented: str | None) -> bool:
        """Whether a caller may read the metrics and readiness details (tenant names, their load and
        costs): anyone without tenants; with tenants, the admin key, or a direct (not proxied) client in
        ``metrics_networks``."""
        if self.keyless is not None:
            return True
        if address and not forwarded and any(_address_in(address, network) for network in self.observer_networks):
            return True
        principal = self.principal_for(presented) if presented else None
        return principal is not None and principal.admin


def _address_in(address: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:  # not an IP address (a Unix socket's peer)
        return False


def current_tenancy() -> Tenancy:
    tenancy: Tenancy = current_app.extensions[EXTENSION]
    return tenancy


def current_principal() -> Principal:
    """The request's principal, set by the authentication hook before any endpoint runs."""
    principal = current_request().principal
    assert principal is not None, "authentication runs before every view"
    return principal


def current_tenant() -> Tenant:
    """The tenant that model work is done for; admin keys manage the server and do not generate."""
    tenant = current_principal().tenant
    if tenant is None:
        raise PermissionDenied("Admin keys cannot use the model; use a tenant's key.")
    return tenant


def require_tenant() -> None:
    current_tenant()


def require_admin() -> None:
    if not current_principal().admin:
        raise PermissionDenied("This endpoint needs the admin key.")
