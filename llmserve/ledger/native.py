"""Real OS threads and locks, also in a gevent worker.

After ``gevent.monkey.patch_all()`` ``threading.Thread`` starts a greenlet, and work that blocks in C (a
SQLite commit, a backup, a PostgreSQL round trip) would stall every request of the worker. The ledger's
writer and job threads are started from ``_thread``'s originals instead, and communicate through
``_queue.SimpleQueue``, which gevent does not patch. Without gevent these are the plain functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gevent import monkey

start_new_thread, allocate_lock = monkey.get_original("_thread", ["start_new_thread", "allocate_lock"])


def wait_until(done: Callable[[], bool], timeout: float, poll: float = 0.01) -> bool:
    """Wait up to ``timeout`` seconds for ``done()``; False if it never came.

    Polls with ``time.sleep``, looked up at each call: in a gevent worker that is gevent's sleep, so the
    waiting greenlet lets the others run instead of blocking the hub on a native lock.
    """
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)
    return True
