"""Real servers for the integration tests: ``llmserve serve`` (gunicorn, gevent, the real model) on a
free loopback port, waited on until /readyz says the models are warm."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

MODEL = "gemma-3-270m"
STARTUP_TIMEOUT = 180.0
LLMSERVE = str(Path(sys.executable).parent / "llmserve")
NO_EOS = {"1": -100, "106": -100}  # the embedded model's end-of-generation tokens, banned


def long_stream_body(max_tokens: int) -> dict[str, Any]:
    """A streamed completion that runs for exactly ``max_tokens`` tokens."""
    return {
        "model": MODEL,
        "prompt": "Tell me a story.",
        "max_tokens": max_tokens,
        "stream": True,
        "logit_bias": NO_EOS,
    }


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", **options)  # type: ignore[arg-type]

    def engine_stats(self, model: str = MODEL) -> dict:
        return httpx.get(f"{self.url}/readyz", timeout=5).json()["models"][model]["engine"]

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return [int(pid) for pid in children.split()]

    @property
    def state_dir(self) -> Path:
        return self.log.parent / "state"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def cli_env(directory: Path, ledger_url: str | None = None) -> dict[str, str]:
    """The environment of an ``llmserve`` command run by an operator of the server in ``directory``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMSERVE_")}
    env.update({"LLMSERVE_STATE_DIR": str(directory / "state"), "LLMSERVE_CONFIG": str(directory / "llmserve.toml")})
    if ledger_url is not None:
        env["LLMSERVE_LEDGER__URL"] = ledger_url
    return env


def create_key(directory: Path, tenant: str) -> str:
    """A key made with the CLI, as an operator would."""
    command = [LLMSERVE, "keys", "create", "--config", str(directory / "llmserve.toml"), "--tenant", tenant]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=cli_env(directory))
    return result.stdout.strip()


def start_server(
    directory: Path, config: str | None = None, *, ready: bool = True, port: int | None = None, **settings: str
) -> Server:
    """A server whose state lives in ``directory``, on ``port`` (a free one by default); ``config`` is TOML for
    its settings file. Returned once /readyz says it is ready, or with ``ready`` off once it answers at all."""
    port = port or free_port()
    log = directory / "server.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMSERVE_")}
    env.update({"LLMSERVE_PORT": str(port), "LLMSERVE_STATE_DIR": str(directory / "state")})
    if config is not None:
        (directory / "llmserve.toml").write_text(config)
        env["LLMSERVE_CONFIG"] = str(directory / "llmserve.toml")
    env.update({f"LLMSERVE_{key.upper()}": value for key, value in settings.items()})
    with log.open("wb") as output:
        process = subprocess.Popen([LLMSERVE, "serve"], env=env, stdout=output, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200 or not ready:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    stop_server(server)
    raise RuntimeError(f"server not ready within {STARTUP_TIMEOUT}s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("server"))
    yield running
    stop_server(running)


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return server.client(max_retries=0, timeout=120)
