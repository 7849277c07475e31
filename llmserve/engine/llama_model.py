"""A thin, typed layer over llama-cpp-python's low-level API: model, vocabulary and contexts.

The high-level ``llama_cpp.Llama`` object is not thread-safe and runs one sequence at a time, so the
engine drives llama.cpp directly. Contexts are used only on the engine thread; the vocabulary is
read-only after load, so tokenizing and detokenizing are safe from any thread (llama-server does the
same from its HTTP threads).
"""

from __future__ import annotations

import ctypes
import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

log = logging.getLogger(__name__)

_GGML_WARN, _GGML_ERROR, _GGML_CONTINUED = 3, 4, 5  # ggml_log_level (NONE, DEBUG, INFO, WARN, ERROR, CONT)
_last_level = 0


@lc.llama_log_callback
def _log_from_llama_cpp(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """llama.cpp's own log, through Python's logging (so it keeps the server's log format): its warnings
    and errors only; its progress lines (hundreds at every model load) are dropped."""
    global _last_level
    level = _last_level if level == _GGML_CONTINUED else level
    _last_level = level
    if level in (_GGML_WARN, _GGML_ERROR):
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            log.log(logging.ERROR if level == _GGML_ERROR else logging.WARNING, "llama.cpp: %s", message)


lc.llama_log_set(_log_from_llama_cpp, ctypes.c_void_p(0))
lc.llama_backend_init()


# Held by every context of a process while it decodes (several models' engines share one): ggml's
# threads spin-wait for each other at every operation, so two decodes at once on the same CPUs slow both
# many times over, where taking turns costs each only the other's step. A native lock, never a gevent one.
DecodeGate = AbstractContextManager[Any]


class LlamaError(Exception):
    """llama.cpp refused an operation."""


class Vocabulary:
    """Tokenizer and detokenizer of a loaded model."""

    def __init__(self, model: lc.llama_model_p) -> None:
        self._vocab = lc.llama_model_get_vocab(model)
        self.pointer = self._vocab  # for llama.cpp calls that need the vocabulary itself (grammars)
        self.size = lc.llama_vocab_n_tokens(self._vocab)
        self.bos = lc.llama_vocab_bos(self._vocab)
        self.eos = lc.llama_vocab_eos(self._vocab)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Tokenize ``text``; special tokens written in it (``<start_of_turn>``) are parsed as such."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (lc.llama_token * capacity)()
        count = lc.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, True)
        if count < 0:
            capacity = -count
            buffer = (lc.llama_token * capacity)()
            count = lc.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, True)
        if count < 0:
            raise LlamaError(f"tokenization failed for a text of {len(data)} bytes")
        return list(buffer[:count])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as it appears in generated text (control tokens render empty)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        buffer = ctypes.create_string_buffer(64)
        length = lc.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
        if length < 0:
            buffer = ctypes.create_string_buffer(-length)
            length = lc.llama_token_to_piece(self._vocab, token, buffer, -length, 0, False)
        piece = buffer.raw[:length]
        self._pieces[token] = piece
        return piece

    def special_text(self, token: int) -> str:
        """A control token's own text (``<bos>``), as chat templates write it."""
        buffer = ctypes.create_string_buffer(256)
        length = lc.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, True)
        return buffer.raw[: max(0, length)].decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(lc.llama_vocab_is_eog(self._vocab, token))

    def is_valid(self, token: int) -> bool:
        return 0 <= token < self.size

    def token_text(self, token: int) -> str:
        """A token's text for logprobs listings; bytes that are not UTF-8 on their own are escaped."""
        return self.piece(token).decode("utf-8", errors="backslashreplace")


class LlamaModel:
    """A loaded GGUF model; with ``vocab_only``, its vocabulary and metadata without the weights."""

    def __init__(self, path: Path, *, gpu_layers: int, vocab_only: bool = False) -> None:
        params = lc.llama_model_default_params()
        params.n_gpu_layers = gpu_layers if gpu_layers >= 0 else 1_000_000
        params.vocab_only = vocab_only
        self.path = path
        self.pointer = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self.pointer:
            raise LlamaError(f"llama.cpp could not {'read' if vocab_only else 'load'} {path}")
        self.vocab = Vocabulary(self.pointer)
        # A vocabulary-only load leaves the model's hyperparameters unset: they are read as metadata.
        self.embedding_size = (
            self.hyperparameter("embedding_length") if vocab_only else lc.llama_model_n_embd(self.pointer)
        )

    def metadata(self, key: str) -> str | None:
        return _metadata(self.pointer, key)

    def hyperparameter(self, key: str, default: int | None = None) -> int:
        """The architecture's ``key`` (``block_count``); ``default`` when it is absent or a per-layer array."""
        value = self.metadata(f"{self.metadata('general.architecture') or ''}.{key}")
        if value is not None and value.isdigit():
            return int(value)
        if default is None:
            raise LlamaError(f"{self.path} has no {key}")
        return default

    def close(self) -> None:
        """Free the weights; nothing may use the model or its vocabulary afterwards."""
        if self.pointer:
            lc.llama_model_free(self.pointer)
            self.pointer = None


