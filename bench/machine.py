"""CPU accounting from /proc, to tell whether a measurement had the machine to itself.

On a 2-core box a llama.cpp server runs one compute thread per core; any other
busy process (a build, a test suite, another server) stalls its thread
barriers and can slow generation by orders of magnitude. So before each
measurement we wait for the machine to go quiet, and during it we split CPU
use into: the server's process group, this benchmark process, and everything
else ("foreign"), which is recorded next to the results.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _system_busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _proc_ticks(stat_text: str) -> tuple[int, int]:
    """(pgrp, utime+stime+cutime+cstime) from a /proc/<pid>/stat line."""
    rest = stat_text.rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state): pgrp is field 5, utime..cstime are fields 14..17.
    return int(rest[2]), sum(int(x) for x in rest[11:15])


def group_ticks(pgid: int) -> int:
    """CPU jiffies used by all live processes of a process group."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            pgrp, ticks = _proc_ticks(Path(entry.path, "stat").read_text())
        except (OSError, IndexError, ValueError):
            continue
        if pgrp == pgid:
            total += ticks
    return total


def self_ticks() -> int:
    """CPU jiffies used by this process (all threads)."""
    t = os.times()
    return round((t.user + t.system) * _TICKS)


@dataclass
class CpuSnapshot:
    wall: float
    busy: int
    server: int
    me: int


@dataclass
class CpuUsage:
    """Average number of cores busy over an interval, split by who used them."""

    total_cores: float
    server_cores: float
    bench_cores: float
    foreign_cores: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.__dict__.items()}


def snapshot(server_pgid: int | None) -> CpuSnapshot:
    busy, _ = _system_busy_ticks()
    server = group_ticks(server_pgid) if server_pgid else 0
    return CpuSnapshot(wall=time.monotonic(), busy=busy, server=server, me=self_ticks())


def usage_between(a: CpuSnapshot, b: CpuSnapshot) -> CpuUsage:
    """Cores used between two snapshots; foreign = total - server - benchmark."""
    seconds = max(b.wall - a.wall, 1e-6)

    def cores(ticks: int) -> float:
        return max(ticks, 0) / _TICKS / seconds

    total = cores(b.busy - a.busy)
    server = cores(b.server - a.server)
    me = cores(b.me - a.me)
    return CpuUsage(total, server, me, max(total - server - me, 0.0))


def wait_for_quiet(max_busy_cores: float, timeout_s: float, sample_s: float = 1.0) -> float:
    """Sample until other processes use at most max_busy_cores or timeout_s passes.

    Returns the last observed busy cores (excluding this process), so callers
    can record whether the measurement started on a quiet machine.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        before = snapshot(None)
        time.sleep(sample_s)
        usage = usage_between(before, snapshot(None))
        if usage.foreign_cores <= max_busy_cores or time.monotonic() >= deadline:
            return usage.foreign_cores
