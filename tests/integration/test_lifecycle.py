"""Stopping, draining, reloading and the watchdog, against real gunicorn processes."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from llmserve.keys import FileKeyStore
from tests.integration.conftest import MODEL, Server, long_stream_body, start_server, stop_server, wait_for

pytestmark = pytest.mark.slow


def counted_stream_body(max_tokens: int) -> dict:
    """A long stream whose last chunk reports its usage: chunks are not tokens (a token may carry no
    text, or half a character), so how many tokens arrived is read from there."""
    return {**long_stream_body(max_tokens), "stream_options": {"include_usage": True}}


def completion_tokens(lines: list[str]) -> int:
    return int(json.loads(lines[-2])["usage"]["completion_tokens"])


def read_stream(url: str, body: dict, results: list[list[str]], headers: dict[str, str] | None = None) -> None:
    """Collect one stream's data lines (its last one tells how it ended)."""
    lines: list[str] = []
    results.append(lines)
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
    except httpx.HTTPError as exc:
        lines.append(f"transport error: {exc!r}")


def start_streams(server: Server, count: int, max_tokens: int) -> tuple[list[threading.Thread], list[list[str]]]:
    results: list[list[str]] = []
    threads = [
        threading.Thread(
            target=read_stream, args=(f"{server.url}/v1/completions", counted_stream_body(max_tokens), results)
        )
        for _ in range(count)
    ]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: server.engine_stats()["slots_busy"] == count, timeout=30)
    assert wait_for(lambda: all(len(lines) >= 2 for lines in results), timeout=30)  # tokens are flowing
    return threads, results


def exit_code(server: Server, timeout: float) -> int | None:
    try:
        return server.process.wait(timeout=timeout)
    except Exception:
        return None


def test_sigterm_lets_running_streams_finish_and_exits_0(tmp_path: Path) -> None:
    server = start_server(tmp_path, model__parallel="4", graceful_timeout="30")
    try:
        threads, results = start_streams(server, 4, 120)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            late = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "hi"}, timeout=5)
            assert late.status_code == 503  # a connection that still got in is refused honestly
        except httpx.TransportError:
            pass  # or the listener is already closed
        for thread in threads:
            thread.join(timeout=60)
        assert [lines[-1] for lines in results] == ["[DONE]"] * 4
        assert [completion_tokens(lines) for lines in results] == [120] * 4  # every token arrived
        assert exit_code(server, 30) == 0
    finally:
        if server.process.poll() is None:
            stop_server(server)


def test_a_short_drain_budget_ends_streams_with_an_error_event(tmp_path: Path) -> None:
    server = start_server(tmp_path, model__parallel="2", graceful_timeout="4")
    try:
        threads, results = start_streams(server, 2, 3000)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=30)
        for lines in results:
            final = json.loads(lines[-1])  # not "[DONE]", and not a cut connection
            assert final["error"]["code"] == "service_unavailable"
        assert exit_code(server, 15) == 0
        assert time.monotonic() - started < 8  # the drain deadline, not gunicorn's SIGKILL
    finally:
        if server.process.poll() is None:
            stop_server(server)


def test_a_second_sigterm_stops_at_once(tmp_path: Path) -> None:
    server = start_server(tmp_path, model__parallel="1", graceful_timeout="60")
    try:
        threads, _ = start_streams(server, 1, 3000)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert exit_code(server, 15) is not None
        assert time.monotonic() - started < 10
        for thread in threads:
            thread.join(timeout=10)
    finally:
        if server.process.poll() is None:
            stop_server(server)


def test_sighup_applies_a_changed_tenant_file_while_a_stream_completes(tmp_path: Path) -> None:
    server = start_server(tmp_path, config="[tenants.alpha]\n", model__parallel="2")
    try:
        store = FileKeyStore(tmp_path / "state")
        alpha, beta = store.create("alpha")[1], store.create("beta")[1]  # beta is not configured yet

        def beta_models():
            return httpx.get(
                f"{server.url}/v1/models", headers={"Authorization": f"Bearer {beta}"}, timeout=30
            ).status_code

        assert beta_models() == 401
        results: list[list[str]] = []
        stream = threading.Thread(
            target=read_stream,
            args=(
                f"{server.url}/v1/completions",
                counted_stream_body(150),
                results,
                {"Authorization": f"Bearer {alpha}"},
            ),
        )
        stream.start()
        assert wait_for(lambda: bool(results) and len(results[0]) >= 2, timeout=30)
        (tmp_path / "llmserve.toml").write_text("[tenants.alpha]\n[tenants.beta]\n")
        old_workers = set(server.worker_pids())
        server.process.send_signal(signal.SIGHUP)
        stream.join(timeout=60)
        assert results[0][-1] == "[DONE]"
        assert completion_tokens(results[0]) == 150
        assert wait_for(lambda: not old_workers & set(server.worker_pids()), timeout=60)
        assert beta_models() == 200
    finally:
        stop_server(server)


