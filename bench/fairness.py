"""Fair sharing between tenants, measured on the real server: the noisy neighbour and the weighted split.

1. Noisy neighbour: tenant A keeps ``--flood`` streams in flight; tenant B sends one short request at a
   time. B's time to first token is measured alone and under A's load, on one server per policy:
   ``fair`` with A capped at ``parallel - 2`` running sequences (``max_running``), ``fair`` without a cap,
   and ``fifo``.
2. Weighted split: tenants C (weight 1) and D (weight 3) both keep ``--flood`` streams in flight; the
   tokens each receives in a ``--window`` second window are counted, for ``fair`` and for ``fifo``.
   Jain's index over weight-normalised service is 1.0 for a perfectly weighted split.

Each server starts fresh, one at a time, with its own state directory and keys.

    .venv/bin/python bench/fairness.py --out docs/benchmark-fairness.json --plot docs/benchmark-fairness.png
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadgen import BackgroundClients, LoadConfig, RequestResult, percentile, stream_completion
from servers import ManagedServer, ServerSpec

from llmserve.keys import KeyStore

LLMSERVE = str(Path(sys.executable).parent / "llmserve")
PORT = 8091
URL = f"http://127.0.0.1:{PORT}"
MODEL = "gemma-3-270m"
STAGGER = 0.25  # seconds between the start of one flooding client and the next


@contextmanager
def server(name: str, tenants: str, policy: str, args: argparse.Namespace) -> Iterator[dict[str, str]]:
    """A fresh server with the given tenants TOML; yields an API key per tenant."""
    with tempfile.TemporaryDirectory(prefix="llmserve-fairness-") as directory:
        root = Path(directory)
        (root / "llmserve.toml").write_text(tenants)
        store = KeyStore(root / "state")
        names = [line[len("[tenants.") : -1] for line in tenants.splitlines() if line.startswith("[tenants.")]
        keys = {tenant: store.create(tenant)[1] for tenant in names}
        env = {
            "LLMSERVE_CONFIG": str(root / "llmserve.toml"),
            "LLMSERVE_STATE_DIR": str(root / "state"),
            "LLMSERVE_PORT": str(PORT),
            "LLMSERVE_SCHEDULING": policy,
            "LLMSERVE_MODEL__PARALLEL": str(args.parallel),
            "LLMSERVE_MODEL__CONTEXT_LENGTH": "1024",
            "LLMSERVE_QUEUE_SIZE": "1000",
            "LLMSERVE_LOG_LEVEL": "warning",
        }
        spec = ServerSpec(name, [LLMSERVE, "serve"], URL, "/readyz", Path(args.logs) / f"{name}.log", env)
        managed = ManagedServer(spec)
        managed.start()
        try:
            managed.wait_ready(240)
            yield keys
        finally:
            managed.stop()


class Flood(BackgroundClients):
    """``streams`` clients of one tenant sending streamed completions back to back until stopped.

    Request lengths vary between half and one and a half times ``max_tokens`` (seeded), and the clients
    start a little apart: equal lengths started together would finish together and free every slot at
    the same moment, a lock-step no real workload has.
    """

    def __init__(self, key: str, streams: int, max_tokens: int) -> None:
        super().__init__(streams)
        self.config = LoadConfig(base_url=URL, model=MODEL, api_key=key, max_tokens=max_tokens, read_timeout_s=600)
        self.results: list[RequestResult] = []

    def _client(self, number: int) -> None:
        lengths = random.Random(number)
        if self.stopping.wait(number * STAGGER):
            return
        with httpx.Client(base_url=URL, timeout=600, headers={"Authorization": f"Bearer {self.config.api_key}"}) as c:
            index = 0
            while not self.stopping.is_set():
                base = self.config.max_tokens
                config = replace(self.config, max_tokens=lengths.randint(base // 2, base * 3 // 2))
                self.results.append(stream_completion(c, config, index, self.stopping))
                index += 1

    def tokens_between(self, start: float, end: float) -> int:
        return sum(1 for result in self.results for t in result.token_times() if start <= t < end)


def sequential_ttfts(key: str, count: int, max_tokens: int) -> list[float]:
    config = LoadConfig(base_url=URL, model=MODEL, api_key=key, max_tokens=max_tokens)
    never = threading.Event()
    ttfts = []
    with httpx.Client(base_url=URL, timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
        for index in range(count):
            result = stream_completion(client, config, index, never)
            if not result.ok or result.ttft_s is None:
                raise RuntimeError(f"request failed: {result.error}")
            ttfts.append(result.ttft_s)
    return ttfts


def ms_summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round((percentile(values, 50) or 0) * 1000, 1),
        "p99_ms": round((percentile(values, 99) or 0) * 1000, 1),
        "n": len(values),
    }


def noisy_neighbour(args: argparse.Namespace) -> list[dict[str, Any]]:
    cap = args.parallel - 2
    setups = [
        (f"fair, A max_running={cap}", "fair", f"[tenants.a]\nmax_running = {cap}\n[tenants.b]\n"),
        ("fair, no cap", "fair", "[tenants.a]\n[tenants.b]\n"),
        ("fifo", "fifo", "[tenants.a]\n[tenants.b]\n"),
    ]
    rows = []
    for label, policy, tenants in setups:
        with server(f"noisy-{policy}", tenants, policy, args) as keys:
            sequential_ttfts(keys["b"], 2, args.b_tokens)  # warm the path
            alone = sequential_ttfts(keys["b"], args.b_requests, args.b_tokens)
            with Flood(keys["a"], args.flood, args.flood_tokens):
                time.sleep(args.warmup)
                loaded = sequential_ttfts(keys["b"], args.b_requests, args.b_tokens)
        row = {"setup": label, "alone": ms_summary(alone), "under_load": ms_summary(loaded)}
        row["p50_ratio"] = round(row["under_load"]["p50_ms"] / row["alone"]["p50_ms"], 2)
        row["p99_ratio"] = round(row["under_load"]["p99_ms"] / row["alone"]["p99_ms"], 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def weighted_split(args: argparse.Namespace) -> list[dict[str, Any]]:
    tenants = "[tenants.c]\nweight = 1\n[tenants.d]\nweight = 3\n"
    rows = []
    for policy in ("fair", "fifo"):
        with server(f"weights-{policy}", tenants, policy, args) as keys:
            with (
                Flood(keys["c"], args.flood, args.flood_tokens) as c,
                Flood(keys["d"], args.flood, args.flood_tokens) as d,
            ):
                start = time.perf_counter() + args.warmup
                end = start + args.window
                time.sleep(end - time.perf_counter())
            served = {"c": c.tokens_between(start, end), "d": d.tokens_between(start, end)}
        normalised = [served["c"] / 1, served["d"] / 3]
        row = {
            "policy": policy,
            "window_s": args.window,
            "tokens": served,
            "ratio_d_to_c": round(served["d"] / max(served["c"], 1), 2),
            "jain_weighted": round(jain(normalised), 3),
            "tokens_per_s": round((served["c"] + served["d"]) / args.window, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = data["noisy_neighbour"]
    labels = [row["setup"] for row in rows]
    x = range(len(rows))
    width = 0.2
    for offset, (phase, stat, name) in enumerate(
        [
            ("alone", "p50_ms", "alone p50"),
            ("alone", "p99_ms", "alone p99"),
            ("under_load", "p50_ms", "under load p50"),
            ("under_load", "p99_ms", "under load p99"),
        ]
    ):
        left.bar([i + (offset - 1.5) * width for i in x], [row[phase][stat] for row in rows], width, label=name)
    left.set_xticks(list(x), labels)
    left.set_yscale("log")
    left.set_ylabel("tenant B time to first token (ms, log)")
    left.set_title(f"Noisy neighbour: A keeps {data['args']['flood']} streams in flight")
    left.legend(fontsize=8)
    split = data["weighted_split"]
    policies = [row["policy"] for row in split]
    right.bar(policies, [row["tokens"]["c"] for row in split], label="C (weight 1)")
    right.bar(
        policies,
        [row["tokens"]["d"] for row in split],
        bottom=[row["tokens"]["c"] for row in split],
        label="D (weight 3)",
    )
    for i, row in enumerate(split):
        right.text(
            i,
            row["tokens"]["c"] + row["tokens"]["d"],
            f"D:C = {row['ratio_d_to_c']}\nJain {row['jain_weighted']}",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    right.set_ylabel(f"tokens received in {data['args']['window']} s")
    right.set_title("Weighted split, both tenants backlogged (target D:C = 3)")
    right.legend(fontsize=8)
    right.set_ylim(0, max(r["tokens"]["c"] + r["tokens"]["d"] for r in split) * 1.25)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", type=int, default=8, help="sequence slots")
    parser.add_argument("--flood", type=int, default=16, help="streams a flooding tenant keeps in flight")
    parser.add_argument("--flood-tokens", type=int, default=64, help="max_tokens of each flooding request")
    parser.add_argument("--b-requests", type=int, default=20, help="B's sequential requests per phase")
    parser.add_argument("--b-tokens", type=int, default=8, help="max_tokens of B's requests")
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds of flood before measuring")
    parser.add_argument("--window", type=float, default=60.0, help="seconds the weighted split is counted")
    parser.add_argument("--logs", default=".bench/logs", help="server logs")
    parser.add_argument("--only", choices=("noisy", "weights"), help="run one scenario, keep the other from --out")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--plot", type=Path, help="PNG plot")
    args = parser.parse_args()
    data = json.loads(args.out.read_text()) if args.only else {}
    data["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.only != "weights":
        data["noisy_neighbour"] = noisy_neighbour(args)
    if args.only != "noisy":
        data["weighted_split"] = weighted_split(args)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    if args.plot:
        plot(data, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
