"""First come, first served (the fair scheduler's "fifo" policy) and the drain-rate estimate, with a fake clock."""

import pytest

from scheduler import Clock, DrainRate, FairScheduler, FakeClock, QueueFullError


def fifo(max_queued: int, clock: Clock | None = None) -> FairScheduler[str]:
    return FairScheduler(clock or FakeClock(), max_queued=max_queued, policy="fifo")


def test_jobs_leave_in_arrival_order() -> None:
    queue = fifo(3)
    for job in ("a", "b", "c"):
        queue.submit(job, tenant="t", timeout=10)
    assert [queue.next(), queue.next(), queue.next(), queue.next()] == ["a", "b", "c", None]


def test_a_full_queue_refuses_more() -> None:
    queue = fifo(1)
    queue.submit("a", tenant="t", timeout=10)
    with pytest.raises(QueueFullError):
        queue.submit("b", tenant="t", timeout=10)
    assert len(queue) == 1


def test_zero_capacity_refuses_everything() -> None:
    queue = fifo(0)
    with pytest.raises(QueueFullError):
        queue.submit("a", tenant="t", timeout=10)


def test_jobs_expire_at_their_deadline_only() -> None:
    clock = FakeClock()
    queue = fifo(5, clock)
    queue.submit("short", tenant="t", timeout=1)
    queue.submit("long", tenant="t", timeout=5)
    clock.advance(0.5)
    assert queue.expired() == []
    clock.advance(0.5)
    assert queue.expired() == ["short"]
    assert queue.jobs() == ["long"]


def test_removed_jobs_are_not_served() -> None:
    queue = fifo(5)
    queue.submit("a", tenant="t", timeout=1)
    queue.submit("b", tenant="t", timeout=1)
    assert queue.remove("a") is True
    assert queue.remove("a") is False
    assert queue.next() == "b"


@pytest.mark.parametrize("bad", [-1, 0])
def test_bad_timeouts_are_named(bad: float) -> None:
    queue = fifo(5)
    with pytest.raises(ValueError, match=repr(bad)):
        queue.submit("a", tenant="t", timeout=bad)


def test_the_same_job_cannot_wait_twice() -> None:
    queue = fifo(5)
    queue.submit("a", tenant="t", timeout=1)
    with pytest.raises(ValueError, match="already queued"):
        queue.submit("a", tenant="t", timeout=1)


def test_retry_after_follows_the_measured_drain_rate() -> None:
    clock = FakeClock()
    drain = DrainRate(clock, half_life=10.0, floor=1.0)
    assert drain.retry_after(queued=50) == 1.0  # no history: the floor
    for _ in range(100):  # a steady 2 jobs per second for 50 s
        clock.advance(0.5)
        drain.record_finished()
    assert drain.per_second == pytest.approx(2.0, rel=0.1)
    assert drain.retry_after(queued=19) == pytest.approx(10.0, rel=0.1)


def test_retry_after_grows_as_the_rate_decays() -> None:
    clock = FakeClock()
    drain = DrainRate(clock, half_life=10.0)
    for _ in range(20):
        clock.advance(0.5)
        drain.record_finished()
    before = drain.retry_after(queued=9)
    clock.advance(10.0)  # nothing finished for one half-life
    assert drain.retry_after(queued=9) == pytest.approx(2 * before, rel=0.01)


def test_retry_after_is_capped() -> None:
    clock = FakeClock()
    drain = DrainRate(clock, half_life=1.0, ceiling=30.0)
    drain.record_finished()
    clock.advance(100.0)
    assert drain.retry_after(queued=1000) == 30.0
