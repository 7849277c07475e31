"""The simulated backend: the real vocabulary, a modelled step time, and logits that spell its text."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmserve.engine.backend import ContextSpec, DecodeContext, LoadedModel
from llmserve.engine.config import StepTimes
from llmserve.engine.llama_model import LlamaError
from llmserve.engine.simulated import TEXT, SimulatedBackend
from llmserve.models.files import locate
from llmserve.settings import ModelSettings

TIMES = StepTimes(step_seconds=0.01, sequence_seconds=0.005, prompt_token_seconds=0.001)


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    path = locate(ModelSettings(), Path.home() / ".cache" / "llmserve").path
    loaded = SimulatedBackend(TIMES).load(path, gpu_layers=0)
    yield loaded
    loaded.close()


def context(model: LoadedModel, sequences: int = 4) -> DecodeContext:
    return SimulatedBackend(TIMES).context(model, ContextSpec(n_ctx=4096, n_batch=64, n_seq_max=sequences, threads=1))


def test_the_model_is_opened_for_its_vocabulary_and_metadata_only(model: LoadedModel) -> None:
    assert model.vocab.size == 262_144
    assert model.embedding_size == 640
    assert model.metadata("general.architecture") == "gemma3"
    assert model.metadata("general.name") == "Gemma 3 270m"


def test_greedy_decoding_writes_the_simulated_text(model: LoadedModel) -> None:
    simulated = context(model)
    prompt = model.vocab.tokenize("Hello", add_special=True)
    generated: list[int] = []
    position = 0
    batch = prompt
    while len(generated) < 12:
        simulated.clear_batch()
        for offset, token in enumerate(batch):
            simulated.add(token, position + offset, 0, offset == len(batch) - 1)
        simulated.decode()
        position += len(batch)
        token = int(np.argmax(simulated.logits()[0]))
        generated.append(token)
        batch = [token]
    text = model.vocab.detokenize(generated)
    assert text and text in TEXT + TEXT, text
    assert not any(model.vocab.is_end_of_generation(token) for token in generated)


def test_every_output_row_has_one_certain_token(model: LoadedModel) -> None:
    simulated = context(model)
    simulated.clear_batch()
    for sequence in range(3):
        simulated.add(2, 5 + sequence, sequence, True)
    simulated.decode()
    rows = simulated.logits()
    assert rows.shape == (3, model.vocab.size)
    assert [int((row > 0).sum()) for row in rows] == [1, 1, 1]
    simulated.clear_batch()
    simulated.add(2, 9, 0, True)
    simulated.decode()
    assert int((simulated.logits() > 0).sum()) == 1  # the last step's rows were reset


def test_a_step_takes_at_least_its_modelled_time(model: LoadedModel) -> None:
    simulated = context(model)
    simulated.clear_batch()
    for position in range(20):  # a 20-token prompt chunk of sequence 0
        simulated.add(2, position, 0, position == 19)
    for sequence in (1, 2):  # and two sequences decoding one token each
        simulated.add(2, 30, sequence, True)
    started = time.perf_counter()
    simulated.decode()
    assert time.perf_counter() - started >= TIMES.seconds(sequences=2, prompt_tokens=20)


def test_it_refuses_what_llama_cpp_refuses(model: LoadedModel) -> None:
    simulated = context(model, sequences=2)
    simulated.clear_batch()
    simulated.add(model.vocab.size, 0, 0, True)  # outside the vocabulary: the fault drill's token
    with pytest.raises(LlamaError):
        simulated.decode()
    simulated.clear_batch()
    simulated.add(2, 0, 2, True)  # a sequence the context does not have
    with pytest.raises(LlamaError):
        simulated.decode()


def test_embeddings_are_a_fixed_vector_per_token(model: LoadedModel) -> None:
    simulated = context(model)
    simulated.clear_batch()
    for position, token in enumerate((5, 6, 5)):
        simulated.add(token, position, 0, True)
    simulated.decode()
    rows = simulated.token_embeddings()
    assert rows.shape == (3, model.embedding_size)
    np.testing.assert_array_equal(rows[0], rows[2])
    assert not np.allclose(rows[0], rows[1])
