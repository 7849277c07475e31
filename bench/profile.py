"""Where a worker's time goes under streaming load: py-spy samples of the engine thread and the hub.

Starts our server (one worker, ``--parallel`` slots), drives ``--concurrency`` streams of the given case
with the load generator, and records the worker with ``py-spy record --native --threads`` meanwhile.
Sampling native stacks pauses the process briefly at each sample, so absolute speeds drop while it
records; the shares are what to read. Each thread's samples are split into the buckets below by the
innermost frame that matches, and printed
as shares of that thread's wall time (idle: waiting, not on a CPU)::

    .venv/bin/python bench/profile.py --endpoint chat --sampling t1 --concurrency 8 --seconds 20

Needs ``py-spy`` (``pip install py-spy``) and root or ptrace rights.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil
from compare import SAMPLINGS, default_model_path
from loadgen import LoadConfig, discover_model, run_load
from servers import ManagedServer, ServerSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
# (bucket, substring of a frame) in priority order: the first frame of a stack, innermost first, that
# contains one of these names the sample's bucket.
BUCKETS = (
    ("decode (llama_decode)", "llama_decode"),
    ("sampling", "sampling.py"),
    ("sampling", "distribution.py"),
    ("grammar", "grammar.py"),
    ("logprobs", "token_logprob"),
    ("token text (detokenize)", "detokenize"),
    ("token text (detokenize)", "token_to_piece"),
    ("chat template", "chat_template"),
    ("SSE and JSON", "sse.py"),
    ("SSE and JSON", "json"),
    ("request parsing", "pydantic"),
    ("idle", "_queue"),
    ("idle", "epoll"),
    ("idle", "hub.py"),
    ("idle", "switch"),
)


def classify(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for bucket, needle in BUCKETS:
            if needle in frame:
                return bucket
    return "other Python"


def worker_pid(leader: int) -> int:
    """The gunicorn worker among the server's processes: the one holding the model (the largest)."""
    processes = psutil.Process(leader).children(recursive=True)
    if not processes:
        raise SystemExit("profile: the server has no worker yet")
    return max(processes, key=lambda p: p.memory_info().rss).pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--sampling", choices=tuple(SAMPLINGS), default="t1")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8083)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    env = {
        "LLMSERVE_PORT": str(args.port),
        "LLMSERVE_MODEL__PATH": default_model_path(),
        "LLMSERVE_MODEL__PARALLEL": str(args.parallel),
        "LLMSERVE_MODEL__THREADS": str(args.threads),
        "LLMSERVE_MODEL__CONTEXT_LENGTH": "1024",
    }
    out = Path(tempfile.mkdtemp(prefix="llmserve-profile-"))
    spec = ServerSpec(
        name="llmserve",
        argv=[str(REPO_ROOT / ".venv" / "bin" / "llmserve"), "serve"],
        base_url=f"http://127.0.0.1:{args.port}",
        health_path="/readyz",
        log_path=out / "server.log",
        env=env,
    )
    with ManagedServer(spec) as server:
        server.wait_ready(300)
        assert server.pgid is not None
        pid = worker_pid(server.pgid)
        load = LoadConfig(
            base_url=spec.base_url,
            model=discover_model(spec.base_url),
            concurrency=args.concurrency,
            total_requests=100_000,
            max_tokens=args.max_tokens,
            endpoint=args.endpoint,
            sampling=SAMPLINGS[args.sampling],
            health_path="/healthz",
            max_wall_s=args.seconds + 10,
        )
        outcome: dict[str, Any] = {}
        loader = threading.Thread(target=lambda: outcome.update(run_load(load)), daemon=True)
        loader.start()
        raw = out / "profile.txt"
        recorded = subprocess.run(
            [
                py_spy,
                "record",
                "--native",
                "--threads",
                "--idle",
                "--rate",
                "100",
                "--duration",
                str(args.seconds),
                "--format",
                "raw",
                "--output",
                str(raw),
                "--pid",
                str(pid),
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        if not raw.exists():
            raise SystemExit(f"profile: py-spy recorded nothing: {recorded.stderr.strip()[-500:]}")
        loader.join(timeout=60)
    print(f"load: {outcome.get('requests_ok')} requests completed, errors: {outcome.get('error_samples')}")
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, _, frames = stack.partition(";")
        per_thread[thread][classify(frames)] += int(count)
    print(f"{args.endpoint}:{args.sampling} at {args.concurrency} streams, {args.seconds}s, worker {pid}")
    for thread, buckets in sorted(per_thread.items(), key=lambda item: -sum(item[1].values())):
        total = sum(buckets.values())
        busy = total - buckets["idle"]
        if busy < 0.02 * total:
            continue  # a helper thread that only waited
        shares = ", ".join(f"{name} {count / total:.0%}" for name, count in buckets.most_common())
        of_busy = ", ".join(f"{name} {count / busy:.0%}" for name, count in buckets.most_common() if name != "idle")
        print(f"  {thread}: {shares}\n    of its busy time: {of_busy}")
    print(f"raw samples: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
