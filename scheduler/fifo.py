"""First come, first served, with a bounded queue and per-job deadlines.

The fair-share scheduler replaces this later behind the same methods.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from scheduler.clock import Clock

J = TypeVar("J", bound=Hashable)


class QueueFullError(Exception):
    """The queue holds as many jobs as it may."""


@dataclass(frozen=True)
class _Entry(Generic[J]):
    job: J
    deadline: float


class FifoScheduler(Generic[J]):
    def __init__(self, clock: Clock, *, max_queued: int) -> None:
        if max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {max_queued!r}")
        self._clock = clock
        self._max_queued = max_queued
        self._entries: OrderedDict[J, _Entry[J]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def submit(self, job: J, *, timeout: float) -> None:
        """Queue ``job``; it must leave the queue within ``timeout`` seconds or expire."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        if job in self._entries:
            raise ValueError(f"job {job!r} is already queued")
        if len(self._entries) >= self._max_queued:
            raise QueueFullError(f"{len(self._entries)} jobs are already waiting")
        self._entries[job] = _Entry(job, self._clock.now() + timeout)

    def next(self) -> J | None:
        """The job that should take the free slot now, removed from the queue."""
        if not self._entries:
            return None
        _, entry = self._entries.popitem(last=False)
        return entry.job

    def remove(self, job: J) -> bool:
        """Take a job out (its client went away); True if it was queued."""
        return self._entries.pop(job, None) is not None

    def expired(self) -> list[J]:
        """Remove and return the jobs whose deadline has passed."""
        now = self._clock.now()
        late = [job for job, entry in self._entries.items() if entry.deadline <= now]
        for job in late:
            del self._entries[job]
        return late

    def jobs(self) -> list[J]:
        return list(self._entries)
