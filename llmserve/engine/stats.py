"""Engine statistics: counted on the engine thread, published as one immutable snapshot per step.

Readers on the hub get the latest snapshot by reading one attribute, which is atomic; they never see a
half-updated set of numbers and never take a lock the engine holds.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    embedded_inputs: int = 0
    cancelled: int = 0
    rejected: int = 0
    jobs_per_second: float = 0.0
    model_load_seconds: float = 0.0


class StatsRecorder:
    """Mutable counters owned by the engine thread."""

    def __init__(self, slots_total: int) -> None:
        self.slots_total = slots_total
        self.steps = 0
        self.last_step_seconds = 0.0
        self.last_batch_tokens = 0
        self.tokens_per_second = 0.0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0
        self.embedded_inputs = 0
        self.cancelled = 0
        self.rejected = 0
        self.model_load_seconds = 0.0
        self.snapshot = EngineStats(slots_total=slots_total)

    def record_step(self, seconds: float, batch_tokens: int) -> None:
        self.steps += 1
        self.last_step_seconds = seconds
        self.last_batch_tokens = batch_tokens
        if seconds > 0:
            # Smoothed over roughly the last 20 steps.
            self.tokens_per_second += (batch_tokens / seconds - self.tokens_per_second) / 20

    def publish(self, *, busy: int, prefilling: int, kv_cells: int, queued: int, jobs_per_second: float) -> None:
        self.snapshot = EngineStats(
            slots_total=self.slots_total,
            slots_busy=busy,
            slots_prefilling=prefilling,
            queued=queued,
            kv_cells_used=kv_cells,
            steps=self.steps,
            last_step_seconds=self.last_step_seconds,
            last_batch_tokens=self.last_batch_tokens,
            tokens_per_second=self.tokens_per_second,
            prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            generated_tokens=self.generated_tokens,
            embedded_inputs=self.embedded_inputs,
            cancelled=self.cancelled,
            rejected=self.rejected,
            jobs_per_second=jobs_per_second,
            model_load_seconds=self.model_load_seconds,
        )
