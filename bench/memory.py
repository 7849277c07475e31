"""Does the server's memory stay flat under sustained traffic?

Starts our server, sends a first batch of requests, reads the resident size of its process group, sends
many more, and reads it again. A leak per request (token buffers, streams, samplers, per-request
objects kept alive) shows as growth between the two readings. Example::

    .venv/bin/python bench/memory.py --first 200 --total 2000 --out .bench/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from loadgen import LoadConfig, run_load
from servers import ManagedServer, ServerSpec

REPO_ROOT = Path(__file__).resolve().parent.parent


def group_rss_bytes(pgid: int, field: str = "VmRSS") -> int:
    """Resident set size summed over every process of a process group (gunicorn master + workers).

    ``field`` picks the kind from /proc/PID/status: ``VmRSS`` (all of it), ``RssAnon`` (heap and other
    private memory, where a leak shows) or ``RssFile`` (pages of mapped files, the GGUF among them: they
    grow as traffic touches more of the model, are shared between workers and reclaimable).
    """
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # field 5 of stat, after pid and comm: the process group
                continue
            status = (entry / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith(f"{field}:"):
                total += int(line.split()[1]) * 1024
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first", type=int, default=200, help="requests before the first reading")
    parser.add_argument("--total", type=int, default=2000, help="requests before the second reading")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".bench" / "memory.json")
    args = parser.parse_args(argv)

    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "LLMSERVE_PORT": str(args.port), "LLMSERVE_MODEL__PARALLEL": str(args.concurrency)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    spec = ServerSpec(
        name="llmserve",
        argv=[str(REPO_ROOT / ".venv" / "bin" / "llmserve"), "serve"],
        base_url=url,
        health_path="/readyz",
        log_path=args.out.with_suffix(".log"),
        env=env,
    )
    load = LoadConfig(
        base_url=url,
        model="gemma-3-270m",
        concurrency=args.concurrency,
        total_requests=args.first,
        max_tokens=args.max_tokens,
        unique_prompts=True,
        health_path="/healthz",
    )
    with ManagedServer(spec) as server:
        server.wait_ready(timeout_s=180)
        assert server.pgid is not None
        started = group_rss_bytes(server.pgid)
        first = run_load(load)
        after_first = group_rss_bytes(server.pgid)
        rest = run_load(replace(load, total_requests=args.total - args.first))
        after_total = group_rss_bytes(server.pgid)
    result: dict[str, Any] = {
        "rss_mib_after_start": round(started / 2**20, 1),
        f"rss_mib_after_{args.first}": round(after_first / 2**20, 1),
        f"rss_mib_after_{args.total}": round(after_total / 2**20, 1),
        "growth_ratio": round(after_total / after_first, 4),
        "errors": first["errors"] + rest["errors"],
        "requests": args.total,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
    }
    args.out.write_text(json.dumps(result, indent=2))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
