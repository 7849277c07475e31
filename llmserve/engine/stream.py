"""Carrying engine events to the waiting greenlet across the native-thread boundary.

``gevent.queue.Queue.put`` from a native thread does not wake a greenlet, so the engine thread appends to
a deque (atomic under the GIL) and asks the hub, through ``run_callback_threadsafe``, to set a gevent
Event on its own thread. The greenlet clears the event before it re-checks the deque, so no wake-up is
lost. One stream serves all the jobs of a request (``n`` choices, several prompts): each job pushes
through its own tagged sink.
"""

from __future__ import annotations

from collections import deque

import gevent
from gevent.event import Event as GeventEvent

from llmserve.engine.jobs import Event


class TaggedSink:
    """The sink one job pushes into; events arrive tagged with the job's index."""

    def __init__(self, stream: EventStream, tag: int) -> None:
        self._stream = stream
        self._tag = tag

    def push(self, event: Event) -> None:
        self._stream.push(self._tag, event)


class EventStream:
    """Events for the jobs of one request, read by the greenlet that created it."""

    def __init__(self) -> None:
        self._hub = gevent.get_hub()
        self._items: deque[tuple[int, Event]] = deque()
        self._ready = GeventEvent()

    def sink(self, tag: int) -> TaggedSink:
        return TaggedSink(self, tag)

    def push(self, tag: int, event: Event) -> None:
        """Called from the engine thread."""
        self._items.append((tag, event))
        self._hub.loop.run_callback_threadsafe(self._ready.set)

    def get(self, timeout: float | None) -> tuple[int, Event] | None:
        """The next tagged event, or None if nothing arrived within ``timeout`` seconds."""
        while not self._items:
            self._ready.clear()
            if self._items:
                break
            if not self._ready.wait(timeout):
                return None
        return self._items.popleft()
