"""The models loaded and unloaded at runtime: one shared file that every worker converges on.

The configuration file says which models a server starts with. ``llmserve models load|unload`` and the
admin API change the set without a restart by writing ``state_dir/models.json``: the models added
(with their settings) and the configured models taken away. Every worker polls the file and loads or
unloads until its set is the desired one, so several workers (and the CLI on the same host) agree
without a reload signal; the changes survive restarts until undone. Writers take an exclusive lock and
replace the file atomically, so readers never see half of it.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmserve.settings import AliasSettings, ModelSettings

STATE_FILE = "models.json"
STATUS_DIR = "models-status"  # one file per worker: what it serves now


class ModelStateError(Exception):
    """The state file cannot be read or written, or asks for something impossible."""


class ModelChanges(BaseModel):
    """What the runtime changed over the configured models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    added: dict[str, ModelSettings] = Field(default_factory=dict)
    removed: tuple[str, ...] = ()
    aliases: dict[str, AliasSettings] = Field(default_factory=dict)  # over the configured ones, by name

    def desired(self, configured: dict[str, ModelSettings]) -> dict[str, ModelSettings]:
        """The configured models without the removed ones, then the added ones, in that order."""
        kept = {name: model for name, model in configured.items() if name not in self.removed}
        return kept | dict(self.added)

    def desired_aliases(self, configured: dict[str, AliasSettings]) -> dict[str, AliasSettings]:
        return configured | dict(self.aliases)


Change = Callable[[ModelChanges], ModelChanges]


class ModelState:
    """The state file of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / STATE_FILE

    def stamp(self) -> tuple[int, int] | None:
        """Changes whenever the file is replaced: what a worker polls before reading it again."""
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        return status.st_mtime_ns, status.st_ino

    def read(self) -> ModelChanges:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return ModelChanges()
        except OSError as exc:
            raise ModelStateError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            return ModelChanges.model_validate_json(text)
        except ValidationError as exc:
            raise ModelStateError(f"{self.path} is not a valid model state file: {exc}") from None

    def update(self, change: Change) -> bool:
        """Apply ``change`` to the file's content under an exclusive lock and write the result; False when
        it changed nothing (another worker or command did it first)."""
        with self._locked():
            current = self.read()
            changed = change(current)
            if changed == current:
                return False
            partial = self.path.with_suffix(f".{os.getpid()}")
            partial.write_text(json.dumps(changed.model_dump(mode="json"), indent=2) + "\n")
            partial.replace(self.path)
        return True

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield
        except OSError as exc:
            raise ModelStateError(f"cannot write {self.path}: {exc.strerror}") from exc


def _host() -> str:
    return socket.gethostname()


class WorkerStatus:
    """What one worker serves now, as it reports it beside the state file. The file is named by host and
    pid: replicas that share one state directory (a Kubernetes volume) each read only their own host's."""

    def __init__(self, state_dir: Path, pid: int) -> None:
        self.path = state_dir / STATUS_DIR / f"{_host()}-{pid}.json"

    def write(self, status: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(status))
        partial.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def worker_statuses(state_dir: Path) -> list[dict[str, Any]]:
    """The status of every live worker on this host (files of workers that died unannounced are skipped)."""
    statuses = []
    for path in sorted((state_dir / STATUS_DIR).glob(f"{glob.escape(_host())}-*.json")):
        try:
            os.kill(int(path.stem.rpartition("-")[2]), 0)
            statuses.append(json.loads(path.read_text()))
        except (ValueError, OSError):  # not a pid, no such process, or gone while being read
            continue
    return statuses


def tenant_loads(statuses: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Each tenant's running and queued requests, summed over the workers' models (tenants with none left out)."""
    loads: dict[str, tuple[int, int]] = {}
    for status in statuses:
        for report in status["models"].values():
            for tenant, (running, queued) in report.get("tenants", {}).items():
                total = loads.get(tenant, (0, 0))
                loads[tenant] = (total[0] + running, total[1] + queued)
    return loads


def load(configured: dict[str, ModelSettings], model: ModelSettings) -> Change:
    """The change that adds ``model``; a model of that name that is served already is refused."""

    def change(current: ModelChanges) -> ModelChanges:
        if model.id in current.desired(configured):
            raise ModelStateError(f"a model named {model.id!r} is served already; unload it first")
        return current.model_copy(
            update={
                "added": {**current.added, model.id: model},
                "removed": tuple(name for name in current.removed if name != model.id),
            }
        )

    return change


def unload(configured: dict[str, ModelSettings], name: str) -> Change:
    """The change that takes ``name`` away, wherever it came from."""

    def change(current: ModelChanges) -> ModelChanges:
        if name not in current.desired(configured):
            raise ModelStateError(f"no model named {name!r} is served")
        added = {key: value for key, value in current.added.items() if key != name}
        removed = current.removed + ((name,) if name in configured else ())
        return current.model_copy(update={"added": added, "removed": removed})

    return change


def set_alias(name: str, alias: AliasSettings) -> Change:
    """The change that makes ``name`` route as ``alias`` says."""

    def change(current: ModelChanges) -> ModelChanges:
        return current.model_copy(update={"aliases": {**current.aliases, name: alias}})

    return change


def canary_weight_zero(name: str, alias: AliasSettings) -> Change:
    """The change that sets the canary's weight to 0, if the alias still routes to that canary."""

    def change(current: ModelChanges) -> ModelChanges:
        now = current.desired_aliases({name: alias}).get(name)
        if now is None or now.canary != alias.canary or now.canary_weight == 0:
            return current
        return set_alias(name, now.model_copy(update={"canary_weight": 0.0}))(current)

    return change
