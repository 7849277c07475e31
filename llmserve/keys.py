"""API keys: created once, shown once, stored only as a hash.

A key reads ``sk-llmserve-<id>-<secret>``. The id finds the stored record without scanning; the whole
key's SHA-256 is then compared in constant time. The secret holds 256 random bits, so a fast hash is
enough: there is nothing to brute-force that a slow hash would protect.

Two stores keep the records. ``FileKeyStore``, the default, is one JSON file in the state directory,
written atomically under a file lock (the CLI and several workers may touch it at once); workers re-read
it when it changes, so a created or revoked key takes effect on the next request, in every worker,
without a reload. A fleet whose replicas share the ledger's database keeps them there instead
(``key_store = "ledger"``, ``llmserve.ledger.keys``), so that a key created or revoked on one host
holds on every host within ``key_refresh_interval`` seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

KEY_PREFIX = "sk-llmserve-"
KEYS_FILE = "keys.json"
_ID_BYTES = 6


@dataclass(frozen=True)
class ApiKey:
    """What is stored for one key: never the key itself."""

    id: str
    tenant: str | None  # None for an admin key
    digest: str
    created: str
    revoked: str | None = None
    admin: bool = False

    @property
    def active(self) -> bool:
        return self.revoked is None


class KeyStoreError(Exception):
    """The store cannot do what was asked; the message says why."""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_id(presented: str) -> str | None:
    if not presented.startswith(KEY_PREFIX):
        return None
    key_id, dash, secret = presented[len(KEY_PREFIX) :].partition("-")
    return key_id if dash and secret else None


# Compared against when no record matches, so a miss costs the same as a hit.
_NO_MATCH = _digest("no such key")


def new_key(tenant: str | None, *, admin: bool, taken: set[str]) -> tuple[ApiKey, str]:
    """A new key for ``tenant`` (or an admin key) whose id is not in ``taken``: its record and the key."""
    if (tenant is None) != admin:
        raise KeyStoreError("a key belongs either to a tenant or to the administrator")
    key_id = secrets.token_hex(_ID_BYTES)
    while key_id in taken:
        key_id = secrets.token_hex(_ID_BYTES)
    presented = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
    record = ApiKey(id=key_id, tenant=tenant, digest=_digest(presented), created=_now(), admin=admin)
    return record, presented


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def revoked(record: ApiKey) -> ApiKey:
    """``record`` revoked now, or as it is if it was revoked already."""
    return replace(record, revoked=_now()) if record.active else record


class KeyStore(ABC):
    """Where the key records live; workers authenticate against it, the CLI changes it."""

    @abstractmethod
    def records(self) -> dict[str, ApiKey]:
        """The records as this process knows them now, by id."""

    @abstractmethod
    def create(self, tenant: str | None, *, admin: bool = False) -> tuple[ApiKey, str]:
        """A new key for ``tenant`` (or an admin key); returns the record and the key, shown only now."""

    @abstractmethod
    def revoke(self, key_id: str) -> ApiKey: ...

    def authenticate(self, presented: str) -> ApiKey | None:
        """The active key record for ``presented``, or None."""
        key_id = _key_id(presented)
        record = (self.records().get(key_id) or self.look_up_new(key_id)) if key_id else None
        matches = hmac.compare_digest(_digest(presented), record.digest if record else _NO_MATCH)
        return record if record is not None and matches and record.active else None

    def look_up_new(self, key_id: str) -> ApiKey | None:
        """A record that ``records`` did not hold: a store that keeps a snapshot may look again."""
        return None

    def list(self) -> list[ApiKey]:
        return sorted(self.records().values(), key=lambda key: key.created)


class FileKeyStore(KeyStore):
    """The records in ``state_dir/keys.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / KEYS_FILE
        self._keys: dict[str, ApiKey] = {}
        self._loaded_stamp: tuple[int, ...] | None = None

    # -- reading (workers) -------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, ...] | None:
        """Changes with every write: each one replaces the file, so the inode changes even within one
        tick of the file system's clock."""
        try:
            status = self.path.stat()
        except FileNotFoundError:
            return None
        return status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size

    def records(self) -> dict[str, ApiKey]:
        stamp = self._stamp()
        if stamp != self._loaded_stamp:
            self._keys = self._read()
            self._loaded_stamp = stamp
        return self._keys

    def _read(self) -> dict[str, ApiKey]:
        try:
            records = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"cannot read the key store {self.path}: {exc}") from exc
        return {record["id"]: ApiKey(**record) for record in records}

    # -- writing (the CLI) -------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[dict[str, ApiKey]]:
        """Read, let the caller change, and write back atomically, holding the store's lock throughout."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            keys = self._read()
            yield keys
            temporary = self.path.with_suffix(".tmp")
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as out:
                json.dump([asdict(key) for key in keys.values()], out, indent=2)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)

    def create(self, tenant: str | None, *, admin: bool = False) -> tuple[ApiKey, str]:
        with self._locked() as keys:
            record, presented = new_key(tenant, admin=admin, taken=set(keys))
            keys[record.id] = record
        return record, presented

    def revoke(self, key_id: str) -> ApiKey:
        with self._locked() as keys:
            record = keys.get(key_id)
            if record is None:
                raise KeyStoreError(f"no key with id {key_id!r}")
            keys[key_id] = record = revoked(record)
        return record
