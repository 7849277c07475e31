"""The simulated backend: the real engine and HTTP stack, with llama.cpp's decode replaced by a step-time
model, so that a fleet of replicas (4-8 on a small machine) can be benchmarked and tested without the
replicas fighting over the CPUs.

What stays real: the model's GGUF is opened for its vocabulary and metadata only (``vocab_only``, a few
MB), so tokenizing, chat templates, grammars, stop sequences, usage counts, slots, the fair scheduler,
prefix reuse and streaming behave as with the model. What is simulated: each decode sleeps for as long
as the calibrated model says such a step takes (a fixed cost per step, a cost per decoding sequence and
one per prompt token computed: cached prefixes cost nothing, as on the real engine), and writes logits
that make one token of a fixed, self-describing text certain at each position. The answers are
therefore not a model's, and the server says so: ``/readyz`` and ``/v1/models`` report the backend,
and versions carry a ``sim-`` prefix, so that usage records never pass for the real model's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gevent import monkey

from llmserve.engine.backend import ContextSpec, DecodeContext, LoadedModel
from llmserve.engine.config import StepTimes
from llmserve.engine.llama_model import DecodeGate, LlamaError, LlamaModel

_native_sleep = monkey.get_original("time", "sleep")  # the engine thread is a native thread

TEXT = (
    " This answer comes from llmserve's simulated backend, which takes as long as the model would for each"
    " step and writes this text instead of the model's."
)
CERTAIN = 30.0  # the logit of the one token a row makes certain; every other logit is 0


class SimulatedBackend:
    name = "simulated"

    def __init__(self, times: StepTimes) -> None:
        self.times = times

    def load(self, path: Path, *, gpu_layers: int) -> LoadedModel:
        return LlamaModel(path, gpu_layers=0, vocab_only=True)

    def context(self, model: LoadedModel, spec: ContextSpec, decode_gate: DecodeGate | None = None) -> DecodeContext:
        return SimulatedContext(model, self.times, n_batch=spec.n_batch, n_seq_max=spec.n_seq_max)


class SimulatedContext:
    """A decode context whose steps take the modelled time and whose logits spell ``TEXT``."""

    def __init__(self, model: LoadedModel, times: StepTimes, *, n_batch: int, n_seq_max: int) -> None:
        vocab = model.vocab
        self._text = np.array(
            [t for t in vocab.tokenize(TEXT, add_special=False) if not vocab.is_end_of_generation(t)],
            dtype=np.int64,
        )
        self._times = times
        self._n_seq_max = n_seq_max
        self._n_vocab = vocab.size
        self._n_embd = model.embedding_size
        self.capacity = n_batch
        self.outputs = 0
        self._tokens: list[int] = []
        self._positions: list[int] = []
        self._sequences: list[int] = []
        self._wants: list[bool] = []
        self._logits = np.zeros((0, self._n_vocab), dtype=np.float32)
        self._certain: list[int] = []  # the token made certain in each row of ``_logits`` (reset next time)
        self._output_tokens: list[int] = []
        self._output_positions: list[int] = []

    @property
    def batch_size(self) -> int:
        return len(self._tokens)

    def clear_batch(self) -> None:
        self._tokens.clear()
        self._positions.clear()
        self._sequences.clear()
        self._wants.clear()
        self.outputs = 0

    def add(self, token: int, position: int, sequence: int, wants_output: bool) -> None:
        if len(self._tokens) >= self.capacity:
            raise IndexError("the batch is full")
        self._tokens.append(token)
        self._positions.append(position)
        self._sequences.append(sequence)
        self._wants.append(wants_output)
        self.outputs += wants_output

    def decode(self) -> None:
        """Sleep for the step's modelled time; refuse what llama.cpp refuses (a token outside the
        vocabulary, a sequence id outside the context)."""
        if not self._tokens:
            raise LlamaError("llama_decode failed with status -1 for 0 tokens")
        if any(not 0 <= t < self._n_vocab for t in self._tokens) or any(
            not 0 <= s < self._n_seq_max for s in self._sequences
        ):
            raise LlamaError(f"llama_decode failed with status -1 for {len(self._tokens)} tokens")
        per_sequence: dict[int, int] = {}
        for sequence in self._sequences:
            per_sequence[sequence] = per_sequence.get(sequence, 0) + 1
        decoding = sum(1 for count in per_sequence.values() if count == 1)
        _native_sleep(self._times.seconds(decoding, len(self._tokens) - decoding))
        rows = [i for i, wants in enumerate(self._wants) if wants]
        self._output_tokens = [self._tokens[i] for i in rows]
        self._output_positions = [self._positions[i] for i in rows]

    def logits(self) -> np.ndarray:
        """One row per output: the token of ``TEXT`` for the next position is certain."""
        count = len(self._output_positions)
        if self._logits.shape[0] < count:
            self._logits = np.zeros((count, self._n_vocab), dtype=np.float32)
            self._certain = []
        for row, token in enumerate(self._certain):
            self._logits[row, token] = 0.0
        self._certain = [int(self._text[(position + 1) % len(self._text)]) for position in self._output_positions]
        for row, token in enumerate(self._certain):
            self._logits[row, token] = CERTAIN
        return self._logits[:count]

    def token_embeddings(self) -> np.ndarray:
        """A fixed vector per token id, so that equal texts embed equally and different ones differ."""
        tokens = np.array(self._output_tokens, dtype=np.float64)
        frequencies = np.arange(1, self._n_embd + 1, dtype=np.float64) / self._n_embd
        return np.sin(np.outer(tokens + 1.0, frequencies)).astype(np.float32)

    def forget(self, sequence: int, start: int = 0) -> int:
        return start

    def copy_sequence(self, source: int, target: int, length: int) -> None:
        """Nothing to copy: the simulated cache holds no cells."""

    def clear(self) -> None:
        """Nothing to clear: the simulated cache holds no cells."""

    def close(self) -> None:
        """Nothing to free."""
