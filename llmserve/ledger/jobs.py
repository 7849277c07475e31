"""The ledger's periodic jobs, run by exactly one process: hourly rollups, backups and their retention.

Every gunicorn worker starts a ``JobRunner``; the one that takes ``STATE_DIR/jobs.lock`` (a non-blocking
``flock``) runs the jobs, the others try again every ``claim_interval`` seconds, so when the owner exits
or dies another worker takes over within that time.

Threads. APScheduler's ``BackgroundScheduler`` starts its loop with ``threading.Thread``, which in a
gevent worker (after ``patch_all``) is a greenlet, and waits on a ``threading.Event``, which is then
gevent's; its default executor is a ``concurrent.futures`` pool whose threads are greenlets as well. So
no job may block. The jobs given to APScheduler here only take the lock (a non-blocking syscall) or put
a task on a queue, and run inline in the scheduler's loop (the ``debug`` executor: no pool); the work
that blocks in C (a rollup's SQL, a backup's copy and checksum) runs on one native OS thread of ours,
one task at a time, so a backup and a rollup never overlap. Without gevent all of this is plain threads.

Checked under ``patch_all`` (tests/test_ledger.py runs it): the scheduler's thread is a
``gevent.threading.Thread`` on the hub's native thread, while rollups run on another native thread.
With a 400k-record (98 MB) SQLite ledger on a busy two-core machine, a backup or a rollup of six hours on
the task thread left at most 6 ms between a greenlet's 2 ms ticks; the same work in a greenlet stalled
the hub for 0.26 s and 0.44 s.
"""

from __future__ import annotations

import logging
from _queue import SimpleQueue
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from apscheduler.executors.debug import DebugExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from llmserve.ledger import backup as backups
from llmserve.ledger.native import allocate_lock, start_new_thread, wait_until
from llmserve.ledger.owner import JOBS_LOCK, OwnerLock
from llmserve.ledger.settings import BACKUP_DIR, LedgerSettings
from llmserve.ledger.store import HOUR, Ledger, hour_of

log = logging.getLogger(__name__)

Task = tuple[str, Callable[[], object]]


class _TaskThread:
    """One native thread running named tasks in order; a task already waiting or running is not queued twice."""

    def __init__(self) -> None:
        self._queue: SimpleQueue[Task | None] = SimpleQueue()
        self._lock = allocate_lock()
        self._pending: set[str] = set()
        self._running = False

    def start(self) -> None:
        self._running = True
        start_new_thread(self._run, ())

    def submit(self, name: str, task: Callable[[], object]) -> bool:
        with self._lock:
            if name in self._pending:
                log.info("ledger job %s is still running; this run is skipped", name)
                return False
            self._pending.add(name)
        self._queue.put((name, task))
        return True

    def stop(self, timeout: float) -> bool:
        """Let the running task finish (up to ``timeout`` seconds), drop the waiting ones; True if it ended."""
        with self._lock:
            self._pending.clear()
        self._queue.put(None)
        return wait_until(lambda: not self._running, timeout)

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                name, task = item
                with self._lock:
                    if name not in self._pending:  # dropped by stop()
                        continue
                try:
                    task()
                except Exception:
                    log.exception("ledger job %s failed", name)
                finally:
                    with self._lock:
                        self._pending.discard(name)
        finally:
            self._running = False


