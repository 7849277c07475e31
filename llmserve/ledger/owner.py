"""One owner among processes: a non-blocking ``flock`` on a file in the state directory.

The kernel releases the lock when its holder dies however it dies (kill -9 included), so another process
can take it over; nothing stale is left behind to clean up. Locks belong to an open file, so two owners
in one process exclude each other too.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

JOBS_LOCK = "jobs.lock"


class OwnerLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never waits."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file releases the lock
            self._fd = None
