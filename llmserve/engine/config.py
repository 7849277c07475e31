"""What an engine is told about its model: its name, slots, context sizes and decode threads.

The engine's own description, so that it needs nothing from the server's settings (which build it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    id: str  # the model id, for logs
    parallel: int  # sequence slots decoded together
    context_length: int  # tokens per sequence
    batch_tokens: int  # most tokens in one decode
    threads: int
    gpu_layers: int
    embeddings: bool  # keep a second, pooled context for embedding requests
    embedding_context: int  # longest embedding input in tokens


@dataclass(frozen=True)
class StepTimes:
    """How long one decode takes: ``step_seconds + sequence_seconds * sequences decoding a token +
    prompt_token_seconds * prompt tokens computed`` (a linear fit of measured llama.cpp steps)."""

    step_seconds: float
    sequence_seconds: float
    prompt_token_seconds: float

    def seconds(self, sequences: int, prompt_tokens: int) -> float:
        return self.step_seconds + self.sequence_seconds * sequences + self.prompt_token_seconds * prompt_tokens
