"""HAProxy's agent check: the instance's load and state, in the agent protocol, on ``agent_port``.

HAProxy connects every ``agent-inter`` and reads one line of words. The reply is built from what every
worker reports beside the model state file (``models.state.WorkerStatus``: each model's state, slots,
busy slots and queue) and from the master's own state (draining since the first SIGTERM):

============================  =============================================  =========================
instance                      reply                                          HAProxy does
============================  =============================================  =========================
serving                       ``up ready <weight>% maxconn:<slots>``         balances on the weight,
                                                                             queues past ``slots``
draining (SIGTERM), in        ``up drain``                                   no new requests, running
standby, or no worker has a                                                  ones finish
warm model yet
no model can serve (every     ``down #<why>``                                marks the server down
model failed to load)
============================  =============================================  =========================

A backend that balances by a hash (session affinity) sends ``agent-send "state\n"``: its reply then
leaves the weight out (``up ready maxconn:<slots>``), because a weight that follows the load would move
sessions between instances with every change and lose their cached prefixes. A check that sends nothing
within ``REQUEST_WAIT`` seconds gets the full reply.

``slots`` is the sum of every worker's generation slots over the models that serve, so HAProxy never
sends more requests than can run at once and keeps the rest in its own queue, for the first replica that
frees a slot (late binding). The weight falls as slots fill and requests queue:
``100 * (free slots + 1) / (slots + 1 + queued)``, between 1 and 100 percent (0 would mean drain).
Every reply says ``ready`` or ``drain`` and ``up`` or ``down``, because only the agent can undo what it
set: a restarted instance must lift the drain its predecessor asked for.

The listener runs in gunicorn's master (a thread; workers come and go, the master stays), and each
worker closes its inherited copy of the socket after fork.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from llmserve.models.state import worker_statuses
from llmserve.standby import Standby

log = logging.getLogger(__name__)

REQUEST_WAIT = 0.2  # seconds a check may take to send its agent-send line


class InstanceState(StrEnum):
    SERVING = "serving"
    LOADING = "loading"
    DRAINING = "draining"
    STANDBY = "standby"
    FAILED = "failed"


@dataclass(frozen=True)
class InstanceLoad:
    state: InstanceState
    slots: int = 0
    busy: int = 0
    queued: int = 0
    reason: str = ""


def instance_load(statuses: Iterable[dict[str, Any]], *, draining: bool, standby: bool = False) -> InstanceLoad:
    """The instance's load from its workers' status reports (``registry.status``); a warm instance in
    standby takes no traffic, as a draining one."""
    if draining:
        return InstanceLoad(InstanceState.DRAINING)
    slots = busy = queued = 0
    loading = failed = False
    for status in statuses:
        for model in status.get("models", {}).values():
            state = model.get("status")
            if state == "ready":
                slots += model.get("slots", 0)
                busy += model.get("busy", 0)
                queued += model.get("queued", 0)
            elif state in ("starting", "loading"):
                loading = True
            elif state == "failed":
                failed = True
    if slots:
        return InstanceLoad(InstanceState.STANDBY if standby else InstanceState.SERVING, slots, busy, queued)
    if failed and not loading:
        return InstanceLoad(InstanceState.FAILED, reason="no model could be loaded")
    return InstanceLoad(InstanceState.LOADING)


def weight_percent(load: InstanceLoad) -> int:
    free = max(0, load.slots - load.busy)
    return max(1, min(100, round(100 * (free + 1) / (load.slots + 1 + load.queued))))


def agent_reply(load: InstanceLoad, *, weight: bool = True) -> str:
    """One line of HAProxy's agent protocol for ``load``; without ``weight`` for hash-balanced backends."""
    if load.state is InstanceState.SERVING:
        share = f" {weight_percent(load)}%" if weight else ""
        return f"up ready{share} maxconn:{load.slots}\n"
    if load.state is InstanceState.FAILED:
        return f"down #{load.reason}\n"
    return "up drain\n"


def _asks_for_weight(connection: socket.socket) -> bool:
    """False when the check sent ``state`` (``agent-send``), True when it sent anything else or nothing."""
    if not select.select([connection], [], [], REQUEST_WAIT)[0]:
        return True
    return connection.recv(64).strip().lower() != b"state"


class _Listener(socketserver.ThreadingTCPServer):
    allow_reuse_address = True  # a restarted instance binds again at once
    daemon_threads = True  # a check that never reads its reply does not hold up the others


class AgentServer:
    """The TCP listener answering HAProxy's agent checks, on a daemon thread."""

    def __init__(self, host: str, port: int, state_dir: Path) -> None:
        self.draining = False
        self._state_dir = state_dir
        self._standby = Standby(state_dir)
        reply: Callable[[bool], str] = self.reply

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):  # the checker went away; it will ask again
                    self.request.sendall(reply(_asks_for_weight(self.request)).encode())

        self._server = _Listener((host, port), Handler)
        self.address = self._server.server_address

    def reply(self, weight: bool = True) -> str:
        load = instance_load(worker_statuses(self._state_dir), draining=self.draining, standby=self._standby.on)
        return agent_reply(load, weight=weight)

    def start(self) -> None:
        threading.Thread(target=self._server.serve_forever, name="llmserve-agent", daemon=True).start()
        log.info("agent check listening on %s:%d", *self.address[:2])

    def close_inherited(self) -> None:
        """In a forked worker: close the copy of the listening socket (the master keeps answering)."""
        self._server.socket.close()


_running: AgentServer | None = None  # this process's: gunicorn re-reads its config file on every reload


def start_agent(host: str, port: int, state_dir: Path) -> AgentServer:
    """Start this process's agent listener, once: a reload keeps the running one."""
    global _running
    if _running is None:
        _running = AgentServer(host, port, state_dir)
        _running.start()
    return _running


def running_agent() -> AgentServer | None:
    return _running
