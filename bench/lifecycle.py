"""Service under continuous load while the server reloads, and while it stops and starts again.

Eight clients send streamed completions back to back. Midway through, the server gets (a) SIGHUP: new
workers load the model while the old ones finish their streams; (b) SIGTERM, then a fresh start: the
drain, then the model load. For each phase: requests that failed (any error, cut stream or refused
connection), and the longest gap during which no client received a token.

    .venv/bin/python bench/lifecycle.py --out docs/benchmark-lifecycle.json
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import BackgroundClients, LoadConfig, RequestResult, stream_completion
from servers import ManagedServer, ServerSpec

LLMSERVE = str(Path(sys.executable).parent / "llmserve")
PORT = 8092
URL = f"http://127.0.0.1:{PORT}"


def spec(args: argparse.Namespace) -> ServerSpec:
    env = {
        "LLMSERVE_PORT": str(PORT),
        "LLMSERVE_MODEL__PARALLEL": "8",
        "LLMSERVE_MODEL__CONTEXT_LENGTH": "1024",
        "LLMSERVE_WORKERS": str(args.workers),
        "LLMSERVE_LOG_LEVEL": "warning",
    }
    return ServerSpec("lifecycle", [LLMSERVE, "serve"], URL, "/readyz", Path(args.logs) / "lifecycle.log", env)


class Load(BackgroundClients):
    """``clients`` streams back to back; a refused connection counts as a failed request and is retried
    after a short pause, as a client with a retry policy would."""

    def __init__(self, clients: int, max_tokens: int) -> None:
        super().__init__(clients)
        self.config = LoadConfig(base_url=URL, model="gemma-3-270m", max_tokens=max_tokens, read_timeout_s=120)
        self.results: list[RequestResult] = []

    def _client(self, number: int) -> None:
        index = 0
        while not self.stopping.is_set():
            with httpx.Client(base_url=URL, timeout=120) as client:
                result = stream_completion(client, self.config, index, threading.Event())
            self.results.append(result)
            index += 1
            if not result.ok:
                time.sleep(0.2)

    def summary(self, start: float, end: float) -> dict[str, Any]:
        inside = [r for r in self.results if start <= r.started_s < end]
        tokens = sorted(t for r in self.results for t in r.token_times() if start <= t < end)
        gaps = [b - a for a, b in zip([start, *tokens], [*tokens, end], strict=True)]
        return {
            "requests": len(inside),
            "failed": sum(1 for r in inside if not r.ok),
            "errors": sorted({(r.error or "")[:80] for r in inside if not r.ok}),
            "longest_gap_s": round(max(gaps), 3),
            "tokens": len(tokens),
        }


def reload_phase(server: ManagedServer, args: argparse.Namespace) -> dict[str, Any]:
    with Load(args.clients, args.max_tokens) as load:
        time.sleep(args.before)
        start = time.perf_counter()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(args.after)
        end = time.perf_counter()
    return {"event": "reload (SIGHUP)", **load.summary(start - args.before, end)}


def restart_phase(server: ManagedServer, args: argparse.Namespace) -> dict[str, Any]:
    with Load(args.clients, args.max_tokens) as load:
        time.sleep(args.before)
        start = time.perf_counter()
        server.stop(grace_s=60)
        server.start()
        server.wait_ready(240)
        time.sleep(args.after)
        end = time.perf_counter()
    return {"event": "stop, then start (SIGTERM drain)", **load.summary(start - args.before, end)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--before", type=float, default=10.0, help="seconds of load before the event")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of load after it")
    parser.add_argument("--logs", default=".bench/logs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    server = ManagedServer(spec(args))
    server.start()
    try:
        server.wait_ready(240)
        rows = [reload_phase(server, args), restart_phase(server, args)]
    finally:
        server.stop()
    for row in rows:
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"args": {**vars(args), "out": str(args.out)}, "phases": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
