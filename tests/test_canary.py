"""Alias routing and the canary judge without a server: sticky buckets, the split against the weight,
and the verdicts on synthetic outcomes."""

from __future__ import annotations

import pytest

from llmserve.models.judge import Outcome, Outcomes, Summary, binomial_tail, verdict
from llmserve.models.routing import BUCKETS, Role, bucket, route
from llmserve.settings import AliasSettings, CanarySettings

ALIAS = AliasSettings(stable="v1", canary="v2", canary_weight=10)
RULES = CanarySettings(min_requests=20)


def test_a_session_always_takes_the_same_route() -> None:
    first = route("chat", ALIAS, "acme", "session-7")
    assert all(route("chat", ALIAS, "acme", "session-7") == first for _ in range(20))
    assert bucket("acme", "session-7") != bucket("other-tenant", "session-7")  # tenants hash apart


def test_the_split_over_many_sessions_follows_the_weight() -> None:
    routes = [route("chat", ALIAS, "acme", f"s{number}") for number in range(20_000)]
    canary = [r for r in routes if r.role is Role.CANARY]
    assert 0.09 <= len(canary) / len(routes) <= 0.11
    assert all(r.model == "v2" and r.fallback == "v1" and r.alias == "chat" for r in canary)
    assert all(r.model == "v1" and r.fallback is None for r in routes if r.role is Role.STABLE)


def test_raising_the_weight_only_moves_sessions_to_the_canary() -> None:
    sessions = [f"s{number}" for number in range(2_000)]
    at = {
        weight: {s: route("chat", ALIAS.model_copy(update={"canary_weight": weight}), "t", s).model for s in sessions}
        for weight in (10, 50)
    }
    assert all(at[50][s] == "v2" for s in sessions if at[10][s] == "v2")
    assert bucket("t", "x") < BUCKETS


def test_no_alias_and_no_canary_route_to_the_named_or_stable_model() -> None:
    assert route("gemma", None, "t", None).model == "gemma"
    assert route("chat", AliasSettings(stable="v1"), "t", None) == route("chat", AliasSettings(stable="v1"), "t", "x")


def summary(requests: int, errors: float = 0.0, empty: float = 0.0, ttft: float | None = 0.2) -> Summary:
    return Summary(requests=requests, error_rate=errors, empty_rate=empty, ttft_p99=ttft)


def test_failures_count_once_they_are_beyond_chance() -> None:
    """Failing every request: 2 failures could still be a 5% canary's bad luck (p = 0.0025), 3 cannot."""
    assert verdict(summary(2, errors=1.0), summary(500), RULES) is None
    assert verdict(summary(3, errors=1.0), summary(500), RULES) is not None
    assert verdict(summary(100, errors=0.07), summary(500), RULES) is None  # a little above the bound: not sure yet
    assert verdict(summary(2000, errors=0.07), summary(500), RULES) is not None  # ...until there is enough of it


def test_a_canary_must_be_worse_than_both_the_bound_and_stable() -> None:
    assert verdict(summary(100, errors=0.04), summary(100), RULES) is None  # under the absolute bound
    assert verdict(summary(100, errors=0.30), summary(100, errors=0.20), RULES) is None  # a bad hour for all
    reason = verdict(summary(100, errors=0.30), summary(100, errors=0.01), RULES)
    assert reason is not None and "error rate 30/100 (30.0%)" in reason
    assert "empty outputs" in (verdict(summary(100, empty=0.5), summary(100, empty=0.0), RULES) or "")


def test_ttft_is_judged_after_min_requests() -> None:
    assert verdict(summary(19, ttft=5.0), summary(100, ttft=0.5), RULES) is None
    assert "TTFT p99" in (verdict(summary(20, ttft=5.0), summary(100, ttft=0.5), RULES) or "")
    assert verdict(summary(100, ttft=0.9), summary(100, ttft=0.1), RULES) is None  # under min_ttft_seconds


def test_the_binomial_tail_is_exact() -> None:
    assert binomial_tail(3, 3, 0.05) == pytest.approx(0.05**3)
    assert binomial_tail(0, 10, 0.5) == 1.0
    assert binomial_tail(6, 100, 0.05) == pytest.approx(0.3840008720438, rel=1e-9)  # scipy.stats.binom.sf(5, 100, .05)


def test_outcomes_are_summed_over_the_window_only() -> None:
    now = [1000.0]
    outcomes = Outcomes(clock=lambda: now[0])
    for at in range(900, 1000):
        outcomes.record("v2", Outcome(at=float(at), failed=at < 950, empty=False, ttft=0.1))
    recent = outcomes.summary("v2", window=60)  # 940..999: 10 failed of 60
    assert recent.requests == 60 and abs(recent.error_rate - 10 / 60) < 1e-9
    assert outcomes.summary("v2", window=60, since=990).requests == 10
    assert outcomes.summary("nothing", window=60) == Summary(0, 0.0, 0.0, None)
