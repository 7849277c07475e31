"""Weighted fair sharing of tokens between tenants: the Virtual Token Counter (VTC).

Follows Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024). Each tenant has a counter of the
service it received, in weighted tokens divided by its share's weight; a free slot goes to the waiting tenant with
the smallest counter. Fairness is measured in tokens, not requests, because a long prompt or a long answer costs
the model far more than a short one. The policy ``"fifo"`` ignores counters and priorities, so both can be compared
on the same engine.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from scheduler.clock import Clock

J = TypeVar("J", bound=Hashable)

Policy = Literal["fair", "fifo"]


class QueueFullError(Exception):
    """The queue holds as many jobs as it may."""


class TenantQueueFullError(QueueFullError):
    """This tenant has as many jobs waiting as its share allows; other tenants may still queue."""

    def __init__(self, tenant: str, message: str) -> None:
        super().__init__(message)
        self.tenant = tenant


@dataclass(frozen=True)
class TenantShare:
    """What one tenant is entitled to.

    ``weight`` scales its share of tokens against other tenants of its priority class. ``priority`` is strict:
    a lower value is always served first, so a batch tenant (1) waits for as long as interactive ones (0) are
    waiting. ``max_running`` caps the slots it may hold at once, ``max_queued`` the jobs it may have waiting.
    """

    weight: float = 1.0
    priority: int = 0
    max_running: int | None = None
    max_queued: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be a finite number > 0, got {self.weight!r}")
        if self.max_running is not None and self.max_running < 0:
            raise ValueError(f"max_running must be >= 0 or None, got {self.max_running!r}")
        if self.max_queued is not None and self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0 or None, got {self.max_queued!r}")


@dataclass(frozen=True)
class _Entry:
    tenant: str
    deadline: float
    seq: int  # arrival order, across all tenants


@dataclass(eq=False)
class _Tenant(Generic[J]):
    counter: float = 0.0
    queue: OrderedDict[J, _Entry] = field(default_factory=OrderedDict)
    running: int = 0


class FairScheduler(Generic[J]):
    """Which waiting job takes the next free slot, sharing tokens between tenants by weight.

    The engine calls ``next()`` for each free slot, ``charge()`` with the tokens each running job processed, and
    ``release()`` when a job leaves its slot. Prompt tokens should be charged right after ``next()`` returns the
    job, before ``next()`` is called again, so that several slots freed at once are not all given to one tenant.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        max_queued: int,
        policy: Policy = "fair",
        prompt_weight: float = 1.0,
        output_weight: float = 2.0,
        default_share: TenantShare | None = None,
    ) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued!r}")
        if policy not in ("fair", "fifo"):
            raise ValueError(f"policy must be 'fair' or 'fifo', got {policy!r}")
        for name, value in (("prompt_weight", prompt_weight), ("output_weight", output_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self._clock = clock
        self._max_queued = max_queued
        self._policy: Policy = policy
        self._prompt_weight = prompt_weight
        self._output_weight = output_weight
        # Tenants missing from the configuration get this share (weight 1, priority 0, no caps unless given).
        self._default = default_share if default_share is not None else TenantShare()
        self._shares: dict[str, TenantShare] = {}
        self._tenants: dict[str, _Tenant[J]] = {}
        self._queued: dict[J, _Entry] = {}  # every waiting job, in arrival order
        self._running: dict[J, str] = {}  # job holding a slot -> its tenant
        self._backlogged: dict[str, None] = {}  # tenants with at least one waiting job
        self._last_left: dict[int, str] = {}  # priority -> tenant whose job most recently left the queue for a slot
        self._seq = itertools.count()

    def configure(self, shares: Mapping[str, TenantShare]) -> None:
        """Replace every tenant's share (a config reload). Counters are kept, so nobody gains by a reload.

        Jobs of a tenant no longer named keep waiting or running under the default share.
        """
        before = {name: self._share(name).priority for name in self._backlogged}
        self._shares = dict(shares)
        for name in self._shares:
            self._tenants.setdefault(name, _Tenant())
        for name in list(self._tenants):
            self._forget_if_idle(name)
        # A waiting tenant moved to another priority class competes with new peers: lift it as if it just arrived.
        for name, priority in before.items():
            if self._share(name).priority != priority:
                self._lift(name)

    def __len__(self) -> int:
        return len(self._queued)

    def submit(self, job: J, *, tenant: str, timeout: float, free_slots: int = 0) -> None:
        """Queue ``job`` for ``tenant``; it must leave the queue within ``timeout`` seconds or expire.

        The tenant's own cap is checked before the global one, so a tenant over its share is told so even when
        the whole queue is full too. A job that will take one of ``free_slots`` at the next ``next()`` (nobody
        else is waiting and its tenant is below its ``max_running``) never waits, so the queue caps do not
        apply to it: with ``max_queued = 0`` a tenant is served while there is room and refused otherwise.
        """
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        if job in self._queued:
            raise ValueError(f"job {job!r} is already queued")
        if job in self._running:
            raise ValueError(f"job {job!r} is already running")
        share = self._share(tenant)
        known = self._tenants.get(tenant)
        waiting = len(known.queue) if known is not None else 0
        starts_at_once = free_slots > 0 and not self._queued and self._below_cap(tenant)
        if not starts_at_once:
            if share.max_queued is not None and waiting >= share.max_queued:
                raise TenantQueueFullError(tenant, f"tenant {tenant!r} already has {waiting} jobs waiting")
            if len(self._queued) >= self._max_queued:
                raise QueueFullError(f"{len(self._queued)} jobs are already waiting")
        state = self._tenants.setdefault(tenant, _Tenant())
        if not state.queue:
            self._lift(tenant)
            self._backlogged[tenant] = None
        entry = _Entry(tenant, self._clock.now() + timeout, next(self._seq))
        state.queue[job] = entry
        self._queued[job] = entry

    def next(self) -> J | None:
        """The job that takes the free slot now, removed from the queue and counted as running.

        None when no waiting job may run now: the queue is empty, or every waiting tenant is at its ``max_running``.
        """
        chosen: str | None = None
        best: tuple[float, ...] = ()
        for name in self._backlogged:
            if not self._below_cap(name):
                continue
            state = self._tenants[name]
            head = next(iter(state.queue.values()))
            if self._policy == "fifo":
                key: tuple[float, ...] = (head.seq,)
            else:
                # Ties go to the tenant whose oldest job has waited longest, which keeps the choice deterministic.
                key = (self._share(name).priority, state.counter, head.seq)
            if chosen is None or key < best:
                chosen, best = name, key
        if chosen is None:
            return None
        state = self._tenants[chosen]
        job, _ = state.queue.popitem(last=False)
        del self._queued[job]
        self._running[job] = chosen
        state.running += 1
        if not state.queue:
            del self._backlogged[chosen]
        priority = self._share(chosen).priority
        previous = self._last_left.get(priority)
        self._last_left[priority] = chosen
        if previous is not None and previous != chosen:
            self._forget_if_idle(previous)
        return job

    def release(self, job: J) -> None:
        """A running job left its slot (finished or cancelled); unknown jobs are ignored."""
        name = self._running.pop(job, None)
        if name is None:
            return
        self._tenants[name].running -= 1
        self._forget_if_idle(name)

    def charge(self, job: J, *, prompt_tokens: int = 0, generated_tokens: int = 0) -> None:
        """Add the tokens a running job processed to its tenant's counter; a job not running is ignored."""
        if prompt_tokens < 0 or generated_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got {prompt_tokens!r} and {generated_tokens!r}")
        name = self._running.get(job)
        if name is None:
            return
        cost = prompt_tokens * self._prompt_weight + generated_tokens * self._output_weight
        self._tenants[name].counter += cost / self._share(name).weight

    def remove(self, job: J) -> bool:
        """Take a queued job out (its client went away); True if it was queued."""
        entry = self._queued.get(job)
        if entry is None:
            return False
        self._unqueue(job, entry)
        return True

    def expired(self) -> list[J]:
        """Remove and return the queued jobs whose deadline has passed, in arrival order."""
        now = self._clock.now()
        late = [(job, entry) for job, entry in self._queued.items() if entry.deadline <= now]
        for job, entry in late:
            self._unqueue(job, entry)
        return [job for job, _ in late]

    def jobs(self) -> list[J]:
        """The queued jobs, in arrival order."""
        return list(self._queued)

    def queued(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return len(state.queue) if state is not None else 0

    def running(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.running if state is not None else 0

    def counters(self) -> dict[str, float]:
        """Each known tenant's virtual token counter: configured tenants, and others while they have jobs."""
        return {name: state.counter for name, state in self._tenants.items()}

    def tenant_of(self, job: J) -> str | None:
        entry = self._queued.get(job)
        if entry is not None:
            return entry.tenant
        return self._running.get(job)

    def _share(self, tenant: str) -> TenantShare:
        return self._shares.get(tenant, self._default)

    def _below_cap(self, tenant: str) -> bool:
        cap = self._share(tenant).max_running
        state = self._tenants.get(tenant)
        return cap is None or (state.running if state is not None else 0) < cap

    def _lift(self, tenant: str) -> None:
        """Raise the counter of a tenant that starts waiting, so that time spent idle cannot be saved up.

        Without this a tenant back after an hour would hold every slot until its counter caught up. The paper's
        Algorithm 2 lifts it to the smallest counter among the backlogged clients; when no client is backlogged it
        lifts it to the counter of the client that last left the queue (the one served last), which is what is
        done here. Priority classes are separate VTC instances, so both sets are taken within the tenant's class.
        A tenant at its ``max_running`` cannot take a slot, and its counter lags behind while it is held back, so
        it does not count as backlogged here: a newcomer is lifted to the tenants it actually competes with.
        """
        state = self._tenants[tenant]
        priority = self._share(tenant).priority
        peers = [
            self._tenants[name].counter
            for name in self._backlogged
            if name != tenant and self._share(name).priority == priority and self._below_cap(name)
        ]
        if peers:
            floor = min(peers)
        else:
            last = self._last_left.get(priority)
            if last is None or last not in self._tenants:
                return
            floor = self._tenants[last].counter
        state.counter = max(state.counter, floor)

    def _unqueue(self, job: J, entry: _Entry) -> None:
        del self._queued[job]
        state = self._tenants[entry.tenant]
        del state.queue[job]
        if not state.queue:
            del self._backlogged[entry.tenant]
            self._forget_if_idle(entry.tenant)

    def _forget_if_idle(self, tenant: str) -> None:
        """Drop an unconfigured tenant with nothing queued or running, so that memory stays bounded.

        Its counter is lost, which is safe: when it comes back, the lift raises it to its peers. The tenant that
        last left the queue of a class is kept, because the lift reads its counter.
        """
        state = self._tenants.get(tenant)
        if state is None or state.queue or state.running or tenant in self._shares:
            return
        if tenant in self._last_left.values():
            return
        del self._tenants[tenant]
