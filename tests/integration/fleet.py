"""A fleet on loopback for the balancer tests: llmserve instances on the simulated backend (the real
server, engine loop and HTTP stack, with modelled step times, so that several fit on two cores) behind
the shipped HAProxy or nginx configuration, started from its file with only addresses replaced."""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from tests.integration.conftest import Server, free_port, start_server, stop_server, wait_for
from tests.integration.resumable_client import Read

ROOT = Path(__file__).resolve().parents[2]
FLEET_MODEL = "fleet"  # the served name of the fleet's model
SLOTS = 3  # each instance's generation slots: what its agent reports as maxconn
STEP_SECONDS = 0.02  # the simulated fixed cost of a step: the least time between two tokens of a stream


def simulated_config(*, step_seconds: float = STEP_SECONDS, parallel: int = SLOTS) -> str:
    return f"""
[model]
backend = "simulated"
parallel = {parallel}
context_length = 1024
threads = 1
embeddings = false
simulation = {{ step_seconds = {step_seconds}, sequence_seconds = 0.002, prompt_token_seconds = 0.0002 }}

[models.{FLEET_MODEL}]
embedded = "smollm2-135m-instruct"
"""


@dataclass
class Instance:
    directory: Path
    port: int
    agent_port: int | None
    config: str
    settings: dict[str, str] = field(default_factory=dict)
    server: Server | None = None

    def start(self) -> Server:
        extra = dict(self.settings)
        if self.agent_port is not None:
            extra["agent_port"] = str(self.agent_port)
        self.server = start_server(self.directory, self.config, port=self.port, **extra)
        return self.server

    def kill(self) -> None:
        """SIGKILL the master and its workers: the host's crash, not a stop."""
        assert self.server is not None
        pids = [*self.server.worker_pids(), self.server.process.pid]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        self.server.process.wait()

    def stop(self) -> None:
        if self.server is not None and self.server.process.poll() is None:
            stop_server(self.server)


def instances(base: Path, count: int, *, agent: bool, config: str, **settings: str) -> list[Instance]:
    made = []
    for index in range(count):
        directory = base / f"instance{index + 1}"
        directory.mkdir()
        made.append(Instance(directory, free_port(), free_port() if agent else None, config, dict(settings)))
    return made


@contextmanager
def running(fleet: list[Instance]) -> Iterator[list[Instance]]:
    """The instances started, and stopped however the block ends (also when one of them fails to start)."""
    try:
        for member in fleet:
            member.start()
        yield fleet
    finally:
        for member in fleet:
            member.stop()


B = TypeVar("B", bound="Balancer")


@contextmanager
def balanced(base: Path, fleet: list[Instance], start: Callable[[Path, list[Instance]], B]) -> Iterator[B]:
    """The instances started behind the balancer ``start`` makes (``start_haproxy``, ``start_nginx``) in
    ``base``; the balancer and every instance stopped however the block ends."""
    with running(fleet):
        balancer = start(base, fleet)
        try:
            yield balancer
        finally:
            balancer.stop()


@dataclass
class Balancer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    tls_url: str  # TLS ends at the balancer, with a self-signed certificate
    certificate: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class HAProxy(Balancer):
    stats_socket: Path

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self, backend: str = "llmserve") -> dict[str, dict[str, str]]:
        """Each server's row of ``show stat``: status, weight, slim (maxconn), stot (requests sent)."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {
            row["svname"]: row
            for row in rows
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_for_servers(self, condition: Callable[[dict[str, dict[str, str]]], bool], timeout: float = 30) -> bool:
        return wait_for(lambda: condition(self.servers()), timeout)


SHIPPED_HAPROXY = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with openssl."""
    certificate, key = directory / "llmserve.crt", directory / "llmserve.key"
    if not certificate.exists():
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(certificate),
            ],
            check=True,
            capture_output=True,
        )
    return certificate, key


def start_haproxy(directory: Path, fleet: list[Instance], config: str | None = None) -> HAProxy:
    """The shipped deploy/haproxy/haproxy.cfg (or ``config``, a variant of it) with its bind, stats socket
    and servers replaced."""
    config = config if config is not None else SHIPPED_HAPROXY.read_text()
    port, tls_port = free_port(), free_port()
    stats = directory / "haproxy.sock"
    certificate, key = self_signed_certificate(directory)
    pem = directory / "llmserve.pem"
    pem.write_bytes(certificate.read_bytes() + key.read_bytes())
    config = re.sub(r"(?m)^    bind 127\.0\.0\.1:8080$", f"    bind 127.0.0.1:{port}", config)
    config = re.sub(r"(?m)^    bind :443 ssl crt \S+", f"    bind 127.0.0.1:{tls_port} ssl crt {pem}", config)
    config = re.sub(r"(?m)^    stats socket \S+", f"    stats socket {stats}", config)
    servers = "".join(
        f"    server llmserve{index} 127.0.0.1:{instance.port} agent-port {instance.agent_port}\n"
        for index, instance in enumerate(fleet, 1)
    )
    config, replaced = re.subn(r"(?m)(^    server llmserve\d .*\n)+", servers, config)
    assert replaced >= 1 and f"bind 127.0.0.1:{port}" in config and f"crt {pem}" in config and str(stats) in config
    path, log = directory / "haproxy.cfg", directory / "haproxy.log"
    path.write_text(config)
    executable = shutil.which("haproxy") or "/usr/sbin/haproxy"
    with log.open("wb") as output:
        process = subprocess.Popen([executable, "-db", "-f", str(path)], stdout=output, stderr=subprocess.STDOUT)
    proxy = HAProxy(f"http://127.0.0.1:{port}", process, log, f"https://127.0.0.1:{tls_port}", certificate, stats)
    if not wait_for(stats.exists, 10):
        raise RuntimeError(f"haproxy did not start:\n{log.read_text()}")
    return proxy


