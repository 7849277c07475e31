"""Running one request's generations on the engine and turning engine events into text updates.

A request may hold several choices (``n``, or several prompts); each is one engine job, all reporting into
one event stream. The HTTP status is decided only once every job has been admitted to a slot, so a
request that cannot be served gets an honest 503 with ``Retry-After`` rather than a 200 followed by an
error. After that, updates flow as tokens arrive; the caller turns them into JSON or SSE chunks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llmserve.api.text import Delta, TextAssembler
from llmserve.engine.engine import Engine
from llmserve.engine.grammar import Grammar
from llmserve.engine.jobs import (
    Admitted,
    Finished,
    FinishReason,
    GenerationSpec,
    Job,
    PrefixCopied,
    Rejected,
    RejectReason,
    Token,
)
from llmserve.engine.stream import EventStream
from llmserve.errors import (
    APIError,
    ClientDisconnected,
    EngineFailure,
    GrammarBudgetExceeded,
    QueueFull,
    QueueTimeout,
    RateLimited,
    ServiceUnavailable,
)

POLL_INTERVAL = 1.0  # seconds between checks that a silent client is still connected


@dataclass(frozen=True)
class Choice:
    index: int
    spec: GenerationSpec
    stop: tuple[str, ...]
    prompt_index: int = 0  # choices of the same prompt (``n`` > 1) share it, and count it once
    grammar: Grammar | None = None  # the spec's grammar, compiled for this choice alone


@dataclass
class Update:
    index: int
    delta: Delta
    finish_reason: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def rejection_error(event: Rejected) -> APIError:
    if event.reason is RejectReason.TENANT_QUEUE_FULL:
        return RateLimited(
            "Your organization has as many requests waiting as its limit allows; retry later.",
            kind="requests",
            retry_after=event.retry_after,
            code="tenant_queue_full",
        )
    if event.reason is RejectReason.QUEUE_FULL:
        return QueueFull("All slots are busy and the queue is full; retry later.", retry_after=event.retry_after)
    if event.reason is RejectReason.QUEUE_TIMEOUT:
        return QueueTimeout("The request waited too long for a free slot; retry later.", retry_after=event.retry_after)
    return _shutting_down()


class EngineTime:
    """The engine time of a request's jobs, complete once each job has sent its last event (``Finished``,
    or ``Rejected`` for one that never ran)."""

    def __init__(self, jobs: int) -> None:
        self._seconds = [0.0] * jobs
        self._waiting = set(range(jobs))

    @property
    def seconds(self) -> float:
        return sum(self._seconds)

    def note(self, tag: int, event: object) -> None:
        if isinstance(event, Finished):
            self._seconds[tag] = event.engine_seconds
            self._waiting.discard(tag)
        elif isinstance(event, Rejected):
            self._waiting.discard(tag)

    def settle(self, stream: EventStream, timeout: float) -> bool:
        """Take the stream's remaining events until every job has reported, for up to ``timeout`` seconds;
        False if some did not. Only for a request that no longer reads its stream."""
        deadline = time.monotonic() + timeout
        while self._waiting:
            item = stream.get(max(0.0, deadline - time.monotonic()))
            if item is None:
                return False
            self.note(*item)
        return True


def _shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable("The server is shutting down; retry on another instance.", retry_after=1)


class GenerationRun:
    """The jobs of one request. Always ``close`` it: unfinished jobs are cancelled there."""

    def __init__(
        self,
        engine: Engine,
        choices: list[Choice],
        *,
        tenant: str,
        heartbeat: float,
        admission_timeout: float,
        client_gone: Callable[[], bool] = lambda: False,
    ) -> None:
        assert engine.vocab is not None
        self._engine = engine
        self._client_gone = client_gone
        self._client_check_at = time.monotonic() + POLL_INTERVAL
        self._stream = EventStream()
        self._heartbeat = heartbeat
        self._admission_timeout = admission_timeout
        self._jobs = [
            Job(choice.spec, self._stream.sink(i), tenant, choice.grammar) for i, choice in enumerate(choices)
        ]
        self._choices = choices
        self._texts = [TextAssembler(engine.vocab.piece, choice.stop) for choice in choices]
        self._open = set(range(len(choices)))
        self._early: list[tuple[int, object]] = []
        self._cached = [0] * len(choices)
        prompts = {choice.prompt_index: len(choice.spec.prompt) for choice in choices}
        self.usage = Usage(prompt_tokens=sum(prompts.values()))
        self.finish_reasons: dict[int, str] = {}
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self._last_token_at: dict[int, float] = {}
        self.token_gaps: list[float] = []  # seconds between consecutive tokens of a choice, as delivered
        self.cancelled_by: str | None = None  # why generation ended early: client_disconnected, shutting_down
        self._engine_time = EngineTime(len(choices))

    def admit(self) -> None:
        """Submit every job and wait until all hold a slot; raise a 503 error if any is refused (a 500 if the
        engine could not start it)."""
        for job in self._jobs:
            self._engine.submit(job)
        waiting = set(range(len(self._jobs)))
        deadline = time.monotonic() + self._admission_timeout
        while waiting:
            item = self._next(deadline - time.monotonic())
            if item is None:
                raise QueueTimeout("The request waited too long for a free slot; retry later.", retry_after=1)
            tag, event = item
            if isinstance(event, Rejected):
                raise rejection_error(event)
            if isinstance(event, Finished) and event.reason is FinishReason.ERROR:
                raise _engine_error(event, "The engine could not start this generation.")
            if isinstance(event, Finished):
                raise _shutting_down()  # the engine ended a job that had not even started
            if isinstance(event, Admitted):
                waiting.discard(tag)
                self._count_cached(tag, event.cached_tokens)
            else:
                self._early.append(item)
        self.admitted_at = time.monotonic()

    def _count_cached(self, tag: int, tokens: int) -> None:
        """A prompt counts as cached as far as every choice of it found it cached: the choice that
        computed it is what it cost."""
        self._cached[tag] += tokens
        least: dict[int, int] = {}
        for choice in self._choices:
            least[choice.prompt_index] = min(least.get(choice.prompt_index, 1 << 62), self._cached[choice.index])
        self.usage.cached_tokens = sum(least.values())

    def updates(self) -> Iterator[Update | None]:
        """Text updates as they come; ``None`` when nothing came for a heartbeat interval."""
        pending = self._early
        self._early = []
        while self._open:
            item = pending.pop(0) if pending else self._next(self._heartbeat)
            if item is None:
                yield None
                continue
            tag, event = item
            if tag not in self._open:
                continue  # tokens a stopped sequence produced before the engine saw the cancel
            update = self._apply(tag, event)
            if update is not None:
                yield update

    @property
    def outputs(self) -> list[str]:
        """The text of each choice so far."""
        return [text.text for text in self._texts]

    def _next(self, timeout: float) -> tuple[int, object] | None:
        """The next event, or None after ``timeout`` quiet seconds; raises once the client has left
        (checked every POLL_INTERVAL, whether or not events are flowing)."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self._client_check_at:
                self._client_check_at = now + POLL_INTERVAL
                if self._client_gone():
                    raise ClientDisconnected("The client closed the connection.")
            item = self._stream.get(max(0.0, min(self._client_check_at, deadline) - now))
            if item is not None:
                self._engine_time.note(*item)
                return item
            if time.monotonic() >= deadline:
                return None

    @property
    def engine_seconds(self) -> float:
        """Engine time of the jobs that have reported it; all of them once ``settle`` returned True."""
        return self._engine_time.seconds

    def settle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the engine's last event of every job; call after ``close``."""
        return self._engine_time.settle(self._stream, timeout)

    def _apply(self, tag: int, event: object) -> Update | None:
        text = self._texts[tag]
        if isinstance(event, Token):
            now = time.monotonic()
            if self.first_token_at is None:
                self.first_token_at = now
            if tag in self._last_token_at:
                self.token_gaps.append(now - self._last_token_at[tag])
            self._last_token_at[tag] = now
            delta = text.add(event.token, event.logprob)
            if text.stopped:
                self._engine.cancel(self._jobs[tag], FinishReason.STOP)
                return self._finish(tag, delta, FinishReason.STOP)
            return Update(tag, delta) if delta.text or delta.logprobs else None
        if isinstance(event, PrefixCopied):
            self._count_cached(tag, event.cached_tokens)
            return None
        if isinstance(event, Finished):
            if event.reason in (FinishReason.STOP, FinishReason.LENGTH):
                return self._finish(tag, text.finish(), event.reason)
            if event.reason is FinishReason.CANCELLED:
                self.cancelled_by = "shutting_down"
                raise _shutting_down()  # nobody here cancelled it: the engine is stopping
            self.cancelled_by = "engine_error" if event.failure is None else "grammar_budget_exceeded"
            raise _engine_error(event, "The engine stopped this generation; retry the request.")
        if isinstance(event, Rejected):
            raise rejection_error(event)
        return None

    def _finish(self, tag: int, delta: Delta, reason: FinishReason) -> Update:
        self._open.discard(tag)
        self.usage.completion_tokens += self._texts[tag].tokens
        self.finish_reasons[tag] = reason.value
        return Update(tag, delta, reason.value)

    def close(self) -> None:
        """Cancel the choices still generating; the tokens they did generate still count as used."""
        if self._open and self.cancelled_by is None:
            self.cancelled_by = "client_disconnected"  # the response was abandoned before every choice ended
        for tag in self._open:
            self._engine.cancel(self._jobs[tag])
            self.usage.completion_tokens += self._texts[tag].tokens
        self._open.clear()


def _engine_error(event: Finished, message: str) -> APIError:
    """The error for a job the engine ended: the request's own fault when the engine says so (a grammar
    past its budget; one choice of several may end so while another still waits for a slot), else the
    engine's, with ``message``."""
    if event.failure is not None:
        return GrammarBudgetExceeded(event.failure)
    return EngineFailure(message)
