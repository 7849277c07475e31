"""What resumable streams cost, and whether long streams survive the shipped balancer configurations.

1. **Cost** (the real model): 8 concurrent streamed completions on one server, rounds alternating (in
   both orders, after a warm-up round) plain streams and resumable ones (``X-Stream-Resumable: true``:
   every event also written to the stream's journal); tokens/s of each arm and their ratio. Also the
   journal's bytes per token.
2. **Long streams through the balancers** (the simulated backend, SIMULATED step times, so that a
   stream lasts ``--long-seconds`` on two cores): two instances behind the shipped HAProxy and nginx
   configurations; half the streams plain, half resumable with a client that resumes after any cut;
   how many of each completed.

    .venv/bin/python bench/resumable.py --rounds 10 --out docs/benchmark-resumable.json  # and its .png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import LoadConfig, run_load
from tests.integration.conftest import start_server, stop_server
from tests.integration.fleet import (
    FLEET_MODEL,
    instances,
    running,
    simulated_config,
    start_haproxy,
    start_nginx,
    stream,
)
from tests.integration.resumable_client import follow

RESUMABLE = {"X-Stream-Resumable": "true"}


def cost(rounds: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Plain against resumable streams on one real server, alternating."""
    with tempfile.TemporaryDirectory() as directory:
        config = f"[model]\nparallel = {concurrency}\ncontext_length = {concurrency * 512}\n"
        server = start_server(Path(directory), config)
        try:
            arms: dict[str, list[float]] = {"plain": [], "resumable": []}
            order = [("plain", {}), ("resumable", RESUMABLE)]
            for number in range(rounds + 1):  # the first round warms the server up and is not counted
                for arm, headers in order if number % 2 else order[::-1]:
                    load = LoadConfig(
                        base_url=server.url,
                        model="gemma-3-270m",
                        concurrency=concurrency,
                        requests_per_worker=2,
                        max_tokens=max_tokens,
                        headers=headers,
                    )
                    result = run_load(load)
                    if result["errors"] or result["short_responses"]:
                        raise RuntimeError(f"{arm}: {result['errors']} errors: {result['error_samples']}")
                    if number:
                        arms[arm].append(result["tokens_per_s"])
            journals = list((server.state_dir / "streams").glob("*.sse"))
            journal_bytes = sum(path.stat().st_size for path in journals)
        finally:
            stop_server(server)
    plain, resumable = statistics.median(arms["plain"]), statistics.median(arms["resumable"])
    paired = [later / earlier for earlier, later in zip(arms["plain"], arms["resumable"], strict=True)]
    return {
        "model": "gemma-3-270m (real)",
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "rounds": arms,
        "plain_tokens_per_s": plain,
        "resumable_tokens_per_s": resumable,
        "ratio_of_medians": round(resumable / plain, 4),
        "median_paired_ratio": round(statistics.median(paired), 4),  # each round's two arms ran back to back
        "journals": len(journals),
        "journal_bytes_per_token": round(journal_bytes / (len(journals) * max_tokens), 1) if journals else None,
    }


def long_streams(streams: int, seconds: float) -> dict[str, Any]:
    """Streams of ``seconds`` through the shipped HAProxy and nginx configurations (SIMULATED backend)."""
    step = 0.2
    tokens = int(seconds / step)
    config = simulated_config(step_seconds=step, parallel=streams)
    results: dict[str, Any] = {"backend": "SIMULATED", "seconds": seconds, "tokens": tokens, "balancers": {}}
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        fleet = instances(base, 2, agent=True, config=config)
        with running(fleet):
            for name, start in (("haproxy", start_haproxy), ("nginx", start_nginx)):
                home = base / name
                home.mkdir()
                balancer = start(home, fleet)
                try:
                    results["balancers"][name] = _through(balancer.url, streams, tokens)
                finally:
                    balancer.stop()
    return results


def _through(url: str, streams: int, tokens: int) -> dict[str, Any]:
    plain: list[bool] = []
    resumed: list[tuple[bool, int]] = []
    body = {"model": FLEET_MODEL, "prompt": "Tell me about fleets.", "max_tokens": tokens, "stream": True}

    def plain_client() -> None:
        plain.append(stream(url, tokens, timeout=tokens).finished)

    def resumable_client() -> None:
        try:
            read, resumes = follow(url, "/v1/completions", body, {}, timeout=tokens)
            resumed.append((read.events.get(read.last) == "[DONE]", resumes))
        except Exception:  # the outcome is what is measured: a failed stream counts as not completed
            resumed.append((False, 0))

    started = time.monotonic()
    clients = [threading.Thread(target=plain_client) for _ in range(streams // 2)]
    clients += [threading.Thread(target=resumable_client) for _ in range(streams - streams // 2)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    return {
        "wall_seconds": round(time.monotonic() - started, 1),
        "plain_completed": f"{sum(plain)}/{len(plain)}",
        "resumable_completed": f"{sum(done for done, _ in resumed)}/{len(resumed)}",
        "resumes": sum(resumes for _, resumes in resumed),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Tokens/s of each round, plain against resumable (real model), and the long streams' outcomes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rounds_axis, long_axis) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    cost = report["cost"]
    for offset, arm in ((-0.2, "plain"), (0.2, "resumable")):
        values = cost["rounds"][arm]
        rounds_axis.bar([i + 1 + offset for i in range(len(values))], values, width=0.4, label=arm)
    rounds_axis.set_xlabel("round (the two arms back to back, in alternating order)")
    rounds_axis.set_ylabel("tokens/s, 8 streams")
    rounds_axis.set_title(f"real model: resumable/plain, median of rounds {cost['median_paired_ratio']:.3f}")
    rounds_axis.legend()
    balancers = report["long_streams"]["balancers"]
    names = list(balancers)
    for offset, key in ((-0.2, "plain_completed"), (0.2, "resumable_completed")):
        shares = [int(balancers[n][key].split("/")[0]) / int(balancers[n][key].split("/")[1]) for n in names]
        long_axis.bar([i + offset for i in range(len(names))], shares, width=0.4, label=key.split("_")[0])
    long_axis.set_xticks(range(len(names)), names)
    long_axis.set_ylim(0, 1.1)
    long_axis.set_ylabel("share of streams completed")
    long_axis.set_title(f"{report['long_streams']['seconds']:.0f} s streams (SIMULATED backend)")
    long_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--long-seconds", type=float, default=120.0)
    parser.add_argument("--long-streams", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmark-resumable.json"))
    parser.add_argument("--plot-only", action="store_true", help="only plot the results --out holds")
    args = parser.parse_args()
    if args.plot_only:
        report = json.loads(args.out.read_text())
    else:
        report = {
            "cost": cost(args.rounds, args.concurrency, args.max_tokens),
            "long_streams": long_streams(args.long_streams, args.long_seconds),
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
