"""The scaling signal: how many instances this instance's load would need, for any autoscaler to sum.

GPU utilisation says little about an LLM server (a GPU is "busy" at one sequence as at sixty-four); the
queue does. From the status files of the instance's workers (``ModelRegistry.status``), for each warm
model summed over the workers:

    desired = busy / (slots * u) + queued / max(drain * W, slots * u)

The running requests need ``busy / (slots * u)`` instances at the target utilisation ``u``
(``scaling.target_utilisation``). The queue needs enough more for every queued request to hold a slot
within ``W`` (``scaling.target_queue_wait``): an instance frees ``drain * W`` slots in ``W`` seconds at
the rate it has been finishing that model's requests (``drain``, per second, the engines' own 30-second
average), and a new one brings ``slots * u`` at once; the larger of the two is what one instance is
worth to the queue. Every instance serves every model, so the instance needs what its busiest model
needs: the maximum over the models.

The value is fractional and per instance, so a fleet needs ``ceil(sum over instances)``: exactly what an
HPA computes for a Pods metric with ``averageValue: 1`` and KEDA for a Prometheus trigger with
``threshold: 1`` (``deploy/k8s/keda``, ``deploy/k8s/hpa``). An idle instance reports 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from llmserve.settings import ScalingSettings


@dataclass(frozen=True)
class Demand:
    """One model's load on an instance."""

    slots: int = 0
    busy: int = 0
    queued: int = 0
    drain_per_second: float = 0.0  # requests finished per second, lately

    def replicas(self, rules: ScalingSettings) -> float:
        """The instances this load would need (see the module's docstring); 0 when idle or not serving."""
        if self.slots == 0:
            return 0.0
        per_instance = self.slots * rules.target_utilisation
        queue_capacity = max(self.drain_per_second * rules.target_queue_wait, per_instance)
        return self.busy / per_instance + self.queued / queue_capacity


def model_demands(statuses: Iterable[dict[str, Any]]) -> dict[str, Demand]:
    """Each warm model's load summed over the workers' status reports."""
    totals: dict[str, Demand] = {}
    for status in statuses:
        for name, model in status["models"].items():
            if model.get("status") != "ready":
                continue
            total = totals.get(name, Demand())
            totals[name] = Demand(
                total.slots + model.get("slots", 0),
                total.busy + model.get("busy", 0),
                total.queued + model.get("queued", 0),
                total.drain_per_second + model.get("drain", 0.0),
            )
    return totals


def desired_replicas(statuses: Iterable[dict[str, Any]], rules: ScalingSettings) -> float:
    """The instances this instance's load would need: its busiest model's (0 when idle)."""
    return max((demand.replicas(rules) for demand in model_demands(statuses).values()), default=0.0)
