"""Is a canary clearly worse than its stable model? Judged on what each model's requests did.

Every finished request of a model leaves an ``Outcome``: whether it failed (a 5xx, or an error after
its stream started), whether its output was empty, its time to first token and its finish reason. A
canary is judged over the last ``window`` seconds. It is rolled back when its error share is above both
``max_error_rate`` and stable's share times ``error_rate_factor``, or its share of empty outputs is
above ``max_empty_rate`` and stable's times the factor, with so many failures that a canary no worse
than that limit would show them with a chance below ``significance`` (a binomial tail): a canary that
fails every request goes after a handful, one that fails a little more than the limit only after
hundreds. Its TTFT p99 is judged once it has ``min_requests``: above both ``min_ttft_seconds`` and
stable's p99 times ``ttft_factor``. Absolute bounds keep a canary from being judged on noise when
stable is near perfect; comparisons with stable keep a bad hour for every model from being blamed on
the canary.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
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

    @property
    def errors(self) -> int:
        return round(self.error_rate * self.requests)

    @property
    def answered(self) -> int:
        return self.requests - self.errors


class Outcomes:
    """The recent outcomes of each model, kept by the registry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_model: dict[str, deque[Outcome]] = {}

    def record(self, model: str, outcome: Outcome) -> None:
        self._by_model.setdefault(model, deque(maxlen=MAX_OUTCOMES)).append(outcome)

    def forget(self, model: str) -> None:
        self._by_model.pop(model, None)

    def recent(self, model: str, window: float, since: float | None = None) -> list[Outcome]:
        """``model``'s outcomes of the last ``window`` seconds (and not before ``since``), oldest first."""
        start = max(self._clock() - window, since if since is not None else float("-inf"))
        return [outcome for outcome in self._by_model.get(model, ()) if outcome.at >= start]

    def summary(self, model: str, window: float, since: float | None = None) -> Summary:
        recent = self.recent(model, window, since)
        if not recent:
            return Summary(0, 0.0, 0.0, None)
        answered = [outcome for outcome in recent if not outcome.failed]
        ttfts = sorted(outcome.ttft for outcome in recent if outcome.ttft is not None)
        return Summary(
            requests=len(recent),
            error_rate=1 - len(answered) / len(recent),
            empty_rate=sum(outcome.empty for outcome in answered) / len(answered) if answered else 0.0,
            ttft_p99=percentile(ttfts, 0.99),
        )


def percentile(ordered: list[float], share: float) -> float | None:
    """The nearest-rank percentile of sorted values (p99 of 100 values: the 99th), None of none."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def verdict(canary: Summary, stable: Summary, rules: CanarySettings) -> str | None:
    """Why the canary must be rolled back, or None while it is not clearly worse (or not yet judged)."""
    reasons = (
        _worse("error rate", canary.errors, canary.requests, stable.error_rate, rules.max_error_rate, rules),
        _worse(
            "empty outputs",
            round(canary.empty_rate * canary.answered),
            canary.answered,
            stable.empty_rate,
            rules.max_empty_rate,
            rules,
        ),
        _slower(canary, stable.ttft_p99, rules),
    )
    found = [reason for reason in reasons if reason]
    return "; ".join(found) if found else None


def _worse(what: str, bad: int, total: int, stable: float, bound: float, rules: CanarySettings) -> str | None:
    """``bad`` of ``total`` is clearly above both ``bound`` and stable's share times the factor."""
    limit = min(1.0, max(bound, stable * rules.error_rate_factor))
    if total == 0 or bad / total <= limit or binomial_tail(bad, total, limit) >= rules.significance:
        return None
    return f"{what} {bad}/{total} ({bad / total:.1%}) against stable's {stable:.1%} (limit {limit:.1%})"


def binomial_tail(successes: int, trials: int, probability: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, probability), in log space (trials may be thousands)."""
    if successes <= 0:
        return 1.0
    if probability <= 0:
        return 0.0
    if probability >= 1:
        return 1.0
    log_p, log_q = math.log(probability), math.log1p(-probability)
    terms = [
        math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1) + k * log_p + (trials - k) * log_q
        for k in range(successes, trials + 1)
    ]
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(term - peak) for term in terms))


def _slower(canary: Summary, stable: float | None, rules: CanarySettings) -> str | None:
    p99 = canary.ttft_p99
    if canary.requests < rules.min_requests or p99 is None or p99 <= rules.min_ttft_seconds:
        return None
    if stable is not None and p99 <= stable * rules.ttft_factor:
        return None
    return f"TTFT p99 {p99:.2f}s against stable's {'-' if stable is None else f'{stable:.2f}s'}"
