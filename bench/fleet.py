"""Fleet balancing: HAProxy roundrobin vs leastconn vs the shipped agent-check configuration, side by side.

SIMULATED replicas (all scenarios but ``real``): each is the real llmserve server (gunicorn, engine
loop, scheduler, SSE) on the simulated backend, whose decode sleeps for a modelled step time instead
of running llama.cpp, so that four replicas fit on a small machine. The figures therefore measure
balancing, not a model's speed.

Each arm starts HAProxy from deploy/haproxy/haproxy.cfg (the same helper the fleet tests use). The
roundrobin and leastconn arms are that file as commonly deployed: the balance line changed, no agent
check and no per-server maxconn (every request goes straight to a replica, which queues it). The agent
arm is the file as shipped. The same seeded workload is sent to each: Poisson arrivals at a share of
the fleet's capacity, streamed; TTFT, inter-token gaps, the share of requests each replica got, the
most it held at once, and the prefix-cache hit ratio are reported. Scenarios:

- ``balance``: 4 equal replicas, 90% short answers and 10% of 1,000 tokens; roundrobin, leastconn, agent.
- ``slow``: the same with one replica three times slower; leastconn and agent.
- ``affinity``: 8 sessions, each with its own long system prompt, sent with the session as ``user``;
  roundrobin and the shipped affinity backend (consistent hashing with a bounded load).
- ``real``: a smoke figure with 2 real replicas of the embedded Gemma (llama.cpp, one thread each);
  leastconn and agent::

    .venv/bin/python bench/fleet.py balance --load 0.7 0.9 --requests 2000 --json docs/benchmark-fleet.json
    .venv/bin/python bench/fleet.py slow --load 0.9 --requests 1000 --json docs/benchmark-fleet-slow.json
    .venv/bin/python bench/fleet.py affinity --load 0.3 --requests 400 --json docs/benchmark-fleet-affinity.json
    .venv/bin/python bench/fleet.py real --load 0.5 --requests 200 --json docs/benchmark-fleet-real.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadgen import LoadConfig, RequestResult, percentile, stream_completion
from tests.integration.fleet import FLEET_MODEL, SHIPPED_HAPROXY, HAProxy, Instance, instances, running, start_haproxy

ARMS = {
    "balance": ("roundrobin", "leastconn", "agent"),
    "slow": ("leastconn", "agent"),
    "affinity": ("roundrobin", "affinity"),
    "real": ("leastconn", "agent"),
}
SHIPPED_ARMS = ("agent", "affinity")  # the file as shipped; the others as commonly deployed


@dataclasses.dataclass(frozen=True)
class Workload:
    backend: str = "simulated"  # "llama.cpp": real replicas of the embedded model, for a smoke figure
    embedded: str = "smollm2-135m-instruct"
    replicas: int = 4
    slots: int = 4
    step_seconds: float = 0.008
    sequence_seconds: float = 0.004
    prompt_token_seconds: float = 0.00005
    short_tokens: int = 24
    long_tokens: int = 1000
    long_share: float = 0.1
    slow_factor: float = 1.0  # the first replica's step times are this many times longer
    sessions: int = 0  # with sessions: each request names one (``user``) and starts with its system prompt
    system_prompt_words: int = 300

    @property
    def mean_tokens(self) -> float:
        return (1 - self.long_share) * self.short_tokens + self.long_share * self.long_tokens

    @property
    def capacity(self) -> float:
        """Requests per second the fleet finishes with every slot busy (decode only)."""
        step = self.step_seconds + self.sequence_seconds * self.slots
        replicas = self.replicas - 1 + 1 / self.slow_factor
        return replicas * self.slots / step / self.mean_tokens

    def config(self, factor: float = 1.0) -> str:
        simulation = (
            f"simulation = {{ step_seconds = {self.step_seconds * factor}, "
            f"sequence_seconds = {self.sequence_seconds * factor}, "
            f"prompt_token_seconds = {self.prompt_token_seconds * factor} }}"
        )
        return f"""
[model]
backend = "{self.backend}"
parallel = {self.slots}
context_length = 2048
threads = 1
embeddings = false
{simulation if self.backend == "simulated" else ""}

[models.{FLEET_MODEL}]
embedded = "{self.embedded}"
"""


SCENARIOS = {
    "balance": Workload(),
    "slow": Workload(slow_factor=3.0),
    "affinity": Workload(sessions=8, long_share=0.0, prompt_token_seconds=0.0016),
    # Two real replicas of the embedded Gemma, one thread each; step times as docs/calibration-gemma.json
    # measured them (two threads), so the capacity below is only a guide.
    "real": Workload(
        backend="llama.cpp",
        embedded="gemma-3-270m",
        replicas=2,
        step_seconds=0.0128,
        sequence_seconds=0.0084,
        prompt_token_seconds=0.0034,
        long_tokens=200,
    ),
}


def arm_config(arm: str, shipped: str) -> str:
    """The shipped HAProxy file for ``arm``: as shipped for the agent and affinity arms, else plain
    roundrobin or leastconn: no agent check, no per-server maxconn, no session routing."""
    if arm in SHIPPED_ARMS:
        return shipped
    plain = re.sub(r"(?m)^    balance leastconn$", f"    balance {arm}", shipped)
    plain = re.sub(r"(?m)^    use_backend llmserve_affinity .*\n", "", plain)
    return re.sub(r" agent-check agent-inter \S+ agent-send \S+| maxconn \d+", "", plain)


def engine_counts(fleet: list[Instance]) -> list[tuple[int, int]]:
    """Each replica's (computed, cached) prompt tokens so far."""
    counts = []
    for member in fleet:
        assert member.server is not None
        stats = member.server.engine_stats(FLEET_MODEL)
        counts.append((stats["prompt_tokens"], stats["cached_prompt_tokens"]))
    return counts


