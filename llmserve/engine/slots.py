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


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = min(len(a), len(b))
    for i in range(length):
        if a[i] != b[i]:
            return i
    return length
