"""Cold start and warm standby: how long a new instance takes to serve, and how long a standby one does.

1. **Cold start** (the real models): from ``llmserve serve`` to ``/readyz`` 200 (models loaded and warmed
   up), polled every 0.25 s: Gemma alone with the cache directory already holding its assembled GGUF and
   remembered hash (a restarted host), Gemma with an empty cache directory (a new host: the GGUF is
   assembled from its package and hashed), and both embedded models with a warm cache.
2. **Warm standby** (SIMULATED backend, two instances behind the shipped HAProxy configuration, one
   started with ``standby = true``): from ``POST /v1/admin/activate`` to HAProxy marking it UP, and to
   the first request it serves through the balancer.

    .venv/bin/python bench/coldstart.py --runs 3 --out docs/benchmark-coldstart.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from tests.integration.conftest import MODEL, start_server, stop_server
from tests.integration.fleet import balanced, instances, simulated_config, start_haproxy, stream

CASES = {
    "gemma, warm cache (a restart)": ("warm", f"[model]\nembedded = '{MODEL}'\n"),
    "gemma, empty cache (a new host)": ("empty", f"[model]\nembedded = '{MODEL}'\n"),
    "both embedded models, warm cache": ("warm", None),
}


def seconds_to_ready(config: str | None, cache: Path) -> float:
    with tempfile.TemporaryDirectory() as directory:
        started = time.monotonic()
        server = start_server(Path(directory), config, cache_dir=str(cache))
        ready = time.monotonic() - started
        stop_server(server)
    return ready


def cold_starts(runs: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as warm_cache:
        seconds_to_ready(None, Path(warm_cache))  # fills the warm cache: both models assembled and hashed
        for case, (cache, config) in CASES.items():
            times = []
            for _ in range(runs):
                if cache == "warm":
                    times.append(seconds_to_ready(config, Path(warm_cache)))
                else:
                    with tempfile.TemporaryDirectory() as empty:
                        times.append(seconds_to_ready(config, Path(empty)))
            results[case] = {"seconds": [round(t, 2) for t in times], "median": round(statistics.median(times), 2)}
    return results


def activations(runs: int) -> dict[str, Any]:
    up, served = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as directory:
            base = Path(directory)
            members = instances(base, 2, agent=True, config=simulated_config())
            members[1].settings["standby"] = "true"
            with balanced(base, members, start_haproxy) as proxy:
                assert proxy.wait_for_servers(lambda rows: rows["llmserve2"]["status"].startswith("DRAIN"))
                standby = members[1].server
                assert standby is not None
                before = int(proxy.servers()["llmserve2"]["stot"])
                started = time.monotonic()
                httpx.post(f"{standby.url}/v1/admin/activate", timeout=5).raise_for_status()
                assert proxy.wait_for_servers(lambda rows: rows["llmserve2"]["status"] == "UP", timeout=30)
                up.append(time.monotonic() - started)
                while int(proxy.servers()["llmserve2"]["stot"]) == before:  # more than one instance's slots
                    with ThreadPoolExecutor(6) as pool:
                        list(pool.map(lambda _: stream(proxy.url, 8), range(6)))
                served.append(time.monotonic() - started)
    return {
        "backend": "SIMULATED",
        "seconds_to_up": [round(t, 2) for t in up],
        "seconds_to_first_request": [round(t, 2) for t in served],
        "median_to_up": round(statistics.median(up), 2),
        "median_to_first_request": round(statistics.median(served), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmark-coldstart.json"))
    args = parser.parse_args()
    report = {"cold_start": cold_starts(args.runs), "standby_activation": activations(args.runs)}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