def run_arm(
    arm: str, fleet: list[Instance], directory: Path, work: Workload, rate: float, count: int, seed: int
) -> dict[str, Any]:
    directory.mkdir(parents=True)
    proxy = start_haproxy(directory, fleet, arm_config(arm, SHIPPED_HAPROXY.read_text()))
    try:
        up = proxy.wait_for_servers(lambda s: len(s) == work.replicas and all(r["status"] == "UP" for r in s.values()))
        assert up, proxy.servers()
        time.sleep(12)  # past slowstart, so that every arm starts at full weight
        before, tokens_before = totals(proxy), engine_counts(fleet)
        results = send(proxy.url, work, rate, count, seed)
        after, tokens_after = totals(proxy), engine_counts(fleet)
        sent = {name: after[name][0] - before[name][0] for name in after}
        held = {name: after[name][1] for name in after}
        computed = sum(a[0] - b[0] for a, b in zip(tokens_after, tokens_before, strict=True))
        cached = sum(a[1] - b[1] for a, b in zip(tokens_after, tokens_before, strict=True))
        run = summarize(arm, results, sent, held)
        run["prefix_hit_ratio"] = round(cached / (cached + computed), 3) if cached + computed else None
        return run
    finally:
        proxy.stop()


def totals(proxy: HAProxy) -> dict[str, tuple[int, int]]:
    """Each server's requests sent (``stot``) and most held at once (``smax``), over both backends."""
    rows = [*proxy.servers("llmserve").values(), *proxy.servers("llmserve_affinity").values()]
    result: dict[str, tuple[int, int]] = {}
    for row in rows:
        sent, held = result.get(row["svname"], (0, 0))
        result[row["svname"]] = (sent + int(row["stot"]), max(held, int(row["smax"])))
    return result


def system_prompt(session: int, words: int) -> str:
    """A long system prompt of its own for each session (no prefix shared between sessions)."""
    rng = random.Random(session)
    vocabulary = ["fleet", "replica", "balancer", "session", "prefix", "cache", "stream", "token", "slot", "queue"]
    return f"Session {session}: " + " ".join(rng.choice(vocabulary) for _ in range(words)) + "\nQuestion: "


def send(url: str, work: Workload, rate: float, count: int, seed: int) -> list[RequestResult]:
    """``count`` streamed completions at Poisson times of ``rate`` per second; long ones as the seed says."""
    rng = random.Random(seed)
    base = LoadConfig(base_url=url, model=FLEET_MODEL, prompt="Tell me about fleets.", request_deadline_s=600.0)
    if work.backend == "simulated":  # its text never ends early; Gemma's end-of-turn ids mean nothing to it
        base = dataclasses.replace(base, banned_token_ids=())
    abort = threading.Event()
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    futures: list[Future[RequestResult]] = []
    with httpx.Client(base_url=url, timeout=600, limits=limits) as client, ThreadPoolExecutor(300) as pool:
        start = time.perf_counter()
        due = 0.0
        for index in range(count):
            due += rng.expovariate(rate)
            tokens = work.long_tokens if rng.random() < work.long_share else work.short_tokens
            config = dataclasses.replace(base, max_tokens=tokens)
            if work.sessions:
                session = rng.randrange(work.sessions)
                prompt = system_prompt(session, work.system_prompt_words) + f"what is item {index}?"
                # build_payload spreads ``sampling`` into the body: the session goes along as ``user``.
                config = dataclasses.replace(
                    config, prompt=prompt, sampling={"temperature": 0.0, "user": f"s{session}"}
                )
            delay = start + due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(stream_completion, client, config, index, abort))
        return [future.result() for future in futures]


def summarize(arm: str, results: list[RequestResult], sent: dict[str, int], held: dict[str, int]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [gap for r in ok for gap in r.itls_s]

    def ms(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value * 1000, 1)

    total = sum(sent.values()) or 1
    return {
        "arm": arm,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "ttft_ms": {"p50": ms(ttft, 50), "p90": ms(ttft, 90), "p99": ms(ttft, 99)},
        "itl_ms": {"p50": ms(gaps, 50), "p99": ms(gaps, 99)},
        "share": {name: round(count / total, 3) for name, count in sorted(sent.items())},
        "max_held": held,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--load", type=float, nargs="+", default=[0.9], help="shares of the fleet's capacity")
    parser.add_argument("--requests", type=int, default=1000, help="per arm and load")
    parser.add_argument("--arms", nargs="+", help="default: every arm of the scenario")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = SCENARIOS[args.scenario]
    arms = args.arms or ARMS[args.scenario]
    directory = Path(tempfile.mkdtemp(prefix="llmserve-fleet-bench-"))
    fleet = instances(directory, work.replicas, agent=True, config=work.config(), graceful_timeout="5")
    fleet[0].config = work.config(work.slow_factor)
    runs = []
    with running(fleet):
        for load in args.load:
            rate = load * work.capacity
            for arm in arms:
                print(f"load {load:.0%} ({rate:.2f} req/s), {arm}: {args.requests} requests", flush=True)
                run = run_arm(arm, fleet, directory / f"{load}-{arm}", work, rate, args.requests, args.seed)
                run |= {"load": load, "rate": round(rate, 3)}
                print(json.dumps(run), flush=True)
                runs.append(run)
    report = {
        "simulated": work.backend == "simulated",
        "scenario": args.scenario,
        "workload": dataclasses.asdict(work),
        "capacity_rps": work.capacity,
        "runs": runs,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
