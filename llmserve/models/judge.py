"""Is a canary clearly worse than its stable model? Judged on what each model's requests did.

Every finished request of a model leaves an ``Outcome``: whether it failed (a 5xx, or an error after
its stream started), whether its output was empty, its time to first token and its finish reason. A
canary is judged over the last ``window`` seconds once it has ``min_requests`` in it: it is rolled back
when its error share exceeds both ``max_error_rate`` and stable's share times ``error_rate_factor``,
when its share of empty outputs does the same against ``max_empty_rate``, or when its TTFT p99 exceeds
both ``min_ttft_seconds`` and stable's p99 times ``ttft_factor``. Absolute bounds keep a canary from
being judged on noise when stable is near perfect; comparisons with stable keep a bad night for every
model from being blamed on the canary.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llmserve.settings import CanarySettings

MAX_OUTCOMES = 10_000  # per model: memory stays bounded whatever the traffic


@dataclass(frozen=True)
class Outcome:
    at: float  # monotonic seconds
    failed: bool
    empty: bool = False
    ttft: float | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class Summary:
    requests: int
    error_rate: float
    empty_rate: float
    ttft_p99: float | None


class Outcomes:
    """The recent outcomes of each model, kept by the registry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_model: dict[str, deque[Outcome]] = {}

    def record(self, model: str, outcome: Outcome) -> None:
        self._by_model.setdefault(model, deque(maxlen=MAX_OUTCOMES)).append(outcome)

    def forget(self, model: str) -> None:
        self._by_model.pop(model, None)

    def summary(self, model: str, window: float, since: float | None = None) -> Summary:
        start = max(self._clock() - window, since if since is not None else float("-inf"))
        recent = [outcome for outcome in self._by_model.get(model, ()) if outcome.at >= start]
        if not recent:
            return Summary(0, 0.0, 0.0, None)
        answered = [outcome for outcome in recent if not outcome.failed]
        ttfts = sorted(outcome.ttft for outcome in recent if outcome.ttft is not None)
        return Summary(
            requests=len(recent),
            error_rate=1 - len(answered) / len(recent),
            empty_rate=sum(outcome.empty for outcome in answered) / len(answered) if answered else 0.0,
            ttft_p99=_percentile(ttfts, 0.99),
        )


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(share * len(values)))]


def verdict(canary: Summary, stable: Summary, rules: CanarySettings) -> str | None:
    """Why the canary must be rolled back, or None while it is not clearly worse (or not yet judged)."""
    if canary.requests < rules.min_requests:
        return None
    reasons: Iterable[str | None] = (
        _worse("error rate", canary.error_rate, stable.error_rate, rules.max_error_rate, rules.error_rate_factor),
        _worse("empty outputs", canary.empty_rate, stable.empty_rate, rules.max_empty_rate, rules.error_rate_factor),
        _slower(canary.ttft_p99, stable.ttft_p99, rules),
    )
    found = [reason for reason in reasons if reason]
    return "; ".join(found) if found else None


def _worse(what: str, canary: float, stable: float, bound: float, factor: float) -> str | None:
    if canary > bound and canary > stable * factor:
        return f"{what} {canary:.1%} against stable's {stable:.1%} (bound {bound:.1%})"
    return None


def _slower(canary: float | None, stable: float | None, rules: CanarySettings) -> str | None:
    if canary is None or canary <= rules.min_ttft_seconds:
        return None
    if stable is not None and canary <= stable * rules.ttft_factor:
        return None
    return f"TTFT p99 {canary:.2f}s against stable's {'-' if stable is None else f'{stable:.2f}s'}"