class JobRunner:
    """Takes the jobs lock when it can and, while it holds it, runs the ledger's jobs."""

    def __init__(
        self,
        ledger: Ledger,
        state_dir: Path,
        *,
        backup_dir: Path | None = None,
        backup_interval: float = 15.0,
        backup_keep: int = 96,
        offsite_dir: Path | None = None,
        offsite_companions: tuple[Path, ...] = (),
        claim_interval: float = 60.0,
    ) -> None:
        """``backup_interval`` in minutes (0: no backups), ``claim_interval`` in seconds; each backup is also
        shipped to ``offsite_dir`` (when set) with ``offsite_companions``."""
        self.ledger = ledger
        self.backup_dir = backup_dir or state_dir / BACKUP_DIR
        self.backup_interval = backup_interval
        self.backup_keep = backup_keep
        self.offsite_dir = offsite_dir
        self.offsite_companions = offsite_companions
        self.claim_interval = claim_interval
        self.lock = OwnerLock(state_dir / JOBS_LOCK)
        self._tasks = _TaskThread()
        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": DebugExecutor()},
            # A run that comes late (a suspended process) still runs, once.
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    @property
    def owner(self) -> bool:
        """Whether this process runs the jobs now."""
        return self.lock.held

    @property
    def backs_up(self) -> bool:
        return self.backup_interval > 0 and self.ledger.sqlite_path is not None

    def start(self) -> None:
        """Start trying to own the jobs; call it in each worker after fork."""
        self._tasks.start()
        self._scheduler.start()
        trigger = IntervalTrigger(seconds=self.claim_interval, timezone=UTC)
        self._scheduler.add_job(self._claim, trigger, id="claim", next_run_time=datetime.now(UTC))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop scheduling, let a running job finish (up to ``timeout`` seconds), then give up the lock."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        if not self._tasks.stop(timeout):
            log.warning("a ledger job was still running after %.0f s; giving up the jobs lock anyway", timeout)
        if self.lock.held:
            self.lock.release()
            log.info("ledger jobs released")

    def roll_up_recent(self) -> None:
        """Roll up the previous hour, and redo the one before: the writer may have stored records of it
        late, after retrying through a database outage."""
        current = hour_of(datetime.now(UTC))
        for hour in (current - 2 * HOUR, current - HOUR):
            self.ledger.roll_up(hour)

    def back_up(self) -> None:
        """Take a backup, delete the ones beyond ``backup_keep``, and ship it off the host when configured
        (a failure to ship is logged; the local backup stands)."""
        path = backups.backup(self.ledger, self.backup_dir)
        removed = backups.prune(self.backup_dir, self.backup_keep)
        log.info("ledger backed up to %s (%d bytes); %d old backups removed", path, path.stat().st_size, len(removed))
        if self.offsite_dir is None:
            return
        try:
            shipped = backups.ship(path, self.offsite_dir, self.backup_keep, self.offsite_companions)
        except (OSError, backups.BackupError) as exc:
            log.error("ledger backup %s not shipped to %s: %s", path.name, self.offsite_dir, exc)
            return
        log.info("ledger backup shipped to %s", shipped)

    def _claim(self) -> None:
        if self.lock.held or not self.lock.try_acquire():
            return
        log.info("this process now runs the ledger jobs (it holds %s)", self.lock.path)
        now = datetime.now(UTC)
        self._scheduler.add_job(
            self._tasks.submit,
            CronTrigger(minute=1, timezone=UTC),
            args=("rollup", self.roll_up_recent),
            id="rollup",
            next_run_time=now,  # catch up at once: the previous owner may have died before its run
        )
        if self.backup_interval > 0 and not self.backs_up:
            log.info("the ledger is not a SQLite file: llmserve takes no backups of it (use pg_dump)")
        if self.backs_up:
            interval = timedelta(minutes=self.backup_interval)
            self._scheduler.add_job(
                self._tasks.submit,
                IntervalTrigger(seconds=interval.total_seconds(), timezone=UTC),
                args=("backup", self.back_up),
                id="backup",
                next_run_time=max(now, self._last_backup() + interval),
            )

    def _last_backup(self) -> datetime:
        """When the newest backup was taken; long ago if there is none."""
        taken = backups.backups(self.backup_dir)
        return datetime.fromtimestamp(taken[-1].stat().st_mtime, UTC) if taken else datetime.min.replace(tzinfo=UTC)


def start_jobs(
    ledger: Ledger, settings: LedgerSettings, state_dir: Path, offsite_companions: tuple[Path, ...] = ()
) -> JobRunner:
    """Start this worker's job runner; it runs the jobs only while it owns them."""
    runner = JobRunner(
        ledger,
        state_dir,
        backup_dir=settings.resolved_backup_dir(state_dir),
        backup_interval=settings.backup_interval,
        backup_keep=settings.backup_keep,
        offsite_dir=settings.offsite_dir,
        offsite_companions=offsite_companions,
    )
    runner.start()
    return runner
