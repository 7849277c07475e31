"""The embedder pools inputs of any length through bounded decodes, as llama.cpp's own mean pooling would.

Against the real embedded model: llama.cpp's MEAN pooling of a whole input in one decode is the
reference (llama-cpp-python's high-level ``Llama.embed``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from llmserve.engine.backend import LlamaBackend
from llmserve.engine.embedder import BATCH_TOKENS, Embedder
from llmserve.engine.llama_model import LlamaModel
from llmserve.models.files import locate
from llmserve.settings import ModelSettings

LONG = "The quick brown fox jumps over the lazy dog, and the dog does not mind at all. " * 10
TEXTS = ["a red apple", LONG, "x"]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return locate(ModelSettings(), Path.home() / ".cache" / "llmserve").path


@pytest.fixture(scope="module")
def embedder(model_path: Path) -> Iterator[tuple[Embedder, LlamaModel]]:
    model = LlamaModel(str(model_path), gpu_layers=0)
    embedder = Embedder(LlamaBackend(), model, ModelSettings(threads=2).engine_config())
    yield embedder, model
    embedder.close()


def tokens(model: LlamaModel, text: str) -> tuple[int, ...]:
    return tuple(model.vocab.tokenize(text, add_special=True))


def test_vectors_match_llama_cpp_mean_pooling_of_the_whole_input(
    embedder: tuple[Embedder, LlamaModel], model_path: Path
) -> None:
    ours, model = embedder
    inputs = tuple(tokens(model, text) for text in TEXTS)
    assert len(inputs[1]) > 2 * BATCH_TOKENS  # the long one spans at least three decodes
    vectors = ours.embed(inputs)
    reference = llama_cpp.Llama(
        str(model_path),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=1024,
        n_batch=1024,
        n_ubatch=1024,
        verbose=False,
    )
    for text, vector in zip(TEXTS, vectors, strict=True):
        expected = np.array(reference.embed(text, normalize=True))
        assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
        # Not bit-identical: llama.cpp's CPU kernels round differently for different batch shapes.
        assert float(np.dot(expected, vector)) > 0.998, text[:20]


def test_a_long_input_takes_one_bounded_decode_per_turn(embedder: tuple[Embedder, LlamaModel]) -> None:
    ours, model = embedder
    long = tokens(model, LONG)
    turns = 1
    while (vectors := ours.step(1, (long,))) is None:
        turns += 1
    assert turns == -(-len(long) // BATCH_TOKENS)
    alone = vectors[0]
    # The same input beside others, split at other places, gives the same vector.
    together = ours.embed((tokens(model, "a red apple"), long, tokens(model, "x")))
    assert float(np.dot(alone, together[1])) > 0.9999


def test_a_new_job_starts_afresh_when_the_last_one_was_left_half_done(embedder: tuple[Embedder, LlamaModel]) -> None:
    ours, model = embedder
    long, short = tokens(model, LONG), tokens(model, "a red apple")
    assert ours.step(2, (long,)) is None  # job 2 is cancelled here, half-done
    [fresh] = ours.embed((short,))
    [again] = ours.embed((short,))
    assert float(np.dot(fresh, again)) > 0.99999
