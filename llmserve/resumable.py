"""Journals of resumable streams: the SSE events of a generation, kept on disk so that a client that
lost its connection can read what it missed and follow the rest, from any worker of the instance.

A journal is three files in one directory (under the state directory), named after the stream's id:
``ID.sse`` holds the events exactly as they were sent (``id: N`` and ``data: ...``, the last one
``[DONE]`` or an error); ``ID.json`` says whose it is; ``ID.done`` appears when the generation has
ended. The worker that generates appends to it (and touches ``ID.sse`` while nothing is produced, so
that readers can tell a quiet stream from a lost one); a reader, on whichever worker the reconnect
landed, replays the events after the client's ``Last-Event-ID`` and then follows the file, touching
``ID.reader`` while it is attached so that the generating worker knows someone still wants the stream.

Bounds: one stream's journal holds at most ``buffer_bytes``; a journal reserves that much against the
tenant's and the instance's totals while its generation runs, and its size once it ended, so a new
resumable stream is refused (not silently made unresumable) once they are reached. A journal is
deleted ``grace`` seconds after its generation ended and its last reader left; one whose writer
vanished (no growth, no touch, no end for ``grace``) too.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

STREAM_ID = re.compile(r"[A-Za-z0-9-]{1,100}")
SWEEP_INTERVAL = 1.0  # seconds a new journal may count expired ones in the totals
POLL_INTERVAL = 0.02  # seconds between a reader's looks at a journal that has not grown
TOUCH_INTERVAL = 1.0  # seconds between a reader's touches of ID.reader


class JournalsFull(Exception):
    """A new resumable stream would exceed the tenant's (``tenant`` true) or the instance's total."""

    def __init__(self, message: str, *, tenant: bool) -> None:
        super().__init__(message)
        self.tenant = tenant


class BufferExceeded(Exception):
    """A stream produced more than its journal may hold."""


@dataclass(frozen=True)
class JournalLimits:
    grace: float
    buffer_bytes: int
    tenant_bytes: int
    total_bytes: int
    heartbeat: float  # seconds of silence after which a reader sends a keep-alive


class Journals:
    """The journals of one instance (every worker shares the directory)."""

    def __init__(self, directory: Path, limits: JournalLimits) -> None:
        self.directory = directory
        self.limits = limits
        self._swept_at = 0.0

    def create(self, stream_id: str, tenant: str) -> Journal:
        """A new journal, its buffer reserved against the totals (JournalsFull when they are reached)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if time.monotonic() - self._swept_at >= SWEEP_INTERVAL:
            self.sweep()  # the totals count only journals that still matter
        reserved = self._reserved()
        mine = sum(size for owner, size in reserved if owner == tenant)
        needed = self.limits.buffer_bytes
        if mine + needed > self.limits.tenant_bytes:
            raise JournalsFull(
                f"Your organization's resumable streams hold {mine} bytes of their {self.limits.tenant_bytes}; "
                "retry when one has ended.",
                tenant=True,
            )
        if sum(size for _, size in reserved) + needed > self.limits.total_bytes:
            raise JournalsFull("This server holds as many resumable streams as it may; retry later.", tenant=False)
        journal = Journal(self.directory, stream_id, self.limits)
        journal.meta.write_text(json.dumps({"tenant": tenant, "created": time.time()}))
        journal.events.touch()
        return journal

    def find(self, stream_id: str, tenant: str) -> Journal | None:
        """The journal of ``stream_id`` if it exists, has not expired and belongs to ``tenant``."""
        if not STREAM_ID.fullmatch(stream_id):
            return None
        journal = Journal(self.directory, stream_id, self.limits)
        try:
            owner = json.loads(journal.meta.read_text()).get("tenant")
        except (OSError, ValueError):
            return None
        return journal if owner == tenant and not journal.expired() else None

    def sweep(self) -> None:
        """Delete expired journals."""
        self._swept_at = time.monotonic()
        for meta in self.directory.glob("*.json"):
            journal = Journal(self.directory, meta.stem, self.limits)
            if journal.expired():
                journal.delete()

    def usage(self) -> tuple[int, int]:
        """Journals and the bytes their events take."""
        sizes = [_size(path) for path in self.directory.glob("*.sse")]
        return len(sizes), sum(sizes)

    def _reserved(self) -> list[tuple[str, int]]:
        """Each journal's tenant and the bytes it reserves: its whole buffer while it may grow, its size
        once its generation ended."""
        reserved = []
        for meta in self.directory.glob("*.json"):
            journal = Journal(self.directory, meta.stem, self.limits)
            try:
                owner = str(json.loads(meta.read_text()).get("tenant"))
            except (OSError, ValueError):
                continue  # deleted meanwhile, or being written
            reserved.append((owner, _size(journal.events) if journal.done.exists() else self.limits.buffer_bytes))
        return reserved


