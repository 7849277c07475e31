"""Settings: sources, precedence, and messages that name the bad value and where it came from."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmserve.cli import main
from llmserve.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment() -> Iterator[None]:
    """No LLMSERVE_* variables in, and none left behind (the CLI exports its options)."""
    saved = dict(os.environ)
    for name in [name for name in os.environ if name.startswith("LLMSERVE_")]:
        del os.environ[name]
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_defaults_serve_every_embedded_model_on_loopback() -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert {name: (model.id, model.embedded, model.path) for name, model in settings.models.items()} == {
        "gemma-3-270m": ("gemma-3-270m", "gemma-3-270m", None),
        "smollm2-135m-instruct": ("smollm2-135m-instruct", "smollm2-135m-instruct", None),
    }


def test_a_model_table_that_names_a_model_serves_only_it(tmp_path: Path) -> None:
    config = tmp_path / "llmserve.toml"
    config.write_text('[model]\nid = "mine"\npath = "/models/mine.gguf"\nparallel = 4\n')
    [(name, model)] = load_settings(config).models.items()
    assert (name, model.path, model.parallel) == ("mine", Path("/models/mine.gguf"), 4)


def test_a_model_table_that_names_no_model_sets_defaults_for_every_model(tmp_path: Path) -> None:
    config = tmp_path / "llmserve.toml"
    config.write_text(
        "[model]\ncontext_length = 1024\nparallel = 4\n"
        '[models.chat]\nembedded = "smollm2-135m-instruct"\nparallel = 2\n'
        '[models."base-v2"]\npath = "/models/base.gguf"\n'
    )
    models = load_settings(config).models
    assert {name: (m.id, m.context_length, m.parallel) for name, m in models.items()} == {
        "chat": ("chat", 1024, 2),  # its own table wins over the defaults
        "base-v2": ("base-v2", 1024, 4),
    }
    config.write_text("[model]\nparallel = 3\n")
    assert {model.parallel for model in load_settings(config).models.values()} == {3}  # both embedded models


def test_models_tables_refuse_a_model_table_that_names_a_model(tmp_path: Path) -> None:
    config = tmp_path / "llmserve.toml"
    config.write_text('[model]\npath = "/models/a.gguf"\n[models.b]\npath = "/models/b.gguf"\n')
    with pytest.raises(SettingsError, match=r"with \[models.NAME\] tables set them in those tables"):
        load_settings(config)
    config.write_text('[models.b]\nid = "c"\n')
    with pytest.raises(SettingsError, match="a model's id is its table's name"):
        load_settings(config)
    config.write_text('[models.b]\npath = "/models/b.gguf"\nembedded = "gemma-3-270m"\n')
    with pytest.raises(SettingsError, match="set path or embedded, not both"):
        load_settings(config)
    config.write_text("[model]\nparallel = 64\n[models.b]\nbatch_tokens = 32\n")
    with pytest.raises(SettingsError, match=r"models.b with the \[model\] defaults: .*batch_tokens"):
        load_settings(config)


def test_environment_beats_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "llmserve.toml"
    config.write_text('port = 9000\nworkers = 3\n[model]\nid = "from-file"\ncontext_length = 2048\n')
    monkeypatch.setenv("LLMSERVE_CONFIG", str(config))
    monkeypatch.setenv("LLMSERVE_PORT", "9100")
    monkeypatch.setenv("LLMSERVE_MODEL__CONTEXT_LENGTH", "1024")
    settings = load_settings()
    assert settings.port == 9100
    assert settings.workers == 3
    assert settings.model.id == "from-file"
    assert settings.model.context_length == 1024


def test_each_bad_value_is_named_with_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "llmserve.toml"
    config.write_text("[model]\nparallel = 0\n")
    monkeypatch.setenv("LLMSERVE_PORT", "http")
    with pytest.raises(SettingsError) as raised:
        load_settings(config)
    message = str(raised.value)
    assert "LLMSERVE_PORT" in message and "'http'" in message
    assert f"model.parallel in {config}" in message


def test_the_cpus_are_divided_among_the_workers_unless_threads_are_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    config = tmp_path / "llmserve.toml"
    config.write_text("workers = 3\n[model]\nparallel = 4\n")
    settings = load_settings(config)
    assert {model.threads for model in settings.models.values()} == {2} and not settings.oversubscribed
    assert {model.threads for model in load_settings().models.values()} == {8}  # one worker: every CPU
    monkeypatch.setenv("LLMSERVE_MODEL__THREADS", "4")
    settings = load_settings(config)
    # Said so: kept, and warned about at start.
    assert {model.threads for model in settings.models.values()} == {4} and settings.oversubscribed


def test_a_step_must_fit_one_token_of_every_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVE_MODEL__PARALLEL", "64")
    monkeypatch.setenv("LLMSERVE_MODEL__BATCH_TOKENS", "32")
    with pytest.raises(SettingsError, match="batch_tokens"):
        load_settings()


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "llmserve.toml"
    config.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="prot"):
        load_settings(config)


def test_a_broken_file_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "llmserve.toml"
    config.write_text("port = \n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(config)


def test_cli_options_are_generated_from_the_settings() -> None:
    result = CliRunner().invoke(main, ["config", "--port", "9200", "--model-parallel", "4"])
    assert result.exit_code == 0, result.output
    assert '"port": 9200' in result.output
    assert '"parallel": 4' in result.output


def test_cli_rejects_bad_values_before_starting_anything() -> None:
    result = CliRunner().invoke(main, ["serve", "--model-context-length", "7"])
    assert result.exit_code != 0
    assert "LLMSERVE_MODEL__CONTEXT_LENGTH" in result.output
