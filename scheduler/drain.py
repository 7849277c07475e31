"""How fast the queue drains, so a refused client is told honestly when to come back."""

from __future__ import annotations

import math

from scheduler.clock import Clock


class DrainRate:
    """An exponentially weighted rate of finished jobs per second.

    ``retry_after(queued)`` answers: at the rate jobs have been finishing lately, how many seconds until
    ``queued`` jobs ahead of a new one are gone. With no history yet it falls back to ``floor``.
    """

    def __init__(self, clock: Clock, *, half_life: float = 30.0, floor: float = 1.0, ceiling: float = 600.0):
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0, got {half_life!r}")
        if not 0 < floor <= ceiling:
            raise ValueError(f"need 0 < floor <= ceiling, got {floor!r} and {ceiling!r}")
        self._clock = clock
        self._half_life = half_life
        self._floor = floor
        self._ceiling = ceiling
        self._rate = 0.0
        self._last = clock.now()

    def _decay_to_now(self) -> None:
        now = self._clock.now()
        elapsed = now - self._last
        if elapsed > 0:
            self._rate *= math.exp(-elapsed * math.log(2) / self._half_life)
            self._last = now

    def record_finished(self, count: int = 1) -> None:
        self._decay_to_now()
        # Each finished job adds an impulse whose integral over the decay curve equals one job.
        self._rate += count * math.log(2) / self._half_life

    @property
    def per_second(self) -> float:
        self._decay_to_now()
        return self._rate

    def retry_after(self, queued: int) -> float:
        rate = self.per_second
        if rate <= 0:
            return self._floor
        return min(self._ceiling, max(self._floor, (queued + 1) / rate))
