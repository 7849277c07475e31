"""Closed-loop streaming load generator for OpenAI-compatible completion servers.

C worker threads each hold one HTTP connection and send streaming
``POST /v1/completions`` (or ``/v1/chat/completions``, the prompt as one user
message) requests back to back until a shared request budget
is spent, while a separate thread probes the health endpoint. End-of-generation
tokens are banned through ``logit_bias`` so every response is exactly
``max_tokens`` long and different servers do identical amounts of work.

Plain threads are used on purpose: the per-chunk work is one line split, one
``json.loads`` and two clock reads, so the client stays cheap next to the
server on a small machine.

Usable as a library (``run_load(LoadConfig(...))``) or a CLI::

    python bench/loadgen.py --url http://127.0.0.1:8080 --concurrency 4 \\
        --requests-per-worker 4 --max-tokens 64 --health-path /health
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Self

import httpx

# Gemma 3: <eos> = 1, <end_of_turn> = 106.
DEFAULT_BANNED_TOKEN_IDS: tuple[int, ...] = (1, 106)
DEFAULT_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who discovers a "
    "message in a bottle. Describe the sea, the weather and the island."
)
# OpenAI semantics: -100 effectively bans a token.
BAN_BIAS = -100


@dataclass(frozen=True)
class LoadConfig:
    """One load phase: what to send, how hard, and where to probe health."""

    base_url: str
    model: str = ""
    concurrency: int = 1
    requests_per_worker: int = 4
    total_requests: int | None = None
    prompt: str = DEFAULT_PROMPT
    max_tokens: int = 64
    endpoint: str = "completions"  # or "chat"
    # Sampling fields sent as they are; a server's own defaults apply to any left out.
    sampling: dict[str, float] = field(default_factory=lambda: {"temperature": 0.0})
    banned_token_ids: tuple[int, ...] = DEFAULT_BANNED_TOKEN_IDS
    unique_prompts: bool = False
    health_path: str = "/healthz"
    health_interval_s: float = 0.1
    health_timeout_s: float = 5.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0
    request_deadline_s: float = 600.0
    max_wall_s: float = 3600.0
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (X-Stream-Resumable)

    def n_requests(self) -> int:
        """Total requests in the phase (explicit total wins over per-worker)."""
        if self.total_requests is not None:
            return self.total_requests
        return self.concurrency * self.requests_per_worker


@dataclass
class RequestResult:
    """Timing of one streamed completion; times are seconds."""

    index: int
    ok: bool = False
    error: str | None = None
    started_s: float = 0.0  # time.perf_counter() when the request was sent
    ttft_s: float | None = None
    e2e_s: float | None = None
    content_chunks: int = 0
    usage_tokens: int | None = None
    itls_s: list[float] = field(default_factory=list)

    def token_times(self) -> list[float]:
        """perf_counter() time at which each content chunk arrived."""
        if self.ttft_s is None:
            return []
        times = [self.started_s + self.ttft_s]
        for gap in self.itls_s:
            times.append(times[-1] + gap)
        return times

    @property
    def tokens(self) -> int:
        """Generated tokens: the server's usage if reported, else content chunks."""
        return self.usage_tokens if self.usage_tokens is not None else self.content_chunks


