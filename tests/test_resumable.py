"""Stream journals: what a reader of a resumable stream gets, whoever writes it, and what they hold."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from llmserve.resumable import LOST, BufferExceeded, Journal, JournalLimits, Journals, JournalsFull

LIMITS = JournalLimits(grace=2.0, buffer_bytes=64, tenant_bytes=128, total_bytes=192, heartbeat=0.05)


def frame(number: int) -> str:
    return f'id: {number}\ndata: {{"n":{number}}}\n\n'


def age(journal: Journal, seconds: float) -> None:
    """Make every file of the journal look ``seconds`` old."""
    then = time.time() - seconds
    for path in (journal.events, journal.done, journal.reader):
        if path.exists():
            os.utime(path, (then, then))


def test_a_reader_gets_the_events_after_its_last_then_the_new_ones_until_the_end(tmp_path: Path) -> None:
    journals = Journals(tmp_path, LIMITS)
    writer = journals.create("cmpl-1", "alpha")
    writer.append(frame(1))
    writer.append(frame(2))
    reader = journals.find("cmpl-1", "alpha")
    assert reader is not None and not writer.resumed()
    later = iter([frame(3), frame(4)])

    def sleep(_: float) -> None:  # the writer goes on while the reader waits
        following = next(later, None)
        if following is None:
            writer.finish()
        else:
            writer.append(following, last=following == frame(4))

    assert list(reader.frames(1, sleep)) == [frame(2), frame(3), frame(4)]
    assert writer.resumed()


def test_a_quiet_writer_gets_heartbeats_and_a_vanished_one_an_error(tmp_path: Path) -> None:
    writer = Journals(tmp_path, LIMITS).create("cmpl-2", "alpha")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)
        if len(waits) == 10:
            age(writer, 10)  # the writer stopped touching it long ago

    assert list(writer.frames(0, sleep))[-2:] == [None, LOST]


def test_a_journal_holds_its_buffer_but_always_its_end(tmp_path: Path) -> None:
    writer = Journals(tmp_path, LIMITS).create("cmpl-3", "alpha")
    writer.append("x" * 60)
    with pytest.raises(BufferExceeded, match="64-byte"):
        writer.append("y" * 10)
    writer.append("data: [DONE]\n\n", last=True)


def test_buffers_are_reserved_against_the_tenant_and_the_server(tmp_path: Path) -> None:
    journals = Journals(tmp_path, LIMITS)
    journals.create("a1", "alpha")
    journals.create("a2", "alpha")
    with pytest.raises(JournalsFull) as full:
        journals.create("a3", "alpha")
    assert full.value.tenant
    journals.create("b1", "beta")
    with pytest.raises(JournalsFull) as full:
        journals.create("b2", "beta")
    assert not full.value.tenant
    for name in ("a1", "a2"):  # an ended journal reserves only what it holds
        ended = journals.find(name, "alpha")
        assert ended is not None
        ended.append(frame(1), last=True)
        ended.finish()
    journals.create("b2", "beta")


def test_a_journal_is_found_only_by_its_tenant_and_only_until_it_expires(tmp_path: Path) -> None:
    journals = Journals(tmp_path, LIMITS)
    writer = journals.create("cmpl-4", "alpha")
    writer.finish()
    assert journals.find("cmpl-4", "beta") is None
    assert journals.find("../cmpl-4", "alpha") is None
    assert journals.find("cmpl-4", "alpha") is not None
    age(writer, LIMITS.grace + 1)
    assert journals.find("cmpl-4", "alpha") is None
    journals.sweep()
    assert not list(tmp_path.iterdir())
