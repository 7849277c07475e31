"""Lifecycle of benchmarked server processes: spawn, wait until ready, stop.

Each server runs in its own process group (``start_new_session``) so that
stopping it also stops whatever its command line spawned (shell wrappers,
workers), and a terminal Ctrl-C reaches only the benchmark, which then shuts
servers down in order. ``stop_all`` is registered with ``atexit`` as the last
line of defence against orphaned servers eating the CPU of later runs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

_LIVE: set[ManagedServer] = set()


class ServerError(RuntimeError):
    """A server failed to start, become ready, or stop."""


@dataclass
class ServerSpec:
    """How to launch one server and how to tell that it is ready."""

    name: str
    argv: list[str]
    base_url: str
    health_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


def _probe(url: str, timeout_s: float) -> tuple[int | None, str]:
    """GET url once: (status, short body) or (None, error text)."""
    try:
        resp = httpx.get(url, timeout=timeout_s)
        return resp.status_code, resp.text[:200]
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _tail(path: Path, n_bytes: int = 2000) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - n_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return "<no log>"


class ManagedServer:
    """One server process; use as a context manager so it is always stopped."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.startup_s: float | None = None
        self._t_spawn = 0.0
        self.loading_responses: list[str] = []

    @property
    def pgid(self) -> int | None:
        """Process group id (the leader's pid, thanks to start_new_session)."""
        return self.proc.pid if self.proc is not None else None

    @property
    def health_url(self) -> str:
        return self.spec.base_url.rstrip("/") + self.spec.health_path

    def start(self) -> None:
        """Spawn the process; refuse if something already answers on its URL."""
        status, _ = _probe(self.health_url, timeout_s=2.0)
        if status is not None:
            raise ServerError(
                f"{self.spec.name}: {self.spec.base_url} already answers (HTTP {status}); "
                "stop whatever is listening there first"
            )
        self.spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.spec.log_path.open("ab")
        self._log.write(f"\n=== start {time.ctime()}: {self.spec.argv}\n".encode())
        self._log.flush()
        try:
            self.proc = subprocess.Popen(
                self.spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.spec.env},
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise ServerError(f"{self.spec.name}: cannot start {self.spec.argv[0]}: {exc}") from exc
        _LIVE.add(self)
        self._t_spawn = time.perf_counter()

    def wait_ready(self, timeout_s: float, poll_s: float = 0.2) -> float:
        """Poll health until HTTP 200; return seconds from spawn to ready.

        Distinct non-200 answers seen meanwhile are kept in
        ``loading_responses`` because they document what the server reports
        while it loads the model.
        """
        if self.proc is None:
            raise ServerError(f"{self.spec.name}: not started")
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.spec.name}: exited with code {self.proc.returncode} before "
                    f"becoming ready; log {self.spec.log_path}:\n{_tail(self.spec.log_path)}"
                )
            status, body = _probe(self.health_url, timeout_s=2.0)
            if status == 200:
                self.startup_s = time.perf_counter() - self._t_spawn
                return self.startup_s
            if status is not None:
                seen = f"HTTP {status}: {body}"
                if seen not in self.loading_responses and len(self.loading_responses) < 10:
                    self.loading_responses.append(seen)
            time.sleep(poll_s)
        raise ServerError(
            f"{self.spec.name}: not ready after {timeout_s}s at {self.health_url}; "
            f"log {self.spec.log_path}:\n{_tail(self.spec.log_path)}"
        )

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL after grace_s; return exit code."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=10)
            # Leftover children of a wrapper shell would keep using CPU.
            self._signal_group(proc, signal.SIGKILL)
            return proc.returncode
        finally:
            _LIVE.discard(self)
            self._close_log()

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ManagedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_all() -> None:
    """Stop every server still running (exit path safety net)."""
    for server in list(_LIVE):
        server.stop(grace_s=5.0)


atexit.register(stop_all)
