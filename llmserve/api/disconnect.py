"""Noticing that a client went away while nothing is being written to it.

A streaming response learns of a disconnect when a write fails, but a request still waiting for a slot,
or a non-streaming one, writes nothing until the end. For those the connection is polled without
blocking for the peer's close (POLLRDHUP: HTTP clients never half-close, so a FIN means gone). The
unpatched ``select.poll`` is used: gevent's would yield to the hub. Outside gunicorn there is no
socket, and the client is taken to be present.
"""

from __future__ import annotations

import select
from typing import Any

from gevent import monkey

_poll = monkey.get_original("select", "poll")
_CLOSED = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL


class ClientWatch:
    def __init__(self, environ: dict[str, Any]) -> None:
        connection = environ.get("gunicorn.socket")
        self._fileno = connection.fileno() if connection is not None else -1

    def gone(self) -> bool:
        if self._fileno < 0:
            return False
        poller = _poll()
        poller.register(self._fileno, select.POLLRDHUP)
        return any(events & _CLOSED for _, events in poller.poll(0))
