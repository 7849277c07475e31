"""A server without API keys never listens where other hosts can reach it, however gunicorn is told to
bind: the master checks the sockets it really bound (every ``-b``, and sockets systemd passes in)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
GUNICORN = str(Path(sys.executable).parent / "gunicorn")
STARTED = "Booting worker"  # gunicorn's line once the master is past when_ready and forks a worker


def keyless_env(tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LLMSERVE_", "LISTEN_"))}
    env["LLMSERVE_STATE_DIR"] = str(tmp_path / "state")
    return env


def run_master(args: list[str], env: dict[str, str], **options: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **options
    )  # type: ignore[call-overload]


def output_until_exit_or_start(process: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """What the master printed until it exited, or until it forked its first worker (then it is stopped)."""
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if STARTED in line or time.monotonic() > deadline:
            process.terminate()
            break
    rest, _ = process.communicate(timeout=60)  # read on: a full pipe would keep it from exiting
    return "".join(lines) + rest


def test_a_public_bind_on_the_command_line_is_refused(tmp_path: Path) -> None:
    port = free_port()
    process = run_master(
        [GUNICORN, "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{free_port()}", "-b", f"0.0.0.0:{port}", "app:app"],
        keyless_env(tmp_path),
    )
    output = output_until_exit_or_start(process)
    assert process.returncode != 0
    assert STARTED not in output
    assert f"0.0.0.0:{port} is not a loopback address and no tenants are configured" in output


def test_a_public_socket_from_systemd_is_refused(tmp_path: Path) -> None:
    """Socket activation: the socket arrives as fd 3 with LISTEN_FDS, and gunicorn binds nothing itself."""
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    env = keyless_env(tmp_path) | {"LISTEN_FDS": "1"}

    def as_fd_3() -> None:
        os.dup2(listener.fileno(), 3)

    # LISTEN_PID must be gunicorn's own pid: bash's, which exec keeps.
    script = f'export LISTEN_PID=$$; exec "{GUNICORN}" -c gunicorn.conf.py app:app'
    process = run_master(["bash", "-c", script], env, preexec_fn=as_fd_3, pass_fds=(3,))
    listener.close()
    output = output_until_exit_or_start(process)
    assert process.returncode != 0
    assert f"0.0.0.0:{port} is not a loopback address" in output


def test_a_loopback_bind_starts(tmp_path: Path) -> None:
    process = run_master(
        [GUNICORN, "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{free_port()}", "app:app"], keyless_env(tmp_path)
    )
    output = output_until_exit_or_start(process)  # stopped with SIGTERM the moment its worker boots
    assert STARTED in output
    assert "not a loopback address" not in output
    # The SIGTERM reached the booting worker, whenever it landed: before the worker's own handlers
    # (gunicorn.conf's post_fork: it ends at once) or after them (it exits). A lost one left the worker
    # to hang, saying neither, until the master's graceful_timeout ran out.
    assert "was sent SIGTERM" in output or "Worker exiting" in output
