"""The fair-share scheduler (Virtual Token Counter), driven by a fake clock and a simulated engine."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Literal

import pytest

from scheduler import FairScheduler, FakeClock, QueueFullError, TenantQueueFullError, TenantShare

PROMPT = 10  # prompt tokens of every simulated job
FOREVER = 1e9  # a queue timeout that never passes in these tests


def length(job: str) -> int:
    """Tokens a simulated job generates before it finishes: 10 to 30, varied so that jobs do not end in lockstep."""
    return 10 + int(job.rsplit("-", 1)[1]) * 7 % 21


class Engine:
    """A stand-in for the engine thread: ``slots`` sequences, one token per running job per step.

    Prompt tokens are charged at admission, right after ``next()``, as the real engine must do. ``service``
    holds the cost each tenant received, in the scheduler's units (prompt x 1 + generated x 2), not yet divided
    by weight.
    """

    def __init__(self, scheduler: FairScheduler[str], *, slots: int, clock: FakeClock | None = None) -> None:
        self.scheduler = scheduler
        self.slots = slots
        self.clock = clock
        self.running: dict[str, int] = {}  # job -> tokens generated so far
        self.service: Counter[str] = Counter()
        self.admitted: list[str] = []  # tenants, in the order their jobs took a slot
        self._numbers: Counter[str] = Counter()

    def submit(self, tenant: str, count: int = 1) -> None:
        for _ in range(count):
            self._numbers[tenant] += 1
            self.scheduler.submit(f"{tenant}-{self._numbers[tenant]}", tenant=tenant, timeout=FOREVER)

    def keep_backlogged(self, *tenants: str) -> None:
        """Top up each tenant's queue so that it cannot empty within one step, even if every slot frees at once."""
        for tenant in tenants:
            missing = 2 * self.slots - self.scheduler.queued(tenant)
            if missing > 0:
                self.submit(tenant, missing)

    def step(self) -> None:
        self.fill()
        self.decode()

    def fill(self) -> None:
        while len(self.running) < self.slots:
            job = self.scheduler.next()
            if job is None:
                break
            tenant = self.scheduler.tenant_of(job)
            assert tenant is not None
            self.scheduler.charge(job, prompt_tokens=PROMPT)
            self.service[tenant] += PROMPT
            self.admitted.append(tenant)
            self.running[job] = 0

    def decode(self) -> None:
        for job in list(self.running):
            tenant = self.scheduler.tenant_of(job)
            assert tenant is not None
            self.scheduler.charge(job, generated_tokens=1)
            self.service[tenant] += 2
            self.running[job] += 1
            if self.running[job] == length(job):
                del self.running[job]
                self.scheduler.release(job)
        if self.clock is not None:
            self.clock.advance(0.05)

    def run(self, steps: int, *backlogged: str) -> None:
        for _ in range(steps):
            self.keep_backlogged(*backlogged)
            self.step()


def make(
    shares: Mapping[str, TenantShare] | None = None,
    *,
    max_queued: int = 1000,
    policy: Literal["fair", "fifo"] = "fair",
) -> FairScheduler[str]:
    scheduler: FairScheduler[str] = FairScheduler(FakeClock(), max_queued=max_queued, policy=policy)
    if shares is not None:
        scheduler.configure(shares)
    return scheduler


