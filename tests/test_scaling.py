"""The scaling signal's arithmetic (llmserve.scaling); tests/integration/test_scaling.py follows it on a
real server."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve.scaling import Demand, desired_replicas, model_demands
from llmserve.settings import ScalingSettings

RULES = ScalingSettings(target_utilisation=0.8, target_queue_wait=2.0)


def worker(**models: dict[str, Any]) -> dict[str, Any]:
    return {"pid": 1, "models": models}


def report(busy: int, queued: int, slots: int = 8, drain: float = 0.0, status: str = "ready") -> dict[str, Any]:
    return {"status": status, "slots": slots, "busy": busy, "queued": queued, "drain": drain}


def test_an_idle_or_unserving_instance_needs_nothing() -> None:
    assert Demand(slots=8).replicas(RULES) == 0
    assert Demand().replicas(RULES) == 0
    assert desired_replicas([], RULES) == 0


def test_busy_slots_count_at_the_target_utilisation() -> None:
    assert Demand(slots=8, busy=8).replicas(RULES) == pytest.approx(1.25)
    assert Demand(slots=8, busy=4).replicas(RULES) == pytest.approx(0.625)


def test_the_queue_needs_the_instances_that_give_each_request_a_slot_within_the_target_wait() -> None:
    # Finishing 10 requests a second, an instance frees 20 slots in the 2 s: 40 queued need 2 more instances.
    fast = Demand(slots=8, busy=8, queued=40, drain_per_second=10.0)
    assert fast.replicas(RULES) == pytest.approx(1.25 + 40 / 20)
    # Finishing 1 a second (long generations) frees only 2: a new instance's 6.4 slots at the target count.
    slow = Demand(slots=8, busy=8, queued=40, drain_per_second=1.0)
    assert slow.replicas(RULES) == pytest.approx(1.25 + 40 / 6.4)
    nothing_finished = Demand(slots=8, busy=8, queued=8)
    assert nothing_finished.replicas(RULES) == pytest.approx(2.5)


def test_workers_are_summed_per_model_and_the_busiest_model_decides() -> None:
    statuses = [
        worker(a=report(busy=4, queued=0), b=report(busy=1, queued=0, slots=4)),
        worker(a=report(busy=4, queued=8, drain=1.0), b=report(busy=0, queued=0, slots=4)),
        worker(a=report(busy=9, queued=9, status="loading")),  # not serving: left out
    ]
    demands = model_demands(statuses)
    assert demands["a"] == Demand(slots=16, busy=8, queued=8, drain_per_second=1.0)
    assert demands["b"] == Demand(slots=8, busy=1, queued=0)
    assert desired_replicas(statuses, RULES) == pytest.approx(8 / 12.8 + 8 / 12.8)
