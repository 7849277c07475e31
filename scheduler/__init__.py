"""Deciding which waiting job gets the next free sequence slot.

Pure Python on purpose: no HTTP, no gevent, no llama.cpp. The engine thread owns an instance, asks it
for the next job whenever a slot is free, and it is tested alone with a fake clock.
"""

from scheduler.clock import Clock, FakeClock, MonotonicClock
from scheduler.drain import DrainRate
from scheduler.fair import FairScheduler, QueueFullError, TenantQueueFullError, TenantShare

__all__ = [
    "Clock",
    "DrainRate",
    "FairScheduler",
    "FakeClock",
    "MonotonicClock",
    "QueueFullError",
    "TenantQueueFullError",
    "TenantShare",
]
