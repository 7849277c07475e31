"""API keys: created once, shown once, stored only as a hash.

A key reads ``sk-llmserve-<id>-<secret>``. The id finds the stored record without scanning; the whole
key's SHA-256 is then compared in constant time. The secret holds 256 random bits, so a fast hash is
enough: there is nothing to brute-force that a slow hash would protect.

The store is one JSON file in the state directory, written atomically under a file lock (the CLI and
several workers may touch it at once). Workers re-read it when its modification time changes, so a
created or revoked key takes effect on the next request, in every worker, without a reload.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
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


class KeyStore:
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

    def _refresh(self) -> None:
        stamp = self._stamp()
        if stamp != self._loaded_stamp:
            self._keys = self._read()
            self._loaded_stamp = stamp

    def _read(self) -> dict[str, ApiKey]:
        try:
            records = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"cannot read the key store {self.path}: {exc}") from exc
        return {record["id"]: ApiKey(**record) for record in records}

    def authenticate(self, presented: str) -> ApiKey | None:
        """The active key record for ``presented``, or None."""
        self._refresh()
        key_id = _key_id(presented)
        record = self._keys.get(key_id) if key_id else None
        matches = hmac.compare_digest(_digest(presented), record.digest if record else _NO_MATCH)
        return record if record is not None and matches and record.active else None

    def list(self) -> list[ApiKey]:
        self._refresh()
        return sorted(self._keys.values(), key=lambda key: key.created)

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
        """A new key for ``tenant`` (or an admin key); returns the record and the key, shown only now."""
        if (tenant is None) != admin:
            raise KeyStoreError("a key belongs either to a tenant or to the administrator")
        with self._locked() as keys:
            key_id = secrets.token_hex(_ID_BYTES)
            while key_id in keys:
                key_id = secrets.token_hex(_ID_BYTES)
            presented = f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
            record = ApiKey(
                id=key_id,
                tenant=tenant,
                digest=_digest(presented),
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                admin=admin,
            )
            keys[key_id] = record
        return record, presented

    def revoke(self, key_id: str) -> ApiKey:
        with self._locked() as keys:
            record = keys.get(key_id)
            if record is None:
                raise KeyStoreError(f"no key with id {key_id!r}")
            if record.active:
                record = replace(record, revoked=datetime.now(UTC).isoformat(timespec="seconds"))
                keys[key_id] = record
        return record
