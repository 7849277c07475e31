"""A sequence slot of the engine, what it puts into a step, and how a step's time is charged to its jobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llmserve.engine.jobs import GenerationSpec, Job
from llmserve.engine.sampling import Sampler


@dataclass
class Slot:
    """One sequence slot: a KV-cache sequence id, the tokens it holds, and the job decoding in it."""

    index: int
    cached: list[int] = field(default_factory=list)
    job: Job | None = None
    spec: GenerationSpec | None = None
    sampler: Sampler | None = None
    prefilled: int = 0
    generated: int = 0
    next_token: int = -1
    output_row: int = -1  # the row of the step's outputs this slot samples from, -1 if none this step
    donor: Slot | None = None  # a slot computing our prompt's prefix, to be copied when it has
    shared: int = 0  # how much of our prompt the donor will hold
    admitted: int = 0  # when it last took a job (the engine's admission count), 0 if never: for eviction

    @property
    def computing(self) -> bool:
        """Feeding its own prompt or generating (not waiting for a donor)."""
        return self.job is not None and self.donor is None

    @property
    def prefilling(self) -> bool:
        return self.spec is not None and self.prefilled < len(self.spec.prompt)


@dataclass
class Fed:
    """What one slot put into a step's batch, and how to take it back if the decode fails."""

    slot: Slot
    job: Job
    tokens: int  # the tokens it put in (one when generating, a chunk when prefilling), for charging the step
    cached_before: int
    prefilled_before: int


def charge_step(seconds: float, jobs: Sequence[Job], tokens: Sequence[int]) -> None:
    """Split one step's time among its jobs by the tokens each put into the batch (a decoded token counts
    one, a prefill chunk its length), so that the engine time of all jobs adds up to the engine's."""
    total = sum(tokens)
    if total:
        per_token = seconds / total
        for job, count in zip(jobs, tokens, strict=True):
            job.engine_seconds += per_token * count


def slot_for(slots: Sequence[Slot], free: Sequence[Slot], prompt: Sequence[int], worth_reusing: int) -> Slot:
    """The free slot to decode ``prompt`` in: the one holding its longest cached prefix, when that prefix
    is worth reusing (at least ``worth_reusing`` tokens, or half a shorter prompt). Otherwise one whose
    cache is worth least: empty, or a copy of what another slot holds, or else the least recently used.

    Without that rule, a prompt sharing only its opening (a common phrase, a chat template's header) with
    a cached one would evict it while an empty slot was free, and a second request of a busy session
    would evict another session's prompt rather than a spare copy of its own: a replica serving a few
    sessions would keep only some of them cached.
    """
    shared, best = max(((common_prefix(slot.cached, prompt), slot) for slot in free), key=lambda pair: pair[0])
    if shared >= min(worth_reusing, len(prompt) // 2):
        return best
    return min(free, key=lambda slot: (bool(slot.cached) and not _copied(slot, slots, worth_reusing), slot.admitted))


def _copied(slot: Slot, slots: Sequence[Slot], length: int) -> bool:
    """Another slot holds, or is being filled with, the same first ``length`` tokens as ``slot``'s cache
    (only the opening is compared: this runs on the engine thread at every admission)."""
    opening = slot.cached[:length]
    for other in slots:
        held = other.spec.prompt if other.spec is not None else other.cached
        if other is not slot and len(held) >= len(opening) and list(held[: len(opening)]) == opening:
            return True
    return False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = min(len(a), len(b))
    for i in range(length):
        if a[i] != b[i]:
            return i
    return length