@dataclass
class HealthSample:
    """One health probe: latency in seconds and whether it answered 200."""

    latency_s: float
    ok: bool


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _ms_stats(values_s: list[float]) -> dict[str, float | int | None]:
    """p50/p99/mean/max in milliseconds, rounded for readable JSON."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 3)

    return {
        "n": len(values_s),
        "p50": ms(percentile(values_s, 50)),
        "p99": ms(percentile(values_s, 99)),
        "mean": ms(sum(values_s) / len(values_s)) if values_s else None,
        "max": ms(max(values_s)) if values_s else None,
    }


def _headers(cfg: LoadConfig) -> dict[str, str]:
    return ({"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}) | cfg.headers


def build_payload(cfg: LoadConfig, index: int) -> dict[str, Any]:
    """Request body; a per-request prefix defeats prompt caching when asked."""
    prompt = f"[request {index}] {cfg.prompt}" if cfg.unique_prompts else cfg.prompt
    payload: dict[str, Any] = {
        "max_tokens": cfg.max_tokens,
        **cfg.sampling,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if cfg.model:
        payload["model"] = cfg.model
    if cfg.banned_token_ids:
        payload["logit_bias"] = {str(t): BAN_BIAS for t in cfg.banned_token_ids}
    return payload


class _Aborted(Exception):
    """Raised inside a stream when the phase is cancelled or over its deadline."""


def stream_completion(client: httpx.Client, cfg: LoadConfig, index: int, abort: threading.Event) -> RequestResult:
    """Send one streaming completion and time its content chunks."""
    res = RequestResult(index=index)
    payload = build_payload(cfg, index)
    # Bounded: a well-behaved server sends ~1 event per token plus a few extra.
    max_events = 4 * cfg.max_tokens + 64
    events = 0
    last: float | None = None
    t0 = res.started_s = time.perf_counter()
    try:
        path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
        with client.stream("POST", path, json=payload) as resp:
            if resp.status_code != 200:
                body = resp.read()[:300].decode("utf-8", "replace")
                res.error = f"HTTP {resp.status_code}: {body}"
                return res
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                if not data:  # keep-alive with an empty payload
                    continue
                events += 1
                if events > max_events:
                    raise _Aborted(f"more than {max_events} stream events")
                if now - t0 > cfg.request_deadline_s:
                    raise _Aborted(f"request exceeded {cfg.request_deadline_s}s")
                if abort.is_set():
                    raise _Aborted("load phase aborted")
                obj = json.loads(data)
                if "error" in obj:
                    res.error = f"stream error: {str(obj['error'])[:300]}"
                    return res
                choices = obj.get("choices")
                if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
                    if last is None:
                        res.ttft_s = now - t0
                    else:
                        res.itls_s.append(now - last)
                    last = now
                    res.content_chunks += 1
                usage = obj.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.usage_tokens = int(usage["completion_tokens"])
        res.e2e_s = time.perf_counter() - t0
        if res.content_chunks == 0:
            res.error = "stream ended without any content"
        else:
            res.ok = True
    except (_Aborted, httpx.HTTPError, json.JSONDecodeError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:400]
    return res


class BackgroundClients:
    """``count`` client threads running ``_client(number)`` from ``with`` until the block ends; subclasses
    check ``self.stopping`` between requests."""

    def __init__(self, count: int) -> None:
        self.stopping = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(count)]

    def _client(self, number: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=120)


class _RequestBudget:
    """Thread-safe countdown handing out request indices."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._next >= self._total:
                return None
            self._next += 1
            return self._next - 1


def _make_client(cfg: LoadConfig, *, keepalive: bool = True) -> httpx.Client:
    timeout = httpx.Timeout(connect=cfg.connect_timeout_s, read=cfg.read_timeout_s, write=30.0, pool=30.0)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1 if keepalive else 0)
    return httpx.Client(base_url=cfg.base_url.rstrip("/"), timeout=timeout, limits=limits, headers=_headers(cfg))


def _worker(
    cfg: LoadConfig,
    budget: _RequestBudget,
    results: list[RequestResult],
    start: threading.Barrier,
    abort: threading.Event,
) -> None:
    with _make_client(cfg) as client:
        try:
            start.wait(timeout=60)
        except threading.BrokenBarrierError:
            return
        while not abort.is_set():
            index = budget.take()
            if index is None:
                return
            results.append(stream_completion(client, cfg, index, abort))


def _poll_health(cfg: LoadConfig, samples: list[HealthSample], stop: threading.Event) -> None:
    """Probe health on a fresh connection each time, like an orchestrator would."""
    timeout = httpx.Timeout(cfg.health_timeout_s)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=0)
    url = cfg.base_url.rstrip("/") + cfg.health_path
    max_polls = int(cfg.max_wall_s / max(cfg.health_interval_s, 0.001)) + 1
    with httpx.Client(timeout=timeout, limits=limits, headers=_headers(cfg)) as client:
        for _ in range(max_polls):
            if stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                ok = client.get(url).status_code == 200
            except httpx.HTTPError:
                ok = False
            dt = time.perf_counter() - t0
            samples.append(HealthSample(latency_s=dt, ok=ok))
            stop.wait(max(0.0, cfg.health_interval_s - dt))


