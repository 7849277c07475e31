"""The engine-time budget of a grammar's whole-vocabulary scans, on the embedded model's vocabulary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmserve.engine.grammar import BLOCK, Grammar, GrammarBudgetExhausted
from llmserve.engine.llama_model import LlamaModel, Vocabulary
from llmserve.models.files import locate
from llmserve.settings import ModelSettings

GRAMMAR = 'root ::= "zebra"'


@pytest.fixture(scope="module")
def vocab() -> Iterator[Vocabulary]:
    model = LlamaModel(locate(ModelSettings(), Path.home() / ".cache" / "llmserve").path, gpu_layers=0, vocab_only=True)
    yield model.vocab
    model.close()


def likely_but_rejected(vocab: Vocabulary) -> np.ndarray:
    """Logits whose ``BLOCK`` likeliest tokens all start with a space, which the grammar never allows."""
    spaced = [token for token in range(vocab.size) if vocab.piece(token).startswith(b" ")][:BLOCK]
    assert len(spaced) == BLOCK
    logits = np.zeros(vocab.size, dtype=np.float32)
    logits[spaced] = 10.0
    return logits


def test_a_block_that_holds_an_allowed_token_needs_no_scan(vocab: Vocabulary) -> None:
    grammar = Grammar(vocab, GRAMMAR, scan_budget=1e-9)
    logits = np.zeros(vocab.size, dtype=np.float32)
    logits[vocab.tokenize("zebra", add_special=False)[0]] = 10.0
    for _ in range(3):
        assert np.isfinite(grammar.restrict(logits)).any()
    assert grammar.scans == 0
    grammar.close()


def test_scans_run_until_their_time_passes_the_budget(vocab: Vocabulary) -> None:
    logits = likely_but_rejected(vocab)
    unbounded = Grammar(vocab, GRAMMAR)
    for _ in range(3):
        allowed = unbounded.restrict(logits)
        assert np.isfinite(allowed).any() and not np.isfinite(allowed[logits > 0]).any()
    assert unbounded.scans == 3 and unbounded.scan_seconds > 0
    unbounded.close()

    bounded = Grammar(vocab, GRAMMAR, scan_budget=1e-9)
    bounded.restrict(logits)  # the first scan starts within the budget
    with pytest.raises(GrammarBudgetExhausted, match="grammar_scan_budget of 1e-09 s"):
        bounded.restrict(logits)
    assert bounded.scans == 1
    bounded.close()
