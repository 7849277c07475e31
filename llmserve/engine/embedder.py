"""Embeddings from a second llama.cpp context with mean pooling, run on the engine thread.

A separate context keeps pooled embedding runs from disturbing the generation context's KV cache; the
engine interleaves one embedding decode between generation steps, so long embedding jobs delay running
streams by at most one decode.
"""

from __future__ import annotations

import numpy as np

from llmserve.engine.llama_model import LlamaContext, LlamaModel
from llmserve.settings import ModelSettings

MAX_SEQUENCES_PER_DECODE = 16


class Embedder:
    def __init__(self, model: LlamaModel, settings: ModelSettings) -> None:
        self._context = LlamaContext(
            model,
            n_ctx=settings.embedding_context,
            n_batch=settings.embedding_context,
            n_seq_max=MAX_SEQUENCES_PER_DECODE,
            threads=settings.threads,
            embeddings=True,
            unified_kv=True,
        )

    def fitting(self, inputs: tuple[tuple[int, ...], ...]) -> int:
        """How many of ``inputs``, from the first, fit into one decode (always at least one)."""
        total = 0
        for count, tokens in enumerate(inputs[:MAX_SEQUENCES_PER_DECODE]):
            total += len(tokens)
            if total > self._context.capacity:
                return max(1, count)
        return min(len(inputs), MAX_SEQUENCES_PER_DECODE)

    def embed(self, inputs: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
        """Mean-pooled, L2-normalised vectors for inputs that fit into one decode."""
        context = self._context
        context.clear_batch()
        for sequence, tokens in enumerate(inputs):
            for position, token in enumerate(tokens):
                context.add(token, position, sequence, True)
        context.decode()
        vectors = []
        for sequence in range(len(inputs)):
            vector = context.sequence_embedding(sequence)
            norm = float(np.linalg.norm(vector))
            vectors.append(vector / norm if norm > 0 else vector)
        context.clear()
        return vectors

    def close(self) -> None:
        self._context.close()
