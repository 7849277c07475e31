"""Embeddings: a second llama.cpp context, mean-pooled here, one bounded decode per engine turn, and the
engine's lane that embedding jobs wait for and run in.

A separate context keeps embedding runs from disturbing the generation context's KV cache. Each decode
holds at most ``BATCH_TOKENS`` tokens: several short inputs, or the next piece of a long one, whose later
pieces attend to the earlier ones through the KV cache as a prompt's prefill chunks do. The mean of an
input's token embeddings is summed up piece by piece. Bounding the decode bounds two things: how long
one embedding turn delays the running streams, and llama.cpp's output buffer, which holds a full row of
logits for every token an embedding decode outputs (262k floats, 1 MiB, for Gemma 3), so that a decode of
2048 tokens grew each worker by 2 GiB.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from llmserve.engine.backend import Backend, ContextSpec, LoadedModel
from llmserve.engine.config import EngineConfig
from llmserve.engine.jobs import Admitted, Embeddings, EmbeddingSpec, Finished, FinishReason, Job
from llmserve.engine.llama_model import DecodeGate
from llmserve.engine.stats import StatsRecorder
from scheduler import FairScheduler

BATCH_TOKENS = 64
MAX_SEQUENCES_PER_DECODE = 16


class Embedder:
    def __init__(
        self, backend: Backend, model: LoadedModel, config: EngineConfig, decode_gate: DecodeGate | None = None
    ) -> None:
        spec = ContextSpec(
            # The input begun by the last decode, plus the rest of this decode's batch.
            n_ctx=config.embedding_context + BATCH_TOKENS,
            n_batch=BATCH_TOKENS,
            n_seq_max=MAX_SEQUENCES_PER_DECODE,
            threads=config.threads,
            embeddings=True,
            unified_kv=True,
        )
        self._context = backend.context(model, spec, decode_gate)
        self._job: int | None = None
        self._vectors: list[np.ndarray] = []  # of the inputs done, in order
        self._decoded = 0  # tokens of the next input already decoded (and in the KV cache)
        self._sum = np.zeros(model.embedding_size, dtype=np.float64)  # their embeddings, summed

    def step(self, job: int, inputs: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, ...] | None:
        """One decode for job ``job``: its mean-pooled, L2-normalised vectors once all ``inputs`` are done,
        else None. A job the embedder was not working on starts afresh (the previous one ended)."""
        if job != self._job:
            self._begin(job)
        context = self._context
        context.clear_batch()
        pieces: list[tuple[int, int]] = []  # (input, tokens of it in this decode)
        budget, decoded = BATCH_TOKENS, self._decoded
        for index in range(len(self._vectors), len(inputs)):
            if not budget or len(pieces) == MAX_SEQUENCES_PER_DECODE:
                break
            tokens = inputs[index]
            end = min(len(tokens), decoded + budget)
            for position in range(decoded, end):
                context.add(tokens[position], position, index % MAX_SEQUENCES_PER_DECODE, True)
            pieces.append((index, end - decoded))
            budget -= end - decoded
            decoded = 0
        context.decode()
        rows = context.token_embeddings()
        first = 0
        for index, count in pieces:
            self._sum += rows[first : first + count].sum(axis=0, dtype=np.float64)
            first += count
            self._decoded += count
            if self._decoded == len(inputs[index]):
                self._vectors.append(_normalised(self._sum / self._decoded))
                self._sum[:] = 0.0
                self._decoded = 0
                context.forget(index % MAX_SEQUENCES_PER_DECODE)
        if len(self._vectors) < len(inputs):
            return None
        vectors, self._job = tuple(self._vectors), None
        return vectors

    def embed(self, inputs: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, ...]:
        """All of ``inputs`` at once (the warm-up)."""
        self._job = None
        while (vectors := self.step(-1, inputs)) is None:
            pass
        return vectors

    def _begin(self, job: int) -> None:
        self._context.clear()
        self._job, self._vectors, self._decoded = job, [], 0
        self._sum[:] = 0.0

    def close(self) -> None:
        self._context.close()


def _normalised(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm if norm > 0 else vector).astype(np.float32)


class EmbeddingLane:
    """The engine's one embedding lane: the fair scheduler its jobs wait in (with the generations' caps,
    shares and timeouts), the job it holds, and that job's embedder decodes, one per engine turn."""

    def __init__(self, scheduler: FairScheduler[Job], stats: StatsRecorder, on_finished: Callable[[Job], None]) -> None:
        self.scheduler = scheduler
        self.job: Job | None = None
        self._stats = stats
        self._on_finished = on_finished  # the engine's drain rates count finished jobs

    @property
    def free(self) -> int:
        return int(self.job is None)

    def admit(self) -> None:
        """Give a free lane to the embedding job the scheduler picks; it is charged its input tokens."""
        if self.job is not None:
            return
        job = self.scheduler.next()
        if job is None:
            return
        assert isinstance(job.spec, EmbeddingSpec)
        self.scheduler.charge(job, prompt_tokens=sum(len(tokens) for tokens in job.spec.inputs))
        self.job = job
        job.sink.push(Admitted(cached_tokens=0))

    def step(self, embedder: Embedder) -> None:
        """One bounded embedding decode for the job in the lane; most jobs take several turns."""
        job = self.job
        assert job is not None and isinstance(job.spec, EmbeddingSpec)
        started = time.perf_counter()
        vectors = embedder.step(job.id, job.spec.inputs)
        seconds = time.perf_counter() - started
        job.engine_seconds += seconds
        self._stats.record_embedding(seconds)
        if vectors is not None:
            self._stats.embedded_inputs += len(vectors)
            job.sink.push(Embeddings(vectors))
            self.end(FinishReason.STOP)

    def end(self, reason: FinishReason) -> None:
        """End the job in the lane, which must hold one."""
        job = self.job
        assert job is not None
        if reason is FinishReason.CANCELLED:
            self._stats.cancelled += 1
        job.sink.push(Finished(reason, job.engine_seconds))
        self.scheduler.release(job)
        self._on_finished(job)
        self.job = None
