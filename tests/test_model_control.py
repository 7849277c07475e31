"""Runtime model changes without a server: the state file's overlay on the configured models, the
refusals of a load or unload, and the memory estimate against a budget."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmserve.engine.llama_model import ModelShape
from llmserve.models.control import ModelControl, ModelControlError, Refusal
from llmserve.models.files import file_sha256
from llmserve.models.memory import MIB, estimate, over_budget
from llmserve.models.state import ModelChanges, ModelState, WorkerStatus, worker_statuses
from llmserve.settings import ModelSettings, Settings

GEMMA = "gemma-3-270m"
SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=Path.home() / ".cache" / "llmserve", state_dir=tmp_path / "state")


def test_the_state_file_adds_and_removes_over_the_configuration(settings: Settings) -> None:
    control = ModelControl(settings)
    assert {name: entry.source for name, entry in control.desired().items()} == {
        GEMMA: "configured",
        SMOLLM2: "configured",
    }
    control.unload(GEMMA)
    control.load("chat", {"embedded": SMOLLM2, "parallel": 2})
    desired = control.desired()
    assert list(desired) == [SMOLLM2, "chat"]
    assert desired["chat"].source == "loaded"
    assert desired["chat"].settings.parallel == 2
    assert desired["chat"].settings.threads == settings.model.threads  # the [model] defaults apply
    # What a restarted worker reads: the same set.
    assert list(ModelState(settings.state_dir).read().desired(settings.models)) == [SMOLLM2, "chat"]
    control.load(GEMMA, {"embedded": GEMMA})  # a configured model taken away comes back
    control.unload("chat")  # a loaded one leaves no trace
    assert ModelState(settings.state_dir).read() == ModelChanges(added={GEMMA: settings.models[GEMMA]}, removed=())


def test_refusals_say_why_and_change_nothing(settings: Settings, tmp_path: Path) -> None:
    control = ModelControl(settings)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(64))
    cases = [
        (lambda: control.load(GEMMA, {"embedded": GEMMA}), Refusal.EXISTS, "served already"),
        (lambda: control.load("x", {"path": str(tmp_path / "no.gguf")}), Refusal.INVALID, "does not exist"),
        (lambda: control.load("x", {"path": str(corrupt)}), Refusal.INVALID, "could not read"),
        (lambda: control.load("x", {"parallel": 0}), Refusal.INVALID, "parallel"),
        (lambda: control.load("not a name", {}), Refusal.INVALID, "id"),
        (lambda: control.unload("nothing"), Refusal.NOT_FOUND, "no model named"),
    ]
    for attempt, refusal, reason in cases:
        with pytest.raises(ModelControlError, match=reason) as raised:
            attempt()
        assert raised.value.refusal is refusal
    assert not ModelState(settings.state_dir).path.exists()


def test_a_damaged_state_file_is_reported_not_guessed(settings: Settings) -> None:
    state = ModelState(settings.state_dir)
    state.path.parent.mkdir(parents=True)
    state.path.write_text('{"added": 3}')
    with pytest.raises(ModelControlError, match="not a valid model state file"):
        ModelControl(settings).desired()


def test_the_estimate_counts_weights_once_and_caches_per_worker() -> None:
    shape = ModelShape(file_bytes=100 * MIB, layers=10, kv_heads=2, key_length=64, value_length=64, vocab_size=1000)
    model = ModelSettings(parallel=4, context_length=1024, batch_tokens=256, embeddings=False)
    cell = 10 * 2 * 128 * 2  # layers x KV heads x (key + value) x f16
    value = estimate(shape, model)
    assert value.weights == 100 * MIB
    assert value.per_worker == 4 * 1024 * cell + (4 + 256) * 1000 * 4  # KV cells, then output and batch logits
    assert value.total(3) == 100 * MIB + 3 * value.per_worker
    assert over_budget({"m": value}, workers=3, budget_mib=None) is None
    assert over_budget({"m": value}, workers=1, budget_mib=200) is None
    refusal = over_budget({"m": value}, workers=3, budget_mib=100)
    assert refusal is not None and "over the memory budget of 100 MiB" in refusal and "3 worker(s)" in refusal


def test_the_budget_refuses_a_load_that_would_not_fit(tmp_path: Path) -> None:
    settings = Settings(cache_dir=Path.home() / ".cache" / "llmserve", state_dir=tmp_path, memory_budget_mib=1700)
    control = ModelControl(settings)
    control.unload(SMOLLM2)
    with pytest.raises(ModelControlError, match="over the memory budget") as raised:
        control.load(SMOLLM2, {"embedded": SMOLLM2})
    assert raised.value.refusal is Refusal.OVER_BUDGET
    # About 1503 MiB for Gemma (8 slots), 982 more for SmolLM2 alike, 111 for a small SmolLM2.
    small = {"embedded": SMOLLM2, "parallel": 1, "context_length": 512, "batch_tokens": 32, "embeddings": False}
    control.load(SMOLLM2, small)


def test_worker_statuses_skip_workers_that_are_gone(tmp_path: Path) -> None:
    WorkerStatus(tmp_path, os.getpid()).write({"pid": os.getpid(), "models": {}})
    WorkerStatus(tmp_path, 2**22 + 1).write({"pid": 2**22 + 1, "models": {}})  # above the kernel's pid limit
    assert [status["pid"] for status in worker_statuses(tmp_path)] == [os.getpid()]


def test_a_files_hash_is_remembered_until_the_file_changes(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"one")
    first = file_sha256(model, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 1
    assert file_sha256(model, tmp_path / "cache") == first
    model.write_bytes(b"two!")
    assert file_sha256(model, tmp_path / "cache") != first
