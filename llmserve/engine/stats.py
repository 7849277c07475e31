"""Engine statistics: counted on the engine thread, published as one immutable snapshot per step.

Readers on the hub get the latest snapshot by reading one attribute, which is atomic; they never see a
half-updated set of numbers and never take a lock the engine holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

# Steps are kept for the metrics until the publisher takes them (about once a second); a stalled
# publisher loses the oldest, never memory.
STEP_HISTORY = 4096


@dataclass(frozen=True)
class TenantLoad:
    running: int
    queued: int
    counter: float  # the fair-share scheduler's virtual token counter


@dataclass(frozen=True)
class StepSample:
    seconds: float
    batch_tokens: int


@dataclass(frozen=True)
class EngineStats:
    slots_total: int
    slots_busy: int = 0
    slots_prefilling: int = 0
    queued: int = 0
    kv_cells_used: int = 0
    steps: int = 0
    last_step_seconds: float = 0.0
    last_batch_tokens: int = 0
    tokens_per_second: float = 0.0
    busy_seconds: float = 0.0  # decode steps (with sampling) and embedding decodes, since the start
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    embedded_inputs: int = 0
    cancelled: int = 0
    rejected: int = 0
    jobs_per_second: float = 0.0
    model_load_seconds: float = 0.0
    tenants: dict[str, TenantLoad] = field(default_factory=dict)

    @property
    def saturation(self) -> float:
        """0-1: how full the engine is; 1 once every slot is busy or anything waits."""
        return min(1.0, (self.slots_busy + self.queued) / self.slots_total) if self.slots_total else 1.0


@dataclass
class StatsRecorder:
    """Running counters owned by the engine thread; each of them appears under its name in the snapshot."""

    slots_total: int
    steps: int = 0
    last_step_seconds: float = 0.0
    last_batch_tokens: int = 0
    tokens_per_second: float = 0.0
    busy_seconds: float = 0.0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    embedded_inputs: int = 0
    cancelled: int = 0
    rejected: int = 0
    model_load_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.snapshot = EngineStats(slots_total=self.slots_total)
        # Appended on the engine thread, popped on the hub: deque's append and popleft are atomic.
        self.recent_steps: deque[StepSample] = deque(maxlen=STEP_HISTORY)

    def record_step(self, seconds: float, batch_tokens: int) -> None:
        self.steps += 1
        self.busy_seconds += seconds
        self.last_step_seconds = seconds
        self.last_batch_tokens = batch_tokens
        self.recent_steps.append(StepSample(seconds, batch_tokens))
        if seconds > 0:
            # Smoothed over roughly the last 20 steps.
            self.tokens_per_second += (batch_tokens / seconds - self.tokens_per_second) / 20

    def record_embedding(self, seconds: float) -> None:
        self.busy_seconds += seconds

    def take_steps(self) -> list[StepSample]:
        """The steps recorded since the last call (hub side)."""
        taken = []
        while self.recent_steps:
            taken.append(self.recent_steps.popleft())
        return taken

    def publish(
        self,
        *,
        busy: int,
        prefilling: int,
        kv_cells: int,
        queued: int,
        jobs_per_second: float,
        tenants: dict[str, TenantLoad],
    ) -> None:
        self.snapshot = EngineStats(
            **{counter.name: getattr(self, counter.name) for counter in fields(self)},
            slots_busy=busy,
            slots_prefilling=prefilling,
            queued=queued,
            kv_cells_used=kv_cells,
            jobs_per_second=jobs_per_second,
            tenants=tenants,
        )
