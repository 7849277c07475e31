"""A client of resumable streams as the protocol asks: it keeps the events it read completely, by id, and
after a cut resumes with ``Last-Event-ID`` (for the tests and for ``bench/resumable.py``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx

MAX_RESUMES = 100


@dataclass
class Read:
    """What a client following the protocol read: the events by id, and whether the stream ended."""

    events: dict[int, str] = field(default_factory=dict)
    ended: bool = False
    stream_id: str = ""

    @property
    def last(self) -> int:
        return max(self.events, default=0)

    def frames(self) -> str:
        """The events as the server wrote them."""
        return "".join(f"id: {number}\ndata: {data}\n\n" for number, data in sorted(self.events.items()))

    def text(self) -> str:
        return "".join(
            json.loads(data)["choices"][0]["text"] for data in self.events.values() if data.startswith('{"id"')
        )

    def consume(self, response: httpx.Response, limit: int | None = None) -> None:
        """Take complete events until the stream ends, the connection is cut (a partial event is dropped) or
        ``limit`` events were taken (the caller then leaves)."""
        event_id, data = None, None
        taken = 0
        try:
            for line in response.iter_lines():
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    data = line[6:]
                elif line == "" and event_id is not None and data is not None:
                    assert event_id == self.last + 1, f"event {event_id} after {self.last}"
                    self.events[event_id] = data
                    self.ended = data == "[DONE]" or data.startswith('{"error"')
                    event_id, data = None, None
                    taken += 1
                    if taken == limit:
                        return
        except httpx.TransportError:
            pass  # cut: resume after the last complete event


def follow(
    url: str, path: str, body: dict[str, object], headers: dict[str, str], timeout: float = 60
) -> tuple[Read, int]:
    """Start a resumable stream (``POST url+path``) and resume it after every cut, as a client would:
    what it read, and how many times it had to resume."""
    read = Read()
    started = {"X-Stream-Resumable": "true"} | headers
    with httpx.stream("POST", f"{url}{path}", json=body, headers=started, timeout=timeout) as response:
        if response.status_code != 200 or response.headers.get("X-Stream-Resumable") != "true":
            raise RuntimeError(f"not a resumable stream: {response.status_code} {response.read()[:300]!r}")
        read.stream_id = response.headers["X-Stream-Id"]
        read.consume(response)
    resumes = 0
    while not read.ended and resumes < MAX_RESUMES:
        resumes += 1
        again = headers | {"Last-Event-ID": str(read.last)}
        with httpx.stream("GET", f"{url}/v1/streams/{read.stream_id}", headers=again, timeout=timeout) as response:
            if response.status_code != 200:
                raise RuntimeError(f"resume refused: {response.status_code} {response.read()[:300]!r}")
            read.consume(response)
    return read, resumes
