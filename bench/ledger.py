"""What the usage ledger costs, and how long a restore from a backup takes.

``overhead``: two servers from this tree, one writing the ledger and one with ``ledger.enabled = false``,
both with 8 slots, run at the same time (the idle one uses no CPU); load phases of 8 concurrent streams
alternate between them, the order flipping every round (ABBA...). Reports each phase's tokens/s and the
ratio of the means (with ledger / without).

``restore``: a ledger of ``--records`` records is backed up with ``llmserve backup``, then the drill is
timed: ``llmserve restore`` into an empty state directory, ``llmserve serve`` on it with an empty cache
directory (as on a new host), until ``/readyz`` answers 200. Reports the seconds of each part.

Run only while nothing else loads the machine::

    .venv/bin/python bench/ledger.py overhead --rounds 4 --requests 48 --max-tokens 64 --out .bench/ledger.json
    .venv/bin/python bench/ledger.py restore --records 100000 --out .bench/restore.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loadgen import LoadConfig, run_load
from servers import ManagedServer, ServerSpec

from llmserve.ledger.records import UsageRecord
from llmserve.ledger.settings import default_url
from llmserve.ledger.store import Ledger

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "gemma-3-270m"
LLMSERVE = str(REPO_ROOT / ".venv" / "bin" / "llmserve")


def _server(name: str, port: int, state_dir: Path, log: Path, **settings: str) -> ManagedServer:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMSERVE_")}
    env.update({"LLMSERVE_PORT": str(port), "LLMSERVE_STATE_DIR": str(state_dir)})
    env.update({f"LLMSERVE_{key.upper()}": value for key, value in settings.items()})
    spec = ServerSpec(
        name=name,
        argv=[LLMSERVE, "serve"],
        base_url=f"http://127.0.0.1:{port}",
        health_path="/readyz",
        log_path=log,
        env=env,
    )
    return ManagedServer(spec)


def _stop_gracefully(server: ManagedServer) -> None:
    """SIGTERM to the gunicorn master alone, as systemd sends it (KillMode=mixed), then clean up the group."""
    if server.proc is not None and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout=60)
    server.stop()


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="llmserve-bench-ledger-"))
    log = args.out.with_suffix(".log")
    servers = {
        "ledger": _server("ledger", args.port, work / "on", log, model__parallel="8"),
        "no_ledger": _server("no_ledger", args.port + 1, work / "off", log, model__parallel="8", ledger__enabled="0"),
    }
    phases: dict[str, list[float]] = {name: [] for name in servers}
    errors = 0
    try:
        for server in servers.values():
            server.start()
            server.wait_ready(timeout_s=180)
        # Round -1 warms up and is not counted: a fresh worker's first phase is slower (lazy allocations,
        # model pages still being read in).
        for round_number in range(-1, args.rounds):
            order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
            for name in order:
                load = LoadConfig(
                    base_url=servers[name].spec.base_url,
                    model=MODEL,
                    concurrency=8,
                    total_requests=args.requests,
                    max_tokens=args.max_tokens,
                    unique_prompts=True,
                )
                result = run_load(load)
                errors += result["errors"]
                print(f"round {round_number} {name}: {result['tokens_per_s']} tok/s", file=sys.stderr)
                if round_number >= 0:
                    phases[name].append(result["tokens_per_s"])
    finally:
        for server in servers.values():
            _stop_gracefully(server)
    records = Ledger.open(default_url(work / "on"), migrate=False)  # the graceful stop wrote every record
    try:
        recorded = records.count()
    finally:
        records.close()
    with_ledger, without = statistics.mean(phases["ledger"]), statistics.mean(phases["no_ledger"])
    return {
        "tokens_per_s": phases,
        "mean_with_ledger": round(with_ledger, 2),
        "mean_without_ledger": round(without, 2),
        "ratio": round(with_ledger / without, 4),
        "requests_sent": (args.rounds + 1) * args.requests,
        "records_written": recorded,
        "errors": errors,
        "concurrency": 8,
        "requests_per_phase": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
    }


def _fill(url: str, count: int) -> None:
    """``count`` records spread over the last 30 days, written in batches as the writer would."""
    ledger = Ledger.open(url)
    start = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=30) / count
    try:
        for first in range(0, count, 5000):
            ledger.insert_many(
                UsageRecord(
                    request_id=f"bench-{number}",
                    tenant=f"tenant-{number % 5}",
                    key_id="k1",
                    model=MODEL,
                    endpoint="chat.completions",
                    started_at=start + step * number,
                    prompt_tokens=200,
                    cached_tokens=50,
                    completion_tokens=100,
                    queue_seconds=0.01,
                    ttft_seconds=0.1,
                    total_seconds=2.0,
                    engine_seconds=0.5,
                    finish_reason="stop",
                    status=200,
                )
                for number in range(first, min(first + 5000, count))
            )
    finally:
        ledger.close()


def restore(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="llmserve-bench-restore-"))
    old_state, new_state = work / "old" / "state", work / "new" / "state"
    _fill(default_url(old_state), args.records)
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMSERVE_")}
    backup = subprocess.run(
        [LLMSERVE, "backup", "--dir", str(work / "backups")],
        env={**env, "LLMSERVE_STATE_DIR": str(old_state)},
        capture_output=True,
        text=True,
        check=True,
    )
    backup_file = Path(backup.stdout.strip().splitlines()[-1])
    new_state.mkdir(parents=True)
    started = time.perf_counter()
    restored = subprocess.run(
        [LLMSERVE, "restore", str(backup_file)],
        env={**env, "LLMSERVE_STATE_DIR": str(new_state)},
        capture_output=True,
        text=True,
        check=True,
    )
    restore_s = time.perf_counter() - started
    # A fresh cache directory, as on a new host: the embedded model is assembled and its sha256 checked.
    server = _server("restored", args.port, new_state, args.out.with_suffix(".log"), cache_dir=str(work / "cache"))
    try:
        server.start()
        serve_s = server.wait_ready(timeout_s=300)
        total_s = time.perf_counter() - started
    finally:
        server.stop()
    return {
        "records": args.records,
        "backup_bytes": backup_file.stat().st_size,
        "restore_s": round(restore_s, 2),
        "serve_until_ready_s": round(serve_s, 2),
        "total_s": round(total_s, 2),
        "restore_output": restored.stdout.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("overhead", help="throughput with and without the ledger")
    load.add_argument("--rounds", type=int, default=4)
    load.add_argument("--requests", type=int, default=48, help="requests per load phase")
    load.add_argument("--max-tokens", type=int, default=64)
    drill = commands.add_parser("restore", help="time from a backup file to a ready server")
    drill.add_argument("--records", type=int, default=100_000)
    for command in (load, drill):
        command.add_argument("--port", type=int, default=8083)
        command.add_argument("--out", type=Path, default=REPO_ROOT / ".bench" / "ledger.json")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = overhead(args) if args.command == "overhead" else restore(args)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if result.get("errors", 0) == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