def test_sighup_with_broken_settings_keeps_the_old_workers_serving(tmp_path: Path) -> None:
    server = start_server(tmp_path, config="queue_size = 8\n")
    try:
        results: list[list[str]] = []
        stream = threading.Thread(
            target=read_stream, args=(f"{server.url}/v1/completions", counted_stream_body(100), results)
        )
        stream.start()
        assert wait_for(lambda: bool(results) and len(results[0]) >= 2, timeout=30)
        workers = set(server.worker_pids())
        (tmp_path / "llmserve.toml").write_text("queue_size = [not toml\n")
        server.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload refused" in server.log.read_text(errors="replace"), timeout=30)
        stream.join(timeout=60)
        assert completion_tokens(results[0]) == 100
        assert server.process.poll() is None
        assert set(server.worker_pids()) == workers
        served = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert served.status_code == 200
        # Fixed, the next SIGHUP reloads.
        (tmp_path / "llmserve.toml").write_text("queue_size = 4\n")
        server.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: not workers & set(server.worker_pids()), timeout=60)
    finally:
        stop_server(server)


def drill(server: Server, fault: str, body: dict | None = None) -> httpx.Response:
    """A completion asking for ``fault`` (the server runs with fault drills on)."""
    body = body or {"model": MODEL, "prompt": "Hello", "max_tokens": 8}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers={"X-Fault-Drill": fault}, timeout=60)


def replaced(server: Server, before: set[int]) -> bool:
    return bool(server.worker_pids()) and not before & set(server.worker_pids())


def metric(server: Server, line_start: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_watchdog_fails_healthz_and_replaces_a_stalled_worker(tmp_path: Path) -> None:
    server = start_server(tmp_path, watchdog_timeout="2", fault_drills="true")
    try:
        first = set(server.worker_pids())

        def stalled_request() -> None:
            with contextlib.suppress(httpx.HTTPError):  # its worker is replaced under it
                drill(server, "stall")

        threading.Thread(target=stalled_request).start()
        statuses: list[int] = []

        def unhealthy_seen() -> bool:
            with contextlib.suppress(httpx.TransportError):
                statuses.append(httpx.get(f"{server.url}/healthz", timeout=2).status_code)
            return 503 in statuses

        assert wait_for(unhealthy_seen, timeout=30)
        assert wait_for(lambda: "engine stalled" in server.log.read_text(errors="replace"), timeout=30)
        assert wait_for(lambda: replaced(server, first), timeout=60)
        assert wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200, timeout=120)
        assert metric(server, 'llmserve_worker_replacements_total{model="gemma-3-270m",reason="stalled"}') == 1
    finally:
        stop_server(server)


def test_an_engine_failure_replaces_the_worker_which_then_serves(tmp_path: Path) -> None:
    """The engine thread fails while serving: its requests get a 500 error object, the worker drains and
    leaves, and the arbiter's new worker serves the next request."""
    server = start_server(tmp_path, fault_drills="true")
    try:
        first = set(server.worker_pids())
        failed = drill(server, "engine")
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "engine_error"
        assert wait_for(lambda: replaced(server, first), timeout=60)
        assert wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200, timeout=120)
        served = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert served.status_code == 200
        assert served.json()["usage"]["completion_tokens"] == 2
        assert "engine failed while serving" in server.log.read_text(errors="replace")
        assert metric(server, 'llmserve_worker_replacements_total{model="gemma-3-270m",reason="failed"}') == 1
    finally:
        stop_server(server)


def test_a_sequence_whose_decode_fails_ends_alone(tmp_path: Path) -> None:
    """llama.cpp refuses one sequence's input in a batch of three: that request ends with an error event
    after its first token, the two others stream all their tokens, and the worker stays."""
    server = start_server(tmp_path, fault_drills="true")
    try:
        first = set(server.worker_pids())
        url = f"{server.url}/v1/completions"
        results: list[list[str]] = []
        healthy = [threading.Thread(target=read_stream, args=(url, counted_stream_body(48), results)) for _ in range(2)]
        for thread in healthy:
            thread.start()
        assert wait_for(lambda: server.engine_stats()["slots_busy"] == 2, timeout=30)
        failing: list[list[str]] = []
        read_stream(url, counted_stream_body(48), failing, headers={"X-Fault-Drill": "sequence"})
        for thread in healthy:
            thread.join(timeout=120)
        assert json.loads(failing[0][-1])["error"]["code"] == "engine_error"
        assert [completion_tokens(lines) for lines in results] == [48, 48]
        assert set(server.worker_pids()) == first
        assert "decoding its 3 sequences one by one" in server.log.read_text(errors="replace")
    finally:
        stop_server(server)


def test_fault_drill_headers_mean_nothing_unless_drills_are_on(server: Server) -> None:
    response = drill(server, "engine")
    assert response.status_code == 200
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
