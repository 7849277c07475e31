"""What the engine asks of the library that computes the model: a loaded model and decode contexts.

The engine's loop (slots, scheduling, prefix reuse, sampling, streaming) is the same whatever computes
the logits. ``LlamaBackend`` is llama.cpp through llama-cpp-python, the one production backend;
``simulated.SimulatedBackend`` replaces the decode with a step-time model for fleet benchmarks and fast
tests, and is only ever chosen explicitly (``backend = "simulated"`` on a model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from llmserve.engine.llama_model import DecodeGate, LlamaContext, LlamaModel, Vocabulary


class LoadedModel(Protocol):
    """A model the engine serves: its vocabulary (tokenizer, grammars and chat templates use it) and
    GGUF metadata."""

    path: Path
    vocab: Vocabulary
    embedding_size: int

    def metadata(self, key: str) -> str | None: ...

    def close(self) -> None: ...


class DecodeContext(Protocol):
    """One context: a reusable batch, its decode, the outputs of the last decode and the KV memory of
    ``n_seq_max`` sequences. Used on the engine thread only."""

    capacity: int  # most tokens in one batch
    outputs: int  # entries of the batch that want output; their rows follow batch order

    @property
    def batch_size(self) -> int: ...

    def clear_batch(self) -> None: ...

    def add(self, token: int, position: int, sequence: int, wants_output: bool) -> None: ...

    def decode(self) -> None:
        """Compute the batch; raises ``LlamaError`` when the batch is refused."""

    def logits(self) -> np.ndarray: ...

    def token_embeddings(self) -> np.ndarray: ...

    def forget(self, sequence: int, start: int = 0) -> int: ...

    def copy_sequence(self, source: int, target: int, length: int) -> None: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ContextSpec:
    """The shape of a decode context."""

    n_ctx: int  # KV cells, over all sequences
    n_batch: int  # most tokens in one decode
    n_seq_max: int
    threads: int
    embeddings: bool = False  # one embedding per token instead of logits
    unified_kv: bool = False  # one KV stream shared by the sequences


class Backend(Protocol):
    name: str  # as reported in /readyz and /v1/models

    def load(self, path: Path, *, gpu_layers: int) -> LoadedModel: ...

    def context(
        self, model: LoadedModel, spec: ContextSpec, decode_gate: DecodeGate | None = None
    ) -> DecodeContext: ...


class LlamaBackend:
    """llama.cpp: the model's weights loaded and computed by the library."""

    name = "llama.cpp"

    def load(self, path: Path, *, gpu_layers: int) -> LoadedModel:
        return LlamaModel(path, gpu_layers=gpu_layers)

    def context(self, model: LoadedModel, spec: ContextSpec, decode_gate: DecodeGate | None = None) -> DecodeContext:
        assert isinstance(model, LlamaModel)
        return LlamaContext(model, **dataclasses.asdict(spec), decode_gate=decode_gate)
