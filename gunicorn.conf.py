"""gunicorn settings, derived from the one settings model (``LLMSERVE_*`` and ``LLMSERVE_CONFIG``).

The model is loaded in each worker after fork (``post_worker_init``), never in the master: threads, locks
and GPU contexts do not survive a fork. Readiness, drain and the second-signal stop are in
``llmserve.lifecycle``.
"""

from __future__ import annotations

import logging.config
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import gevent
import gunicorn.util

from llmserve import agent, lifecycle
from llmserve.errors import write_protocol_error
from llmserve.ledger.store import LedgerUnavailable, open_ledger
from llmserve.logs import logging_config
from llmserve.settings import SettingsError, available_cpus, keyless_refusal, load_settings
from llmserve.standby import Standby

# Every worker writes its metric samples here; it must be set before a worker imports prometheus_client.
_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
if _METRICS_DIR not in os.environ:  # this file runs again on every reload: make the directory once
    os.environ[_METRICS_DIR] = tempfile.mkdtemp(prefix="llmserve-metrics-")

# Readiness is reported by the workers once their model is warm, not by gunicorn's master at bind time.
lifecycle.hide_notify_socket()
# Requests gunicorn refuses before the app sees them get an error object too, not an HTML page.
gunicorn.util.write_error = write_protocol_error

try:
    _settings = load_settings()
except SettingsError as _error:
    sys.exit(f"llmserve: {_error}")

wsgi_app = "app:app"
bind = [f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else f"{_settings.host}:{_settings.port}"]
workers = _settings.workers
worker_class = "gevent"
worker_connections = _settings.worker_connections
# With gevent workers `timeout` is a heartbeat of the hub, not a request limit; the hub never blocks.
timeout = 30
graceful_timeout = _settings.graceful_timeout
keepalive = 75
preload_app = False
# Configured directly rather than through gunicorn's logconfig_dict: with that set, gunicorn formats an
# access-log line for every request (probes included) even when nothing logs it. The app writes its
# own request lines. GunicornLogger sends gunicorn's own lines through the same handler and format.
logging.config.dictConfig(logging_config(_settings))
logger_class = "llmserve.logs.GunicornLogger"
loglevel = _settings.log_level
accesslog = None
proc_name = "llmserve"
# Managed through signals (systemd, Kubernetes); a shared default socket path would let one instance's
# control commands reach another on the same host.
control_socket_disable = True


def on_starting(server):  # type: ignore[no-untyped-def]
    """Warn when the workers' decode threads outnumber the CPUs. Start from an empty metrics directory:
    samples of an earlier run's workers would be summed in. Bring the usage ledger's schema up to date
    once, here, before any worker opens it; a ledger that cannot be opened stops the start. Enter warm
    standby, or leave the one an earlier run was left in, as the settings say."""
    if _settings.oversubscribed:
        server.log.warning(
            "%d workers x %d decode threads exceed the %d CPUs: the threads will slow each other down; "
            "set model.threads to at most the CPUs divided by the workers",
            _settings.workers,
            max(model.threads for model in _settings.models.values()),
            available_cpus(),
        )
    Standby(_settings.state_dir).set(_settings.standby)
    directory = Path(os.environ[_METRICS_DIR])
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    if _settings.ledger.enabled:
        try:
            open_ledger(_settings.ledger.resolved_url(_settings.state_dir)).close()
        except LedgerUnavailable as error:
            sys.exit(f"llmserve: {error}")


def when_ready(server):  # type: ignore[no-untyped-def]
    """The sockets are bound (``-b`` and systemd's included), no worker runs yet: a server without API
    keys refuses to start on any address other hosts can reach."""
    exposed = lifecycle.non_loopback_addresses(server.LISTENERS) if _settings.loopback_only else []
    if exposed:
        sys.exit(f"llmserve: {keyless_refusal(', '.join(exposed))}")
    checks = None
    if _settings.agent_port is not None:
        try:
            checks = agent.start_agent(_settings.host, _settings.agent_port, _settings.state_dir)
        except OSError as error:
            sys.exit(f"llmserve: cannot listen for agent checks on port {_settings.agent_port}: {error.strerror}")
    lifecycle.handle_master_term(server, checks, _settings.drain_notice)
    lifecycle.handle_master_hup(server, _reload_problem)


def _reload_problem() -> str | None:
    """Why the settings as they are now on disk and in the environment would not load, if they would not."""
    try:
        load_settings()
    except SettingsError as error:
        return str(error)
    return None


def on_reload(server):  # type: ignore[no-untyped-def]
    lifecycle.announce_reload()


def pre_fork(server, worker):  # type: ignore[no-untyped-def]
    """A worker forked while others serve (a reload, a replacement) takes connections only once warm."""
    worker.joins_serving_workers = bool(server.WORKERS)


def post_fork(server, worker):  # type: ignore[no-untyped-def]
    """Until the worker installs its own handlers, a SIGTERM ends it at once. The master's handler, which
    the child inherits through fork, would only queue the signal in the child's copy of the master and
    lose it: the master would wait out graceful_timeout, then kill the worker."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    checks = agent.running_agent()
    if checks is not None:
        checks.close_inherited()


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """Drop a dead worker's live gauges, so its slots and queue stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """Start this worker's engine threads, which load the models, and its usage ledger; /readyz turns 200
    when the models are warm."""
    from llmserve import accounting, tenancy  # not at the top: they import prometheus_client, which must
    from llmserve.models import registry  # first see PROMETHEUS_MULTIPROC_DIR (the app, loaded by now, did)

    models = worker.wsgi.extensions[registry.EXTENSION]
    models.start()
    worker.wsgi.extensions[accounting.EXTENSION].start()
    worker.wsgi.extensions[tenancy.EXTENSION].start()
    lifecycle.handle_worker_term(worker, models, worker.wsgi.extensions[lifecycle.IN_FLIGHT], graceful_timeout)
    gevent.spawn(lifecycle.watch_engines, worker, models, _settings.watchdog_timeout)
    if worker.joins_serving_workers:
        lifecycle.wait_until_ready(models, worker)
    else:
        gevent.spawn(lifecycle.wait_until_ready, models, worker)


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    from llmserve import accounting
    from llmserve.models import registry

    extensions = worker.wsgi.extensions if getattr(worker, "wsgi", None) else {}
    if registry.EXTENSION in extensions:
        lifecycle.let_work_finish(extensions[lifecycle.IN_FLIGHT], graceful_timeout)
        extensions[registry.EXTENSION].stop()
        extensions[accounting.EXTENSION].stop()  # after the engines: their last events complete the records
