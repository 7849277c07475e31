"""Process lifecycle under gunicorn and systemd: honest readiness, graceful drain, a fast second stop.

Readiness. gunicorn's master tells systemd ``READY=1`` right after binding, long before any worker has
loaded the model. ``gunicorn.conf.py`` therefore moves ``NOTIFY_SOCKET`` out of gunicorn's sight (into
``LLMSERVE_NOTIFY_SOCKET``), and a worker says ``READY=1`` itself once its model is loaded and warm
(the unit sets ``NotifyAccess=all``). The master says ``RELOADING=1`` on SIGHUP and ``STOPPING=1`` on
SIGTERM. A SIGHUP whose settings do not load is refused and the old workers serve on. A worker that
joins while others serve (a reload, a replacement for a dead worker) does not
accept connections until its model is warm: connections wait in the listen backlog rather than meet a
worker that can only answer 503.

Drain. On SIGTERM a worker stops accepting connections (gunicorn), its readiness turns 503, queued
requests are refused with 503 and ``Retry-After``, and running generations continue until the drain
deadline, ``graceful_timeout`` minus a margin; then each gets a final error (an SSE error event, or a
503) instead of a silent cut, before gunicorn's own deadline would kill the worker. A second SIGTERM, or
a SIGINT, stops at once.

Behind a balancer (``agent_port`` set), the first SIGTERM first turns the agent's reply to ``drain`` and
keeps the listeners open for ``drain_notice`` seconds, so that the balancers stop sending before the
port closes; then the drain above begins.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

import gevent
from flask import Flask, Response

from llmserve.request_context import current_request

if TYPE_CHECKING:
    from llmserve.agent import AgentServer
    from llmserve.models.registry import ModelRegistry

log = logging.getLogger(__name__)

NOTIFY_ENV = "LLMSERVE_NOTIFY_SOCKET"
# Time kept between the drain deadline and gunicorn's graceful_timeout, for final events and exit.
DRAIN_MARGIN = 2.0
READY_POLL = 0.2
DRAIN_POLL = 0.1
IN_FLIGHT = "llmserve.in_flight"


def hide_notify_socket() -> None:
    """Keep gunicorn from reporting readiness itself; only this module speaks to systemd."""
    address = os.environ.pop("NOTIFY_SOCKET", None)
    if address:
        os.environ[NOTIFY_ENV] = address


def notify(*states: str) -> bool:
    """Send ``states`` to systemd's notification socket; False when not run as a notify unit."""
    address = os.environ.get(NOTIFY_ENV)
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", ", ".join(states), exc)
        return False
    return True


def drain_deadline(graceful_timeout: float) -> float:
    """The monotonic time by which running generations must have ended."""
    return time.monotonic() + max(0.0, graceful_timeout - DRAIN_MARGIN)


def wait_until_ready(models: ModelRegistry, worker: Any) -> None:
    """Wait for this worker's models to load, keeping gunicorn's heartbeat, then tell systemd it is ready."""
    while worker.alive and models.loading:
        worker.notify()
        gevent.sleep(READY_POLL)
    if models.ready:
        serving = ", ".join(model.id for model in models.models.values() if model.ready)
        notify("READY=1", f"STATUS=serving {serving}")


class InFlight:
    """Requests whose response has not been completely sent yet.

    A streamed response counts until the server has written its last byte (``call_on_close``), so a
    draining worker can leave as soon as the count reaches zero instead of waiting for idle keep-alive
    connections until gunicorn's deadline.
    """

    def __init__(self) -> None:
        self.count = 0
        self.exiting = False  # the worker is in its exit hook: nothing may end it early any more

    def init_app(self, app: Flask) -> None:
        app.extensions[IN_FLIGHT] = self

        @app.before_request
        def _begin() -> None:
            self.count += 1
            current_request().in_flight = True

        @app.after_request
        def _end_when_sent(response: Response) -> Response:
            if _leaves_flight():
                response.call_on_close(self._done)
            return response

        @app.teardown_request
        def _end_without_response(error: BaseException | None) -> None:
            if _leaves_flight():  # no response was made (an error escaped every handler)
                self._done()

    def keep(self) -> Callable[[], None]:
        """Count work that outlives its response (a resumable stream's generation after its client left)
        until the returned release is called, so that a drain waits for it too."""
        self.count += 1
        return self._done

    def _done(self) -> None:
        self.count -= 1


def _leaves_flight() -> bool:
    """True once per counted request: the first of its response or its teardown takes it off the count."""
    context = current_request()
    counted, context.in_flight = context.in_flight, False
    return counted


def handle_worker_term(worker: Any, models: ModelRegistry, in_flight: InFlight, graceful_timeout: float) -> None:
    """Start draining when gunicorn's worker is told to stop (it then stops accepting on its own), and
    leave as soon as every response has been sent."""
    stop_accepting = worker.handle_exit

    def on_term(signum: int, frame: FrameType | None) -> None:
        if models.draining:
            return  # a repeated signal (one sent to the whole process group) changes nothing
        stop_accepting(signum, frame)
        models.drain(drain_deadline(graceful_timeout))
        gevent.spawn(_exit_when_drained, in_flight)

    signal.signal(signal.SIGTERM, on_term)


