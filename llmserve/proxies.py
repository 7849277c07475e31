"""The client's address behind a balancer: ``X-Forwarded-For``, believed only from ``trusted_proxies``.

Behind HAProxy or nginx every request comes from the balancer's address, so the per-address limit on
failed keys and the request log would count the balancer. The balancers append the address they saw to
``X-Forwarded-For``; a client may write anything before it. So, for a request whose peer is a trusted
proxy, the client is the right-most address of the header that is not itself a trusted proxy, and the
WSGI ``REMOTE_ADDR`` becomes that address (the proxy's stays in ``PROXY_ADDR``). From any other peer the
header is ignored: a client cannot choose its own address. ``X-Forwarded-Proto`` from a trusted proxy
sets the URL scheme (TLS ends at the balancer). Werkzeug's ``ProxyFix`` trusts a number of hops from
any peer instead, which lets a client that reaches the port directly pick its address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
PROXY_ADDR = "llmserve.proxy_addr"


def networks(addresses: Iterable[str]) -> tuple[Network, ...]:
    """Addresses and CIDR networks as networks; a ``ValueError`` names a bad one."""
    return tuple(ipaddress.ip_network(address, strict=False) for address in addresses)


def _within(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        parsed = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    mapped = getattr(parsed, "ipv4_mapped", None)
    return any((mapped or parsed) in network for network in trusted)


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """Who sent a request that ``peer`` delivered with ``forwarded_for``."""
    if not forwarded_for or not _within(peer, trusted):
        return peer
    for hop in reversed([hop.strip() for hop in forwarded_for.split(",") if hop.strip()]):
        if not _within(hop, trusted):
            return hop
    return peer  # every hop was a proxy of ours


class TrustedProxies:
    """WSGI middleware that puts the client's address in ``REMOTE_ADDR``."""

    def __init__(self, app: WSGIApp, trusted: tuple[Network, ...]) -> None:
        self._app = app
        self._trusted = trusted

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        peer = environ.get("REMOTE_ADDR", "")
        if _within(peer, self._trusted):
            environ[PROXY_ADDR] = peer
            environ["REMOTE_ADDR"] = client_address(peer, environ.get("HTTP_X_FORWARDED_FOR"), self._trusted)
            scheme = environ.get("HTTP_X_FORWARDED_PROTO", "").strip().lower()
            if scheme in ("http", "https"):
                environ["wsgi.url_scheme"] = scheme
        return self._app(environ, start_response)
