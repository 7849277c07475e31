"""Model manifests: the served models' files with their SHA-256, for replicating them to other hosts.

``llmserve models manifest`` writes one on a host whose files are known good; copied beside the model
files to a replica (or a rebuilt host) and named by ``model_manifest``, it gives each model it lists an
expected hash (``ModelSettings.sha256``), and a file whose hash differs is refused when the model is
loaded (``files.locate``), with both hashes in the error: a truncated copy or another file under the
same name never serves. The JSON format::

    {"models": {"gemma-3-270m": {"file": "gemma-3-270m-q4_k_m.gguf", "bytes": 253114112, "sha256": "..."}}}

This module only reads and writes that format; it knows nothing of settings.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SHA256 = r"^[0-9a-f]{64}$"


class ManifestError(ValueError):
    """The manifest cannot be read or is not one."""


@dataclass(frozen=True)
class ManifestEntry:
    file: str  # the file's name, where the model was found on the host that wrote the manifest
    bytes: int
    sha256: str


def write_manifest(entries: dict[str, ManifestEntry]) -> str:
    return json.dumps({"models": {name: asdict(entry) for name, entry in entries.items()}}, indent=2) + "\n"


def read_manifest(path: Path) -> dict[str, ManifestEntry]:
    try:
        document = json.loads(path.read_text())
        entries = {name: ManifestEntry(**entry) for name, entry in document["models"].items()}
    except OSError as exc:
        raise ManifestError(f"cannot read the model manifest {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"{path} is not a model manifest ({exc})") from None
    for name, entry in entries.items():
        if not re.match(SHA256, str(entry.sha256)):
            raise ManifestError(f"{path}: model {name!r} has no valid sha256 ({entry.sha256!r})")
    return entries
