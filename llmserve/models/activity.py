"""What each model did over the last minutes, for the console and ``GET /v1/status``.

Each worker samples its engines about once a second into buckets of ``BUCKET_SECONDS`` aligned on the
wall clock, so that the buckets of every worker on the host line up: the tokens generated in each bucket
and the longest queue seen in it. With the times to first token of the requests that finished in the
window, that goes into the worker's status file; ``host_activity`` sums the workers' files. The engine
statistics and the request outcomes are counted already: this only keeps their recent history.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from llmserve.models.judge import percentile

BUCKET_SECONDS = 5
WINDOW_SECONDS = 300
BUCKETS = WINDOW_SECONDS // BUCKET_SECONDS
RATE_SECONDS = 60  # the current tokens/s is the mean over the last minute's buckets
MAX_TTFTS = 1000  # per model and worker in a status file: the newest


@dataclass
class _Series:
    bucket: int  # the bucket being filled
    tokens_at_start: int  # the engine's generated tokens when it began
    longest_queue: int = 0
    tokens: deque[int] = field(default_factory=lambda: deque(maxlen=BUCKETS))
    queued: deque[int] = field(default_factory=lambda: deque(maxlen=BUCKETS))


class Activity:
    """One worker's recent history per model; sampled from the hub, so it needs no lock."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._series: dict[str, _Series] = {}

    def sample(self, model: str, generated_tokens: int, queued: int) -> None:
        """Take one reading of ``model``'s engine: its generated-tokens counter and queue length now."""
        bucket = int(self._clock() // BUCKET_SECONDS)
        series = self._series.get(model)
        if series is None or generated_tokens < series.tokens_at_start:  # new, or a namesake reloaded
            self._series[model] = _Series(bucket, generated_tokens, queued)
            return
        if bucket > series.bucket:
            # The bucket being filled closes; when the hub was held up past whole buckets, the tokens made
            # since the last sample are spread over them all.
            closing = min(bucket - series.bucket, BUCKETS)
            share, rest = divmod(generated_tokens - series.tokens_at_start, closing)
            series.tokens.extend([share] * (closing - 1) + [share + rest])
            series.queued.extend([series.longest_queue] + [queued] * (closing - 1))
            series.bucket, series.tokens_at_start, series.longest_queue = bucket, generated_tokens, queued
        else:
            series.longest_queue = max(series.longest_queue, queued)

    def forget(self, model: str) -> None:
        self._series.pop(model, None)

    def view(self, model: str) -> dict[str, Any] | None:
        """The closed buckets of ``model``, oldest first, ending with bucket ``last``; None before the first."""
        series = self._series.get(model)
        if series is None or not series.tokens:
            return None
        return {"last": series.bucket - 1, "tokens": list(series.tokens), "queued": list(series.queued)}


def ttft_view(ttfts: Iterable[float]) -> list[float]:
    """Times to first token as a status file keeps them: the newest ``MAX_TTFTS``, in milliseconds' precision."""
    return [round(ttft, 3) for ttft in list(ttfts)[-MAX_TTFTS:]]


@dataclass(frozen=True)
class ModelActivity:
    """One model's recent history summed over the workers that serve it."""

    first: int  # the bucket of tokens[0] (bucket k starts at k * BUCKET_SECONDS, unix time)
    tokens: list[int]
    queued: list[int]
    ttfts: list[float]

    @property
    def tokens_per_second(self) -> float:
        recent = self.tokens[-(RATE_SECONDS // BUCKET_SECONDS) :]
        return sum(recent) / (len(recent) * BUCKET_SECONDS) if recent else 0.0

    def ttft_percentile(self, share: float) -> float | None:
        return percentile(sorted(self.ttfts), share)


def host_activity(views: Iterable[tuple[dict[str, Any] | None, list[float]]], now: float) -> ModelActivity:
    """Sum the workers' ``(Activity.view, ttft_view)`` of one model over the window that ends with the last
    bucket that ended before ``now``, or the one before while no worker has closed that one yet (a worker
    closes a bucket at its first sample after the bucket's end, up to a second later)."""
    reported = list(views)
    ended = int(now // BUCKET_SECONDS) - 1
    closed = max((view["last"] for view, _ in reported if view is not None), default=ended)
    last = max(ended - 1, min(ended, closed))
    first = last - BUCKETS + 1
    tokens, queued, ttfts = [0] * BUCKETS, [0] * BUCKETS, []
    for view, worker_ttfts in reported:
        ttfts.extend(worker_ttfts)
        if view is None:
            continue
        start = view["last"] - len(view["tokens"]) + 1
        for offset, (made, waiting) in enumerate(zip(view["tokens"], view["queued"], strict=True)):
            index = start + offset - first
            if 0 <= index < BUCKETS:
                tokens[index] += made
                queued[index] += waiting
    return ModelActivity(first, tokens, queued, ttfts)
