"""Model manifests: written from the served files, read into the models' expected hashes, and a file that
differs refused (tests/integration/test_models.py: the same on a real server)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmserve.cli import main
from llmserve.models.files import ModelFileError, locate
from llmserve.models.manifest import ManifestEntry, ManifestError, read_manifest, write_manifest
from llmserve.settings import ModelSettings, Settings

GOOD, OTHER = "a" * 64, "b" * 64


def test_a_manifest_reads_back_what_was_written(tmp_path: Path) -> None:
    entries = {"m": ManifestEntry("m.gguf", 12, GOOD)}
    path = tmp_path / "manifest.json"
    path.write_text(write_manifest(entries))
    assert read_manifest(path) == entries


@pytest.mark.parametrize(
    "text", ["not json", '{"models": []}', '{"models": {"m": {"file": "m.gguf", "bytes": 1, "sha256": "abc"}}}']
)
def test_a_broken_manifest_says_what_is_wrong(tmp_path: Path, text: str) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ManifestError, match=r"manifest|sha256"):
        read_manifest(path)


def test_the_manifest_gives_each_listed_model_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(write_manifest({"a": ManifestEntry("a.gguf", 1, GOOD)}))
    models = {"a": ModelSettings(path=tmp_path / "a.gguf"), "b": ModelSettings(path=tmp_path / "b.gguf")}
    settings = Settings(cache_dir=tmp_path / "cache", models=models, model_manifest=path)
    assert settings.models["a"].sha256 == GOOD and settings.models["b"].sha256 is None
    with pytest.raises(ValueError, match="differs from the model manifest"):
        Settings(cache_dir=tmp_path, models={"a": ModelSettings(path=tmp_path, sha256=OTHER)}, model_manifest=path)


def test_a_file_whose_hash_differs_is_refused_with_both_hashes(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    actual = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert locate(ModelSettings(path=gguf, sha256=actual), tmp_path / "cache").sha256 == actual
    with pytest.raises(ModelFileError) as refused:
        locate(ModelSettings(path=gguf, sha256=GOOD), tmp_path / "cache")
    assert actual in str(refused.value) and GOOD in str(refused.value) and "refusing" in str(refused.value)


def test_the_cli_writes_the_manifest_of_the_configured_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    config = tmp_path / "llmserve.toml"
    config.write_text(f'[models.mine]\npath = "{gguf}"\n')
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["models", "manifest", "--config", str(config)])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)["models"]["mine"]
    assert entry == {"file": "model.gguf", "bytes": 104, "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