def weighted_shares(service: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """Each tenant's service divided by its weight, as a fraction of the total: equal when sharing is fair."""
    normalised = {tenant: service[tenant] / weights[tenant] for tenant in weights}
    total = sum(normalised.values())
    return {tenant: value / total for tenant, value in normalised.items()}


def test_backlogged_tenants_share_tokens_by_weight() -> None:
    engine = Engine(make({"a": TenantShare(weight=1), "b": TenantShare(weight=3)}), slots=8)
    engine.run(5000, "a", "b")
    assert engine.service["b"] / engine.service["a"] == pytest.approx(3.0, rel=0.05)
    assert weighted_shares(engine.service, {"a": 1, "b": 3}) == pytest.approx({"a": 0.5, "b": 0.5}, abs=0.01)


def test_fifo_ignores_weights() -> None:
    engine = Engine(make({"a": TenantShare(weight=1), "b": TenantShare(weight=3)}, policy="fifo"), slots=8)
    engine.run(2000, "a", "b")
    assert engine.service["b"] / engine.service["a"] == pytest.approx(1.0, rel=0.05)


def test_a_returning_tenant_is_served_at_once_but_cannot_spend_banked_idle_time() -> None:
    scheduler = make({name: TenantShare() for name in ("a", "b", "c")})
    engine = Engine(scheduler, slots=8)
    engine.run(3000, "a", "b")  # c sits idle while a and b use the whole model
    before = scheduler.counters()
    assert before["c"] == 0 and min(before["a"], before["b"]) > 10_000

    engine.submit("c", 4)
    assert scheduler.counters()["c"] == min(before["a"], before["b"])  # lifted to the least served competitor
    start = len(engine.admitted)
    service_before = engine.service.copy()
    engine.run(3000, "a", "b", "c")
    admitted = engine.admitted[start:]
    assert "c" in admitted[:3]  # not starved: one of the next couple of free slots
    assert admitted[:24].count("c") <= 12  # no burst: it does not take every slot (fair would be 8 of 24)
    after = {tenant: engine.service[tenant] - service_before[tenant] for tenant in ("a", "b", "c")}
    assert weighted_shares(after, {"a": 1, "b": 1, "c": 1}) == pytest.approx(
        {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=0.02
    )


def test_without_competitors_a_newcomer_is_lifted_to_the_tenant_served_last() -> None:
    scheduler = make()
    engine = Engine(scheduler, slots=4)
    engine.run(500, "a")
    while len(scheduler) or engine.running:  # a stops sending and its last jobs finish
        engine.step()
    engine.submit("b")
    assert scheduler.counters()["b"] == scheduler.counters()["a"] > 0
    engine.run(2000, "a", "b")
    assert engine.admitted[-200:].count("b") == pytest.approx(100, abs=10)


def test_a_tenant_never_holds_more_than_max_running_and_does_not_block_others() -> None:
    scheduler = make({"capped": TenantShare(max_running=2), "free": TenantShare()})
    engine = Engine(scheduler, slots=6)
    for _ in range(1000):
        engine.keep_backlogged("capped", "free")
        engine.fill()
        assert scheduler.running("capped") <= 2
        assert len(engine.running) == 6  # every free slot is filled: the capped tenant blocks nobody
        assert scheduler.running("capped") + scheduler.running("free") == 6
        engine.decode()
    assert engine.service["free"] > 1.5 * engine.service["capped"]


def test_next_skips_a_capped_tenant_and_returns_none_when_all_waiting_tenants_are_capped() -> None:
    scheduler = make({"a": TenantShare(max_running=1), "b": TenantShare(max_running=1)})
    for job, tenant in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")):
        scheduler.submit(job, tenant=tenant, timeout=10)
    assert [scheduler.next(), scheduler.next(), scheduler.next()] == ["a1", "b1", None]
    assert len(scheduler) == 2
    scheduler.release("b1")
    assert scheduler.next() == "b2"


def test_a_tenant_over_its_queue_cap_is_refused_before_the_global_cap() -> None:
    scheduler = make({"small": TenantShare(max_queued=1)}, max_queued=3)
    scheduler.submit("s1", tenant="small", timeout=10)
    with pytest.raises(TenantQueueFullError) as refused:
        scheduler.submit("s2", tenant="small", timeout=10)
    assert refused.value.tenant == "small"
    scheduler.submit("o1", tenant="other", timeout=10)
    scheduler.submit("o2", tenant="other", timeout=10)
    with pytest.raises(QueueFullError) as full:
        scheduler.submit("o3", tenant="other", timeout=10)
    assert not isinstance(full.value, TenantQueueFullError)
    with pytest.raises(TenantQueueFullError):  # both caps reached: the tenant's own is named
        scheduler.submit("s2", tenant="small", timeout=10)
    assert len(scheduler) == 3 and scheduler.queued("small") == 1


def test_a_refused_unknown_tenant_leaves_nothing_behind() -> None:
    scheduler = make(max_queued=0)
    with pytest.raises(QueueFullError):
        scheduler.submit("x", tenant="stranger", timeout=10)
    assert scheduler.counters() == {}


def test_deadlines_expire_on_the_fake_clock_and_removed_jobs_are_not_served() -> None:
    clock = FakeClock()
    scheduler: FairScheduler[str] = FairScheduler(clock, max_queued=10)
    scheduler.submit("a-short", tenant="a", timeout=1)
    scheduler.submit("b-long", tenant="b", timeout=5)
    scheduler.submit("b-gone", tenant="b", timeout=5)
    clock.advance(0.5)
    assert scheduler.expired() == []
    clock.advance(0.5)
    assert scheduler.expired() == ["a-short"]
    assert scheduler.queued("a") == 0 and scheduler.tenant_of("a-short") is None
    assert scheduler.remove("b-gone") is True
    assert scheduler.remove("b-gone") is False
    assert scheduler.jobs() == ["b-long"]
    assert scheduler.next() == "b-long"
    assert scheduler.remove("b-long") is False  # running, not queued
    assert scheduler.next() is None


def test_interactive_tenants_go_before_batch_ones() -> None:
    scheduler = make({"chat": TenantShare(priority=0), "batch": TenantShare(priority=1)})
    engine = Engine(scheduler, slots=4)
    engine.submit("batch", 50)  # waiting first, and with the lower counter
    engine.run(300, "chat")
    assert set(engine.admitted) == {"chat"}  # strict priority: batch starves while chat is backlogged
    while scheduler.queued("chat") or scheduler.running("chat"):
        engine.step()
    engine.step()
    assert engine.admitted[-1] == "batch"


def test_a_newcomer_is_lifted_within_its_priority_class_only() -> None:
    scheduler = make(
        {"chat": TenantShare(priority=0), "late": TenantShare(priority=0), "batch": TenantShare(priority=1)}
    )
    engine = Engine(scheduler, slots=4)
    engine.run(200, "batch")  # batch alone: its counter grows
    engine.submit("chat", 2)
    assert scheduler.counters()["chat"] == 0  # batch's counter says nothing about interactive tenants
    engine.run(200, "chat", "batch")
    engine.submit("late")
    assert scheduler.counters()["late"] == scheduler.counters()["chat"]


def test_a_waiting_tenant_moved_to_another_class_is_lifted_there() -> None:
    scheduler = make({"chat": TenantShare(priority=0), "mover": TenantShare(priority=1)})
    engine = Engine(scheduler, slots=4)
    engine.submit("mover", 5)
    engine.run(100, "chat")  # mover waits in the batch class, its counter at 0
    assert scheduler.counters()["mover"] == 0
    scheduler.configure({"chat": TenantShare(priority=0), "mover": TenantShare(priority=0)})
    assert scheduler.counters()["mover"] == scheduler.counters()["chat"] > 0


def test_fifo_serves_in_arrival_order_across_tenants_and_keeps_caps() -> None:
    shares = {"a": TenantShare(weight=10, max_running=1), "b": TenantShare(priority=1), "c": TenantShare()}
    scheduler = make(shares, policy="fifo")
    arrivals = [("b1", "b"), ("a1", "a"), ("c1", "c"), ("a2", "a"), ("b2", "b")]
    for job, tenant in arrivals:
        scheduler.submit(job, tenant=tenant, timeout=10)
    scheduler.charge("a1", generated_tokens=1_000)  # not running: ignored
    assert [scheduler.next() for _ in range(5)] == ["b1", "a1", "c1", "b2", None]  # a2 waits for a's one slot
    scheduler.release("a1")
    assert scheduler.next() == "a2"


def test_configure_changes_weights_and_keeps_counters() -> None:
    scheduler = make({"a": TenantShare(), "b": TenantShare()})
    engine = Engine(scheduler, slots=8)
    engine.run(1000, "a", "b")
    counters = scheduler.counters()
    scheduler.configure({"a": TenantShare(weight=1), "b": TenantShare(weight=3)})
    assert scheduler.counters() == counters
    before = engine.service.copy()
    engine.run(4000, "a", "b")
    after = {tenant: engine.service[tenant] - before[tenant] for tenant in ("a", "b")}
    assert after["b"] / after["a"] == pytest.approx(3.0, rel=0.05)


def test_jobs_of_a_removed_tenant_finish_and_the_tenant_is_then_forgotten() -> None:
    scheduler = make({"gone": TenantShare(weight=4, max_running=1), "stays": TenantShare()})
    scheduler.submit("g1", tenant="gone", timeout=10)
    scheduler.submit("g2", tenant="gone", timeout=10)
    assert scheduler.next() == "g1"
    scheduler.configure({"stays": TenantShare()})
    scheduler.charge("g1", prompt_tokens=4, generated_tokens=3)  # now charged at the default weight 1
    assert scheduler.counters()["gone"] == 4 * 1.0 + 3 * 2.0
    assert scheduler.next() == "g2"  # no cap any more under the default share
    assert scheduler.tenant_of("g2") == "gone"
    scheduler.release("g1")
    scheduler.release("g2")
    scheduler.release("g2")  # twice, or unknown: no-op
    scheduler.release("never-seen")
    scheduler.submit("s1", tenant="stays", timeout=10)
    assert scheduler.next() == "s1"  # "stays" is now the last served, so "gone" need not be remembered
    assert "gone" not in scheduler.counters()
    assert scheduler.running("gone") == 0 and scheduler.queued("gone") == 0


def test_unknown_tenants_get_the_default_share_and_memory_stays_bounded() -> None:
    scheduler: FairScheduler[str] = FairScheduler(
        FakeClock(), max_queued=100, default_share=TenantShare(max_running=1, max_queued=2)
    )
    for number in range(50):
        tenant = f"t{number}"
        scheduler.submit(f"{tenant}-1", tenant=tenant, timeout=10)
        scheduler.submit(f"{tenant}-2", tenant=tenant, timeout=10)
        with pytest.raises(TenantQueueFullError):
            scheduler.submit(f"{tenant}-3", tenant=tenant, timeout=10)
        assert scheduler.next() == f"{tenant}-1"
        assert scheduler.next() is None  # max_running 1 from the default share
        scheduler.release(f"{tenant}-1")
        assert scheduler.next() == f"{tenant}-2"
        scheduler.release(f"{tenant}-2")
    assert list(scheduler.counters()) == ["t49"]  # only the last one served is kept, for the lift


def test_charging_weights_prompt_and_output_tokens() -> None:
    scheduler: FairScheduler[str] = FairScheduler(FakeClock(), max_queued=10, prompt_weight=0.5, output_weight=3.0)
    scheduler.configure({"a": TenantShare(weight=2)})
    scheduler.submit("j", tenant="a", timeout=10)
    assert scheduler.next() == "j"
    scheduler.charge("j", prompt_tokens=8, generated_tokens=2)
    assert scheduler.counters() == {"a": (8 * 0.5 + 2 * 3.0) / 2}
    with pytest.raises(ValueError, match="-1"):
        scheduler.charge("j", generated_tokens=-1)


def test_the_same_job_cannot_be_queued_while_running() -> None:
    scheduler = make()
    scheduler.submit("j", tenant="a", timeout=10)
    assert scheduler.next() == "j"
    with pytest.raises(ValueError, match="already running"):
        scheduler.submit("j", tenant="a", timeout=10)


@pytest.mark.parametrize(
    "bad",
    [
        {"weight": 0},
        {"weight": -1},
        {"weight": float("inf")},
        {"max_running": -1},
        {"max_queued": -1},
    ],
)
def test_bad_shares_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        TenantShare(**bad)  # type: ignore[arg-type]  # floats for the int fields too: only the sign matters here


def test_bad_constructor_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        FairScheduler(FakeClock(), max_queued=1, policy="lifo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queued"):
        FairScheduler(FakeClock(), max_queued=-1)
    with pytest.raises(ValueError, match="output_weight"):
        FairScheduler(FakeClock(), max_queued=1, output_weight=-2.0)


def test_a_job_that_starts_at_once_is_not_held_to_the_queue_caps() -> None:
    scheduler: FairScheduler[str] = FairScheduler(FakeClock(), max_queued=0)
    scheduler.configure({"t": TenantShare(max_queued=0, max_running=1)})
    scheduler.submit("first", tenant="t", timeout=5, free_slots=1)
    assert scheduler.next() == "first"
    with pytest.raises(TenantQueueFullError):  # at its max_running: it would have to wait
        scheduler.submit("second", tenant="t", timeout=5, free_slots=1)
    with pytest.raises(QueueFullError):  # no free slot: it would wait, and the global queue holds none
        scheduler.submit("other", tenant="u", timeout=5, free_slots=0)
    scheduler.submit("other", tenant="u", timeout=5, free_slots=1)
    assert scheduler.next() == "other"