def let_work_finish(in_flight: InFlight, timeout: float) -> None:
    """At the worker's exit, before its engines stop: wait up to ``timeout`` seconds for work that has no
    connection for gunicorn to wait on (a resumable stream whose client left; the drain's deadline
    cancels what would run longer)."""
    in_flight.exiting = True
    deadline = time.monotonic() + timeout
    if in_flight.count > 0:
        log.info("waiting for %d generations whose clients left to finish", in_flight.count)
    while in_flight.count > 0 and time.monotonic() < deadline:
        gevent.sleep(DRAIN_POLL)


def _exit_when_drained(in_flight: InFlight) -> None:
    while in_flight.count > 0:
        gevent.sleep(DRAIN_POLL)
    if in_flight.exiting:
        return  # gunicorn is ending the worker already; its exit hook must run to its end
    log.info("drained: every response has been sent; the worker exits")
    sys.exit(0)  # raised into the worker's main greenlet by gevent: gunicorn's own quick exit path


def watch_engines(worker: Any, models: ModelRegistry, timeout: float) -> None:
    """Replace this worker when one of its engines cannot serve any more: /healthz already fails then, and
    a fresh worker is the cure (under systemd nobody else would act).

    An engine that failed after it was ready (an error on its thread) leaves through the drain, so the
    errors its jobs got still reach their clients; one stalled with work pending for ``timeout`` seconds
    cannot be drained and leaves at once. An engine that never loaded its model stays as it is (a new
    worker would fail the same way) and the other models go on serving: /readyz says why.
    """
    while worker.alive and any(model.engine.alive for model in models.models.values()):
        for model in models.models.values():
            stalled = model.stalled_for()
            if stalled > timeout:
                log.error("engine stalled for %.1fs with work pending (%s); replacing this worker", stalled, model.id)
                models.metrics.worker_replacements.labels(model.id, "stalled").inc()
                worker.alive = False
                os.kill(os.getpid(), signal.SIGQUIT)  # gunicorn's quick stop; the arbiter starts a new worker
                return
            engine = model.engine
            if engine.served and engine.failure is not None:
                log.error("engine failed while serving (%s: %s); replacing this worker", model.id, engine.failure)
                models.metrics.worker_replacements.labels(model.id, "failed").inc()
                os.kill(os.getpid(), signal.SIGTERM)  # the drain: answers already failed are still sent
                return
        gevent.sleep(min(1.0, timeout / 2))


def non_loopback_addresses(listeners: Iterable[Any]) -> list[str]:
    """The addresses of gunicorn's bound ``listeners`` (every ``-b``, sockets systemd passed in) that other
    hosts can reach: TCP sockets not bound to a loopback address. Unix sockets are local."""
    exposed = []
    for listener in listeners:
        if listener.sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        host, port = listener.sock.getsockname()[:2]
        address = ipaddress.ip_address(host)
        mapped = getattr(address, "ipv4_mapped", None)
        if not (mapped or address).is_loopback:
            exposed.append(f"[{host}]:{port}" if address.version == 6 else f"{host}:{port}")
    return exposed


def handle_master_term(arbiter: Any, agent: AgentServer | None = None, notice: float = 0.0) -> None:
    """The first SIGTERM is gunicorn's graceful stop (announced to systemd); a second one is SIGQUIT,
    which gunicorn's stop loop turns into a quick shutdown. With an agent check, the balancers are told to
    drain first and the listeners stay open for ``notice`` seconds: requests they already sent here are
    served, and they send no new ones, so none meets a closed port."""
    forward: Callable[[int, FrameType | None], None] = arbiter.signal
    stopping = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            log.info("second SIGTERM: stopping at once")
            forward(signal.SIGQUIT, frame)
            return
        stopping = True
        notify("STOPPING=1", "STATUS=draining")
        if agent is None:
            forward(signum, frame)
            return
        agent.draining = True
        log.info("SIGTERM: the agent reports drain; the listeners close in %.1fs", notice)
        timer = threading.Timer(notice, forward, (signum, None))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_term)


def handle_master_hup(arbiter: Any, reload_problem: Callable[[], str | None]) -> None:
    """A SIGHUP reloads only settings that load: gunicorn would re-read its config file, and a broken one
    stops the master (or fails every new worker). Refused, the old workers go on serving, and the log and
    systemd's status say why."""
    forward: Callable[[int, FrameType | None], None] = arbiter.signal

    def on_hup(signum: int, frame: FrameType | None) -> None:
        problem = reload_problem()
        if problem is not None:
            log.error("reload refused, the workers keep their settings: %s", problem)
            notify(f"STATUS=serving; reload refused: {problem.splitlines()[0]}")
            return
        forward(signum, frame)

    signal.signal(signal.SIGHUP, on_hup)


def announce_reload() -> None:
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