def _metadata(model: lc.llama_model_p, key: str) -> str | None:
    buffer = ctypes.create_string_buffer(1 << 16)
    length = lc.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    if length < 0:
        return None
    if length >= len(buffer):
        buffer = ctypes.create_string_buffer(length + 1)
        lc.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
    return buffer.value.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class ModelShape:
    """What a model's memory needs depend on, read from its GGUF without loading the weights."""

    file_bytes: int
    layers: int
    kv_heads: int
    key_length: int  # per head
    value_length: int
    vocab_size: int


def read_shape(path: Path) -> ModelShape:
    """The shape of the GGUF at ``path``, from its metadata, without loading the weights."""
    model = LlamaModel(path, gpu_layers=0, vocab_only=True)
    try:
        heads = model.hyperparameter("attention.head_count")
        head_size = model.embedding_size // max(1, heads)
        return ModelShape(
            file_bytes=path.stat().st_size,
            layers=model.hyperparameter("block_count"),
            kv_heads=model.hyperparameter("attention.head_count_kv", heads),
            key_length=model.hyperparameter("attention.key_length", head_size),
            value_length=model.hyperparameter("attention.value_length", head_size),
            vocab_size=model.vocab.size,
        )
    finally:
        model.close()


class LlamaContext:
    """A llama.cpp context with its KV memory and one reusable batch; engine thread only."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int,
        n_batch: int,
        n_seq_max: int,
        threads: int,
        embeddings: bool = False,
        unified_kv: bool = False,
        decode_gate: DecodeGate | None = None,
    ) -> None:
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads
        params.kv_unified = unified_kv
        # A full-size sliding-window cache keeps every cell, so a sequence can be trimmed at any
        # position (prefix reuse) and copied (prefix sharing); a window-sized one evicts old cells.
        params.swa_full = True
        params.no_perf = True
        if embeddings:  # one embedding per token, pooled by the caller
            params.embeddings = True
            params.pooling_type = lc.LLAMA_POOLING_TYPE_NONE
        self.pointer = lc.llama_init_from_model(model.pointer, params)
        if not self.pointer:
            raise LlamaError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.n_vocab = model.vocab.size
        self.n_embd = model.embedding_size
        self.capacity = n_batch
        self.memory = lc.llama_get_memory(self.pointer)
        self._batch = lc.llama_batch_init(n_batch, 0, 1)
        self._gate = decode_gate or nullcontext()
        self._size = 0
        self.outputs = 0  # entries of the batch that want logits; their rows follow batch order

    # -- batch building -------------------------------------------------------------------------

    def clear_batch(self) -> None:
        self._size = 0
        self.outputs = 0

    @property
    def batch_size(self) -> int:
        return self._size

    def add(self, token: int, position: int, sequence: int, wants_output: bool) -> None:
        """Append one token to the batch; one that wants output gets the next row of ``logits()``."""
        index = self._size
        batch = self._batch
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence
        batch.logits[index] = wants_output
        self._size = index + 1
        self.outputs += wants_output

    def decode(self) -> None:
        self._batch.n_tokens = self._size
        with self._gate:
            status = lc.llama_decode(self.pointer, self._batch)
        if status != 0:
            raise LlamaError(f"llama_decode failed with status {status} for {self._size} tokens")

    # -- outputs ---------------------------------------------------------------------------------

    def logits(self) -> np.ndarray:
        """Logits of every output of the last decode, one row each in batch order (a view, valid until
        the next decode)."""
        pointer = lc.llama_get_logits(self.pointer)
        return np.ctypeslib.as_array(pointer, shape=(self.outputs, self.n_vocab))

    def token_embeddings(self) -> np.ndarray:
        """The embedding of every output of the last decode of an embeddings context, one row each in batch
        order (a view, valid until the next decode)."""
        pointer = lc.llama_get_embeddings(self.pointer)
        if not pointer:
            raise LlamaError("this context computes no embeddings")
        return np.ctypeslib.as_array(pointer, shape=(self.outputs, self.n_embd))

    # -- KV memory -------------------------------------------------------------------------------

    def forget(self, sequence: int, start: int = 0) -> int:
        """Drop the cells of ``sequence`` from position ``start`` on; returns how many cells it keeps.

        llama.cpp refuses to cut some caches in the middle (a sliding-window cache that evicts old
        cells; contexts here keep a full-size one, so this is a safeguard): then the whole sequence
        is dropped and 0 is returned.
        """
        if start > 0 and lc.llama_memory_seq_rm(self.memory, sequence, start, -1):
            return start
        lc.llama_memory_seq_rm(self.memory, sequence, -1, -1)
        return 0

    def copy_sequence(self, source: int, target: int, length: int) -> None:
        """Make ``target`` hold the first ``length`` cells of ``source``.

        Sequences of a split cache live in separate streams, which llama.cpp copies whole (the data at
        the start of the next decode); the cells past ``length`` are then dropped from the target.
        """
        lc.llama_memory_seq_rm(self.memory, target, -1, -1)
        lc.llama_memory_seq_cp(self.memory, source, target, -1, -1)
        if not lc.llama_memory_seq_rm(self.memory, target, length, -1):
            raise LlamaError(f"could not trim the copy of sequence {source} to {length} cells")

    def clear(self) -> None:
        lc.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if self.pointer:
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.pointer)
            self.pointer = None
