"""API keys in the ledger's database: what one replica (or the CLI) creates or revokes holds for every
other replica's snapshot within the refresh interval, on SQLite and a real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmserve.keys import KeyStoreError
from llmserve.ledger.keys import LedgerKeyStore
from llmserve.ledger.native import wait_until
from llmserve.settings import Settings
from llmserve.tenancy import open_key_store
from tests.ledger_support import ledger_url

REFRESH = 0.1


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_url(request.param, tmp_path) as address:
        yield address


def test_a_key_made_by_the_cli_works_at_once_and_its_revocation_holds_within_the_refresh(url: str) -> None:
    cli = LedgerKeyStore(url, REFRESH)
    slow = LedgerKeyStore(url, refresh_interval=3600)  # only a miss makes it read the table again
    worker = LedgerKeyStore(url, REFRESH)
    for follower in (slow, worker):
        follower.follow()
    record, key = cli.create("alpha")
    assert cli.authenticate(key) == record  # the CLI reads the table itself
    assert slow.authenticate(key) == record  # not in its snapshot: it read the table at once
    assert cli.revoke(record.id).revoked is not None
    assert wait_until(lambda: worker.authenticate(key) is None, 5)
    assert [(k.id, k.active) for k in worker.list()] == [(record.id, False)]


def test_made_up_keys_make_at_most_one_read_per_interval(url: str) -> None:
    worker = LedgerKeyStore(url, refresh_interval=3600)
    worker.follow()
    before = worker.reads
    for number in range(20):
        assert worker.authenticate(f"sk-llmserve-{number:012x}-madeup") is None
    assert worker.reads - before == 1


def test_the_database_holds_only_digests_and_an_unknown_id_is_refused(url: str) -> None:
    store = LedgerKeyStore(url, REFRESH)
    record, key = store.create(None, admin=True)
    assert record.admin and record.tenant is None
    assert key not in record.digest
    with pytest.raises(KeyStoreError, match="no key with id 'nothing'"):
        store.revoke("nothing")
    with pytest.raises(KeyStoreError, match="either to a tenant or to the administrator"):
        store.create("alpha", admin=True)


def test_revoking_twice_keeps_the_first_revocation(url: str) -> None:
    store = LedgerKeyStore(url, REFRESH)
    record, _ = store.create("alpha")
    first = store.revoke(record.id)
    assert store.revoke(record.id).revoked == first.revoked


def test_an_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(KeyStoreError, match="cannot open the usage ledger at postgresql"):
        LedgerKeyStore("postgresql+psycopg://postgres:secret@127.0.0.1:1/nothing", REFRESH)


def test_the_settings_choose_the_store(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, key_store="ledger")
    assert isinstance(open_key_store(settings), LedgerKeyStore)
    with pytest.raises(ValueError, match="enable \\[ledger\\]"):
        Settings(state_dir=tmp_path, key_store="ledger", ledger={"enabled": False})
