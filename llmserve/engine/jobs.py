"""What greenlets hand the engine (jobs) and what the engine hands back (events).

Jobs and events are small immutable values so that crossing from the engine's native thread to the gevent
hub needs no locks: a job's mutable fields are its stop reason, written by the request side and read by
the engine between steps, and its engine time, written by the engine alone.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np

from llmserve.engine.grammar import Grammar

_job_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    """Per-sequence sampling; each running sequence keeps its own sampler built from these."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def penalised(self) -> bool:
        """Whether the tokens generated so far change the next token's logits."""
        return self.repeat_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    @property
    def greedy(self) -> bool:
        """Pure argmax: no randomness and no history-dependent penalties."""
        return self.temperature == 0 and not self.penalised

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")


class Fault(StrEnum):
    """A failure a fault drill asks for (the ``fault_drills`` setting), once the job holds a slot."""

    SEQUENCE = "sequence"  # after its first token, its own decode fails (a token id llama.cpp refuses)
    ENGINE = "engine"  # the engine thread fails
    STALL = "stall"  # the engine thread stops making progress until it is stopped


@dataclass(frozen=True)
class GenerationSpec:
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    top_logprobs: int | None = None  # None: no logprobs; 0: only the sampled token's
    grammar: str | None = None  # GBNF (rule ``root``) the output must match: structured outputs, tool calls
    fault: Fault | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("prompt must hold at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")


@dataclass(frozen=True)
class EmbeddingSpec:
    inputs: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.inputs or not all(self.inputs):
            raise ValueError("every embedding input must hold at least one token")


class RejectReason(StrEnum):
    QUEUE_FULL = "queue_full"
    TENANT_QUEUE_FULL = "tenant_queue_full"
    QUEUE_TIMEOUT = "queue_timeout"
    SHUTTING_DOWN = "shutting_down"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class Admitted:
    """The job left the queue and holds a slot; ``cached_tokens`` of its prompt were reused."""

    cached_tokens: int


@dataclass(frozen=True)
class PrefixCopied:
    """More of the prompt came from another slot's cache: ``cached_tokens`` beyond those in Admitted."""

    cached_tokens: int


@dataclass(frozen=True)
class Rejected:
    reason: RejectReason
    retry_after: float


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Token:
    token: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class Embeddings:
    vectors: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Finished:
    """The job's last event; ``engine_seconds`` is the engine time attributed to it, whatever its end."""

    reason: FinishReason
    engine_seconds: float = 0.0
    failure: str | None = None  # with ERROR: the request's grammar was too costly, and what to tell its client


Event = Admitted | PrefixCopied | Rejected | Token | Embeddings | Finished


class EventSink(Protocol):
    def push(self, event: Event) -> None:
        """Deliver an event; called from the engine thread, must not block."""
        ...


@dataclass(eq=False)
class Job:
    """One unit of engine work. Identity is the job itself (hashable by id).

    ``stop_reason`` is the one field the request side writes: set, it asks the engine to end the job
    (CANCELLED when the client left, STOP when a stop sequence was found) before its next step.
    ``engine_seconds`` and ``failure`` are written by the engine thread only, and read by the request
    side only through the ``Finished`` event.
    """

    spec: GenerationSpec | EmbeddingSpec
    sink: EventSink
    tenant: str = "default"
    # The spec's grammar, compiled by the request side off the hub and the engine thread; the engine
    # thread alone uses it once the job is submitted.
    grammar: Grammar | None = None
    id: int = field(default_factory=lambda: next(_job_ids))
    stop_reason: FinishReason | None = None
    engine_seconds: float = 0.0
    failure: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.stop_reason is not None

    def __hash__(self) -> int:
        return self.id
