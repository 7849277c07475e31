"""The client's address behind a balancer: X-Forwarded-For is believed only from trusted proxies."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve.proxies import PROXY_ADDR, TrustedProxies, client_address, networks
from llmserve.settings import Settings

TRUSTED = networks(["10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("10.0.0.5", "203.0.113.7", "203.0.113.7"),  # HAProxy's option forwardfor
        ("10.0.0.5", "6.6.6.6, 203.0.113.7", "203.0.113.7"),  # a client's own header, then the balancer's
        ("10.0.0.5", "203.0.113.7, 10.0.0.9", "203.0.113.7"),  # two balancers of ours
        ("10.0.0.5", "10.0.0.9", "10.0.0.5"),  # only our own hops: the peer
        ("10.0.0.5", None, "10.0.0.5"),
        ("198.51.100.1", "203.0.113.7", "198.51.100.1"),  # not a proxy of ours: the header is ignored
        ("::1", "2001:db8::1", "2001:db8::1"),
        ("::ffff:10.0.0.5", "203.0.113.7", "203.0.113.7"),  # an IPv4 peer on a dual-stack socket
        ("10.0.0.5", "not-an-address", "not-an-address"),
    ],
)
def test_the_client_is_the_right_most_address_no_proxy_of_ours_wrote(
    peer: str, forwarded_for: str | None, client: str
) -> None:
    assert client_address(peer, forwarded_for, TRUSTED) == client


def call(**environ: Any) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def app(env: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(env)
        return []

    TrustedProxies(app, TRUSTED)({"wsgi.url_scheme": "http", **environ}, lambda *args: None)
    return seen


def test_the_middleware_rewrites_only_what_a_trusted_proxy_sent() -> None:
    proxied = call(REMOTE_ADDR="10.0.0.5", HTTP_X_FORWARDED_FOR="203.0.113.7", HTTP_X_FORWARDED_PROTO="https")
    assert (proxied["REMOTE_ADDR"], proxied[PROXY_ADDR], proxied["wsgi.url_scheme"]) == (
        "203.0.113.7",
        "10.0.0.5",
        "https",
    )
    direct = call(REMOTE_ADDR="198.51.100.1", HTTP_X_FORWARDED_FOR="203.0.113.7", HTTP_X_FORWARDED_PROTO="https")
    assert (direct["REMOTE_ADDR"], PROXY_ADDR in direct, direct["wsgi.url_scheme"]) == ("198.51.100.1", False, "http")


def test_a_bad_network_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        Settings(trusted_proxies=["10.0.0.0/33"])
