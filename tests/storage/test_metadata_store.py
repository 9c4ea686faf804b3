"""The metadata store on both backends (SQLite files, PostgreSQL): tenants, API keys,
quarantine paging, concurrent writers; SQLite durability."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from services.storage.metadata_store import (
    MAX_PAGE_SIZE,
    AlreadyExistsError,
    ApiKeyRecord,
    InvalidPageTokenError,
    MetadataStore,
    QuarantineEntry,
    SQLiteMetadataStore,
    Tenant,
)
from tests.storage.metadata_backends import MetadataBackend, metadata_backend

__all__ = ["metadata_backend"]  # the fixture, imported for pytest

pytestmark = pytest.mark.integration

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PEPPER = b"server-side pepper"


def secret_hash(secret: str) -> str:
    return hmac.new(PEPPER, secret.encode(), hashlib.sha256).hexdigest()


def entry(n: int, tenant_id: str = "acme", *, at: datetime | None = None) -> QuarantineEntry:
    return QuarantineEntry(
        quarantined_event_id=f"q{n:05d}",
        tenant_id=tenant_id,
        # Many entries share a timestamp: the page order must break ties by id.
        received_at=at or T0 + timedelta(seconds=n // 3),
        reason="SCHEMA_VIOLATION",
        field_path=f"events[{n}].properties.seat",
        message="seat must be a string",
        event_json=f'{{"event_id": "e{n}"}}',
    )


@pytest.fixture
def store(metadata_backend: MetadataBackend) -> Iterator[MetadataStore]:
    s = metadata_backend.open()
    try:
        s.create_tenant(Tenant("acme", "ACME Concerts", T0))
        s.create_tenant(Tenant("globex", "Globex Live", T0))
        yield s
    finally:
        s.close()


def test_tenants(store: MetadataStore) -> None:
    assert store.get_tenant("acme") == Tenant("acme", "ACME Concerts", T0)
    assert store.get_tenant("nope") is None
    assert [t.tenant_id for t in store.list_tenants()] == ["acme", "globex"]
    with pytest.raises(AlreadyExistsError):
        store.create_tenant(Tenant("acme", "again", T0))


def test_api_keys_are_found_by_hash_and_revoked(store: MetadataStore) -> None:
    key = ApiKeyRecord("k1", "acme", secret_hash("s3cret"), frozenset({"events:write"}), T0)
    store.add_api_key(key)
    store.add_api_key(ApiKeyRecord("k2", "globex", secret_hash("other"), frozenset(), T0))
    assert store.find_api_key_by_hash(secret_hash("s3cret")) == key
    assert store.find_api_key_by_hash(secret_hash("wrong")) is None
    assert store.find_api_key("k1") == key
    assert [k.key_id for k in store.list_api_keys("acme")] == ["k1"]
    if isinstance(store, SQLiteMetadataStore):
        # The secret itself is nowhere in the file.
        assert b"s3cret" not in (store.path.read_bytes() + _wal_bytes(store.path))
    with pytest.raises(AlreadyExistsError):
        store.add_api_key(ApiKeyRecord("k3", "acme", secret_hash("s3cret"), frozenset(), T0))
    with pytest.raises(LookupError):
        store.add_api_key(ApiKeyRecord("k4", "nobody", secret_hash("x"), frozenset(), T0))
    assert not store.revoke_api_key("globex", "k1", T0)  # another tenant's key
    assert store.revoke_api_key("acme", "k1", T0 + timedelta(days=1))
    assert store.revoke_api_key("acme", "k1", T0 + timedelta(days=2))  # keeps the first time
    revoked = store.find_api_key("k1")
    assert revoked is not None and revoked.revoked
    assert revoked.revoked_at == T0 + timedelta(days=1)


def _wal_bytes(path: Path) -> bytes:
    wal = path.with_name(path.name + "-wal")
    return wal.read_bytes() if wal.exists() else b""


def _all_pages(store: MetadataStore, tenant_id: str, page_size: int) -> list[list[QuarantineEntry]]:
    pages, token = [], ""
    while True:
        page, token = store.list_quarantined(tenant_id, page_size, token)
        pages.append(page)
        if not token:
            return pages


def test_quarantine_pages_are_complete_ordered_and_tenant_scoped(
    store: MetadataStore,
) -> None:
    store.add_quarantined([entry(n) for n in range(250)])
    store.add_quarantined([entry(n, "globex") for n in range(1000, 1030)])
    pages = _all_pages(store, "acme", 40)
    assert [len(p) for p in pages] == [40] * 6 + [10]
    listed = [e for page in pages for e in page]
    assert listed == sorted(
        (entry(n) for n in range(250)),
        key=lambda e: (e.received_at, e.quarantined_event_id),
        reverse=True,
    )
    assert {e.tenant_id for e in listed} == {"acme"}
    # Exactly one page when everything fits: no dangling empty page.
    assert [len(p) for p in _all_pages(store, "globex", 30)] == [30]


def test_pages_stay_stable_while_entries_arrive(store: MetadataStore) -> None:
    store.add_quarantined([entry(n) for n in range(100)])
    first, token = store.list_quarantined("acme", 30, "")
    # Newer entries arrive between page requests: no duplicates, nothing skipped.
    store.add_quarantined([entry(n, at=T0 + timedelta(days=1)) for n in range(500, 520)])
    rest = []
    while token:
        page, token = store.list_quarantined("acme", 30, token)
        rest.extend(page)
    ids = [e.quarantined_event_id for e in first + rest]
    assert len(ids) == len(set(ids)) == 100


def test_page_size_and_token_rules(store: MetadataStore) -> None:
    store.add_quarantined([entry(n) for n in range(1200)])
    assert len(store.list_quarantined("acme", 0, "")[0]) == 100  # default
    assert len(store.list_quarantined("acme", 5000, "")[0]) == MAX_PAGE_SIZE  # coerced
    with pytest.raises(ValueError):
        store.list_quarantined("acme", -1, "")
    _, token = store.list_quarantined("acme", 10, "")
    with pytest.raises(InvalidPageTokenError):
        store.list_quarantined("globex", 10, token)  # another tenant's listing
    for garbage in ("x", "!!!", "eyJ2IjogMn0", "W10"):
        with pytest.raises(InvalidPageTokenError):
            store.list_quarantined("acme", 10, garbage)


def test_get_and_delete_only_touch_the_callers_tenant(store: MetadataStore) -> None:
    store.add_quarantined([entry(n) for n in range(10)] + [entry(50, "globex")])
    found = store.get_quarantined("acme", ["q00001", "q00002", "q00050", "missing"])
    assert sorted(found) == ["q00001", "q00002"]
    assert found["q00001"] == entry(1)
    assert store.delete_quarantined("acme", ["q00001", "q00050"]) == 1
    assert store.get_quarantined("globex", ["q00050"]) != {}
    many = [f"q{n:05d}" for n in range(2, 10)] + [f"none{n}" for n in range(1500)]
    assert store.delete_quarantined("acme", many) == 8
    assert [e.quarantined_event_id for e in store.list_quarantined("acme", 10, "")[0]] == ["q00000"]


def test_add_quarantined_is_all_or_nothing(store: MetadataStore) -> None:
    store.add_quarantined([entry(1)])
    # The driver's integrity error, as before (callers never reuse ids: they are uuid4).
    with pytest.raises((sqlite3.IntegrityError, psycopg.IntegrityError)):
        store.add_quarantined([entry(2), entry(1)])  # duplicate id in the batch
    assert list(store.get_quarantined("acme", ["q00001", "q00002"])) == ["q00001"]


def test_concurrent_writers_from_threads(store: MetadataStore) -> None:
    def write(worker: int) -> None:
        for batch in range(10):
            store.add_quarantined([entry(worker * 1000 + batch * 10 + i) for i in range(10)])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(len(p) for p in _all_pages(store, "acme", 1000)) == 800


def test_wal_full_sync_and_persistence_across_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite3"
    with SQLiteMetadataStore(path) as store:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    # A process that writes and dies without closing: the WAL keeps what it committed.
    script = (
        "import os, sys\n"
        "from datetime import UTC, datetime\n"
        "from services.storage.metadata_store import SQLiteMetadataStore, Tenant\n"
        "s = SQLiteMetadataStore(sys.argv[1])\n"
        "s.create_tenant(Tenant('crash', 'Crash Test', datetime(2024, 1, 1, tzinfo=UTC)))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script, str(path)], cwd=root, check=False)
    assert result.returncode == -9
    assert path.with_name(path.name + "-wal").exists()
    with SQLiteMetadataStore(path) as store:
        assert store.get_tenant("crash") == Tenant(
            "crash", "Crash Test", datetime(2024, 1, 1, tzinfo=UTC)
        )