def summarize(
    cfg: LoadConfig,
    results: list[RequestResult],
    wall_s: float,
    health: list[HealthSample],
    *,
    aborted: bool = False,
    include_requests: bool = False,
) -> dict[str, Any]:
    """Aggregate per-request timings into the report dict."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.tokens for r in ok)
    itls = [x for r in ok for x in r.itls_s]
    report: dict[str, Any] = {
        "config": asdict(cfg) | {"api_key": "***" if cfg.api_key else None},
        "wall_s": round(wall_s, 4),
        "requests_sent": len(results),
        "requests_ok": len(ok),
        "errors": len(failed) + (cfg.n_requests() - len(results) if aborted else 0),
        "error_samples": sorted({r.error or "" for r in failed})[:5],
        "aborted": aborted,
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
        "usage_reported": sum(1 for r in ok if r.usage_tokens is not None),
        "short_responses": sum(1 for r in ok if r.tokens < cfg.max_tokens),
        "usage_vs_chunks_mismatch": sum(
            1 for r in ok if r.usage_tokens is not None and r.usage_tokens != r.content_chunks
        ),
        "ttft_ms": _ms_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": _ms_stats(itls),
        "e2e_ms": _ms_stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        "health_ms": _ms_stats([h.latency_s for h in health]),
        "health_polls": len(health),
        "health_errors": sum(1 for h in health if not h.ok),
    }
    if include_requests:
        report["requests"] = [
            {
                "index": r.index,
                "ok": r.ok,
                "error": r.error,
                "ttft_ms": None if r.ttft_s is None else round(r.ttft_s * 1000, 3),
                "e2e_ms": None if r.e2e_s is None else round(r.e2e_s * 1000, 3),
                "tokens": r.tokens,
                "usage_tokens": r.usage_tokens,
                "content_chunks": r.content_chunks,
            }
            for r in sorted(results, key=lambda r: r.index)
        ]
    return report


def run_load(cfg: LoadConfig, *, include_requests: bool = False) -> dict[str, Any]:
    """Run one closed-loop load phase and return its summary.

    Wall time runs from the moment all workers are released to the moment the
    last one finishes, so tokens/s covers exactly the load phase.
    """
    if cfg.concurrency < 1 or cfg.n_requests() < 1 or cfg.max_tokens < 1:
        raise ValueError("concurrency, request count and max_tokens must all be >= 1")
    budget = _RequestBudget(cfg.n_requests())
    results: list[RequestResult] = []
    health: list[HealthSample] = []
    abort = threading.Event()
    stop_health = threading.Event()
    start = threading.Barrier(cfg.concurrency + 1)
    workers = [
        threading.Thread(
            target=_worker,
            args=(cfg, budget, results, start, abort),
            daemon=True,
            name=f"loadgen-{i}",
        )
        for i in range(cfg.concurrency)
    ]
    poller = threading.Thread(target=_poll_health, args=(cfg, health, stop_health), daemon=True, name="loadgen-health")
    for w in workers:
        w.start()
    aborted = False
    try:
        start.wait(timeout=60)
        t_start = time.perf_counter()
        poller.start()
        deadline = t_start + cfg.max_wall_s
        for w in workers:
            # Short joins keep Ctrl-C responsive and the phase bounded.
            while w.is_alive() and time.perf_counter() < deadline:
                w.join(timeout=0.5)
        wall_s = time.perf_counter() - t_start
        if any(w.is_alive() for w in workers):
            aborted = True
            abort.set()
            for w in workers:
                w.join(timeout=cfg.read_timeout_s + 5)
    except BaseException:
        abort.set()
        start.abort()
        raise
    finally:
        stop_health.set()
        if poller.is_alive():
            poller.join(timeout=cfg.health_timeout_s + 1)
    return summarize(cfg, list(results), wall_s, list(health), aborted=aborted, include_requests=include_requests)


def discover_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """First model id from ``GET /v1/models``; empty string if none is listed."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=timeout_s, headers=headers)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    return str(data[0].get("id", "")) if data else ""


def parse_token_ids(text: str) -> tuple[int, ...]:
    """Parse '1,106' (empty string means: ban nothing)."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad token id list {text!r}: {exc}") from exc


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", default=None, help="model id (default: first of /v1/models)")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--requests-per-worker", type=int, default=4)
    p.add_argument("--total-requests", type=int, default=None, help="total requests (overrides --requests-per-worker)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument(
        "--ban-token-ids",
        type=parse_token_ids,
        default=DEFAULT_BANNED_TOKEN_IDS,
        help="comma-separated EOG token ids to ban (default: 1,106 for Gemma 3)",
    )
    p.add_argument(
        "--unique-prompts",
        action="store_true",
        help="prefix each prompt with its index to defeat prompt caching",
    )
    p.add_argument("--health-path", default="/healthz")
    p.add_argument("--health-interval-ms", type=float, default=100.0)
    p.add_argument("--read-timeout", type=float, default=120.0, help="max seconds between two stream reads")
    p.add_argument("--max-wall", type=float, default=3600.0, help="abort the phase after this many seconds")
    p.add_argument("--api-key", default=None)
    p.add_argument("--include-requests", action="store_true", help="add per-request records to the output")
    p.add_argument("-o", "--output", default=None, help="write JSON here instead of stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        model = args.model if args.model is not None else discover_model(args.url, args.api_key)
    except (httpx.HTTPError, ValueError) as exc:
        print(f"loadgen: cannot list models at {args.url}: {exc}", file=sys.stderr)
        return 2
    cfg = LoadConfig(
        base_url=args.url,
        model=model,
        concurrency=args.concurrency,
        requests_per_worker=args.requests_per_worker,
        total_requests=args.total_requests,
        prompt=args.prompt,
        max_tokens=args.max_tokens,
        endpoint=args.endpoint,
        sampling={"temperature": args.temperature},
        banned_token_ids=args.ban_token_ids,
        unique_prompts=args.unique_prompts,
        health_path=args.health_path,
        health_interval_s=args.health_interval_ms / 1000.0,
        read_timeout_s=args.read_timeout,
        max_wall_s=args.max_wall,
        api_key=args.api_key,
    )
    try:
        report = run_load(cfg, include_requests=args.include_requests)
    except ValueError as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
