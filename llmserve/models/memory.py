"""How much memory a model will take, estimated before it is loaded, against the host's budget.

A model's weights are mapped from its file, so the page cache holds them once however many workers use
them. Each worker then allocates, per model and context, a KV cache (``parallel x context_length``
cells for the slots; a cell holds every layer's keys and values in f16), an output buffer with a row of
logits per sequence, and a compute buffer dominated by the logits of a full batch (``batch_tokens``
rows). The embedding context adds a smaller cache and both buffers for its 64-token batches. The
estimate counts all of it as allocated, whether or not the pages are touched yet: a budget must hold
when every slot is full. Checked against llama.cpp's own report of the buffers it allocates
(docs/models.md): the KV, output and compute buffers agree to the MiB for both embedded models.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmserve.engine.embedder import BATCH_TOKENS as EMBEDDING_BATCH
from llmserve.engine.llama_model import ModelShape
from llmserve.settings import ModelSettings

KV_CELL_BYTES = 2  # llama.cpp's default KV cache type is f16
LOGIT_BYTES = 4
MIB = 1 << 20


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes, once per host
    per_worker: int  # bytes in each worker

    def total(self, workers: int) -> int:
        return self.weights + workers * self.per_worker


def estimate(shape: ModelShape, model: ModelSettings) -> MemoryEstimate:
    cell = shape.layers * shape.kv_heads * (shape.key_length + shape.value_length) * KV_CELL_BYTES
    logits_row = shape.vocab_size * LOGIT_BYTES
    per_worker = model.parallel * (model.context_length * cell + logits_row) + model.batch_tokens * logits_row
    if model.embeddings:
        per_worker += (model.embedding_context + EMBEDDING_BATCH) * cell + 2 * EMBEDDING_BATCH * logits_row
    return MemoryEstimate(weights=shape.file_bytes, per_worker=per_worker)


def over_budget(estimates: dict[str, MemoryEstimate], workers: int, budget_mib: int | None) -> str | None:
    """Why these models together would not fit ``budget_mib``; None when they would (or there is none)."""
    if budget_mib is None:
        return None
    needed = sum(value.total(workers) for value in estimates.values())
    if needed <= budget_mib * MIB:
        return None
    parts = ", ".join(f"{name} {value.total(workers) / MIB:.0f} MiB" for name, value in estimates.items())
    return (
        f"the models would need about {needed / MIB:.0f} MiB with {workers} worker(s) ({parts}), "
        f"over the memory budget of {budget_mib} MiB (memory_budget_mib)"
    )