def start_nginx(directory: Path, fleet: list[Instance], *, read_timeout: str | None = None) -> Balancer:
    """The shipped deploy/nginx/llmserve.conf, included in a minimal nginx.conf of this directory, with its
    listen address and upstream servers replaced (and, to test heartbeats, its read timeout)."""
    site = (ROOT / "deploy" / "nginx" / "llmserve.conf").read_text()
    port, tls_port = free_port(), free_port()
    certificate, key = self_signed_certificate(directory)
    site = re.sub(r"(?m)^    listen 127\.0\.0\.1:8080;$", f"    listen 127.0.0.1:{port};", site)
    site = re.sub(r"(?m)^    listen 443 ssl;$", f"    listen 127.0.0.1:{tls_port} ssl;", site)
    site = re.sub(r"ssl_certificate \S+;", f"ssl_certificate {certificate};", site)
    site = re.sub(r"ssl_certificate_key \S+;", f"ssl_certificate_key {key};", site)
    servers = "".join(f"    server 127.0.0.1:{instance.port} max_fails=1 fail_timeout=10s;\n" for instance in fleet)
    site, replaced = re.subn(r"(?m)(^    server 127\.0\.0\.1:\d+ .*\n)+", servers, site)
    assert replaced == 1 and f"listen 127.0.0.1:{port};" in site and f"listen 127.0.0.1:{tls_port} ssl;" in site
    assert f"ssl_certificate {certificate};" in site and f"ssl_certificate_key {key};" in site
    if read_timeout is not None:
        site, replaced = re.subn(r"proxy_read_timeout \w+;", f"proxy_read_timeout {read_timeout};", site)
        assert replaced == 1
    (directory / "llmserve.conf").write_text(site)
    log = directory / "nginx.log"
    (directory / "nginx.conf").write_text(
        f"""
pid {directory}/nginx.pid;
error_log {log} info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    include {directory}/llmserve.conf;
}}
"""
    )
    executable = shutil.which("nginx") or "/usr/sbin/nginx"
    process = subprocess.Popen(
        [executable, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    balancer = Balancer(f"http://127.0.0.1:{port}", process, log, f"https://127.0.0.1:{tls_port}", certificate)

    def answers() -> bool:
        try:
            httpx.get(f"{balancer.url}/healthz", timeout=1)
        except httpx.TransportError:
            return False
        return True

    if not wait_for(answers, 10):
        raise RuntimeError(f"nginx did not start:\n{log.read_text() if log.exists() else ''}")
    return balancer


@dataclass
class Outcome:
    status: int
    started: bool  # the first event of the stream arrived
    finished: bool  # the stream ended with [DONE]
    error: str = ""


def stream(url: str, max_tokens: int, timeout: float = 60) -> Outcome:
    """One streamed completion through ``url``, read to its end."""
    body = {"model": FLEET_MODEL, "prompt": "Tell me about fleets.", "max_tokens": max_tokens, "stream": True}
    started = finished = False
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as response:
            if response.status_code != 200:
                return Outcome(response.status_code, False, False, response.read().decode(errors="replace"))
            for line in response.iter_lines():
                if line.startswith("data: "):
                    started = True
                    finished = finished or line == "data: [DONE]"
            return Outcome(200, started, finished)
    except httpx.HTTPError as exc:
        return Outcome(0, started, False, repr(exc))


def resumed_in_steps(url: str, resumes: int) -> Read:
    """A resumable stream through ``url`` whose client leaves after every two events and resumes, ``resumes``
    times, then reads it to its end."""
    body = {"model": FLEET_MODEL, "prompt": "Tell me about fleets.", "max_tokens": 40, "stream": True}
    read = Read()
    start = {"X-Stream-Resumable": "true"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=start, timeout=30) as response:
        stream_id = response.headers["X-Stream-Id"]
        read.consume(response, limit=2)
    for resume in range(resumes):
        headers = {"Last-Event-ID": str(read.last)}
        with httpx.stream("GET", f"{url}/v1/streams/{stream_id}", headers=headers, timeout=30) as response:
            assert response.status_code == 200, (resume, response.read())
            read.consume(response, limit=2 if resume < resumes - 1 else None)
    return read


def token_gaps(url: str, max_tokens: int) -> list[float]:
    """Seconds between the arrivals of consecutive token events of one stream through ``url``."""
    body = {"model": FLEET_MODEL, "prompt": "Tell me about fleets.", "max_tokens": max_tokens, "stream": True}
    arrivals = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


class Load:
    """``clients`` threads sending streamed completions back to back until stopped."""

    def __init__(self, url: str, clients: int, max_tokens: int) -> None:
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(url, max_tokens), daemon=True) for _ in range(clients)
        ]

    def _client(self, url: str, max_tokens: int) -> None:
        while not self._stop.is_set():
            self.outcomes.append(stream(url, max_tokens))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    @property
    def failed(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if not outcome.finished]