class Journal:
    """One stream's journal: appended to by the worker that generates, read by any."""

    def __init__(self, directory: Path, stream_id: str, limits: JournalLimits) -> None:
        self.stream_id = stream_id
        self.limits = limits
        self.events = directory / f"{stream_id}.sse"
        self.meta = directory / f"{stream_id}.json"
        self.done = directory / f"{stream_id}.done"
        self.reader = directory / f"{stream_id}.reader"
        self._written = 0
        self._output: BinaryIO | None = None  # the writer's, open from its first event to the end

    # The writer's side.

    def append(self, frame: str, *, last: bool = False) -> None:
        """Add one event; BufferExceeded past the buffer, except for the ``last`` one (the end or an error)."""
        data = frame.encode()
        if not last and self._written + len(data) > self.limits.buffer_bytes:
            raise BufferExceeded(f"the stream exceeded its {self.limits.buffer_bytes}-byte resume buffer")
        if self._output is None:
            self._output = self.events.open("ab", buffering=0)  # unbuffered: each event is one write
        self._output.write(data)
        self._written += len(data)

    def keep_alive(self) -> None:
        """Say that the writer is still there while nothing is produced."""
        os.utime(self.events)

    def finish(self) -> None:
        self._close()
        self.done.touch()

    def _close(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def unread_for(self, since: float) -> float:
        """Seconds no reader has been attached, counting from ``since`` (wall clock) at the latest."""
        return time.time() - max(since, _mtime(self.reader))

    def resumed(self) -> bool:
        return self.reader.exists()

    # A reader's side.

    def frames(self, after: int, sleep: Callable[[float], object]) -> Iterator[str | None]:
        """The events after event ``after``, then the new ones as they are written, until the journal
        ends; ``None`` when nothing new came for a heartbeat interval. Ends with an error event if the
        writer vanished. Touches ID.reader while it runs."""
        offset = 0
        pending = b""
        quiet_since = touched = time.monotonic()
        self.reader.touch()
        while True:
            ended = self.done.exists()  # before reading: whatever was written before the end is read
            with self.events.open("rb") as source:
                source.seek(offset)
                data = source.read()
            offset += len(data)
            pending += data
            *complete, pending = pending.split(b"\n\n")
            for raw in complete:
                frame = raw.decode() + "\n\n"
                if _event_id(frame) > after:
                    yield frame
            now = time.monotonic()
            if complete:
                quiet_since = now
            elif ended:
                return
            elif time.time() - _mtime(self.events) > self.limits.grace:
                yield LOST
                return
            elif now - quiet_since >= self.limits.heartbeat:
                quiet_since = now
                yield None
            if now - touched >= TOUCH_INTERVAL:
                touched = now
                self.reader.touch()
            if not complete:
                sleep(POLL_INTERVAL)

    # Both.

    def expired(self) -> bool:
        """Nothing written, ended or read for ``grace`` seconds: a writer touches its journal more often
        than that while it lives (see the ``streams`` settings), a reader every second."""
        quiet = time.time() - max(_mtime(self.events), _mtime(self.done), _mtime(self.reader))
        return quiet > self.limits.grace

    def delete(self) -> None:
        self._close()
        for path in (self.events, self.meta, self.done, self.reader):
            path.unlink(missing_ok=True)


LOST = (
    'data: {"error":{"message":"The stream was lost: the server generating it stopped.",'
    '"type":"server_error","param":null,"code":"stream_lost"}}\n\n'
)


def _event_id(frame: str) -> int:
    """A frame's ``id:``; 0 for one without (none is written so)."""
    if frame.startswith("id: "):
        return int(frame[4 : frame.index("\n")])
    return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
