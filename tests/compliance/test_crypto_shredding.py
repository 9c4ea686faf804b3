"""Crypto-shredding, without Kafka: the subject key store, the PII cipher, the batch
sealer/opener of the Kafka path, and erasure destroying the key first."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.compliance.consent import ConsentRegistry
from services.compliance.erasure import ErasureService
from services.compliance.pii_cipher import PiiCipher, PiiIntegrityError
from services.compliance.postgres_subject_keys import PostgresSubjectKeyStore
from services.compliance.subject_keys import (
    BaseSubjectKeyStore,
    KeyStoreError,
    SubjectKeyStore,
    open_subject_key_store,
)
from services.events.model import Enrichment, TrackedEvent, TrackedEventType
from services.ingestion.definitions import personal_fields_of
from services.storage.event_store import DuckDBEventStore, events_to_table
from services.storage.metadata_store import SQLiteMetadataStore
from services.streaming.avro_envelope import SEALED_FIELD_NAMES
from services.streaming.pii import PiiOpener, PiiSealer
from tests.storage.metadata_backends import BACKENDS, fresh_postgres_schema, requires_postgres

SECRET = "test-kek-secret-0123456789abcdef"
NOW = datetime(2026, 11, 28, 0, 0, tzinfo=UTC)


# Another "process" (pod) on the same key store: (secret, revalidate_seconds) -> store.
OpenKeys = Callable[..., BaseSubjectKeyStore]


@pytest.fixture(params=BACKENDS)
def open_keys(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenKeys]:
    """Opens key stores on one backend: the data dir's SQLite file, or tables in a fresh
    PostgreSQL schema (the cluster shape). Every store opened is closed after the test."""
    opened: list[BaseSubjectKeyStore] = []

    def sqlite(secret: str = SECRET, revalidate_seconds: float = 1.0) -> BaseSubjectKeyStore:
        store = SubjectKeyStore(
            tmp_path / "subject_keys.sqlite3", secret, revalidate_seconds=revalidate_seconds
        )
        opened.append(store)
        return store

    if request.param == "sqlite":
        yield sqlite
    else:
        with fresh_postgres_schema("keys_test") as url:

            def postgres(
                secret: str = SECRET, revalidate_seconds: float = 1.0
            ) -> BaseSubjectKeyStore:
                store = PostgresSubjectKeyStore(url, secret, revalidate_seconds=revalidate_seconds)
                opened.append(store)
                return store

            yield postgres
            for store in opened:
                store.close()
            return
    for store in opened:
        store.close()


@pytest.fixture
def keys(open_keys: OpenKeys) -> BaseSubjectKeyStore:
    return open_keys()


# --- key store ---------------------------------------------------------------------------


def test_keys_are_random_per_subject_stored_wrapped_and_survive_reopen(
    open_keys: OpenKeys,
) -> None:
    store = open_keys()
    a = store.get_or_create("t1", "alice@example.org")
    b = store.get_or_create("t1", "bob@example.org")
    other_tenant = store.get_or_create("t2", "alice@example.org")
    assert a is not None and b is not None and other_tenant is not None
    assert len(a.key) == 32 and len({a.key, b.key, other_tenant.key}) == 3
    assert store.get_or_create("t1", "alice@example.org") == a
    store.close()
    reopened = open_keys()
    assert reopened.get("t1", "alice@example.org") == a
    assert reopened.by_key_id("t1", a.key_id) == a
    assert reopened.by_key_id("t2", a.key_id) is None  # key ids are per tenant
    with pytest.raises(KeyStoreError):
        open_keys("another-secret-entirely").by_key_id("t1", a.key_id)


def test_the_sqlite_file_holds_no_key_or_subject_id_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "subject_keys.sqlite3"
    store = SubjectKeyStore(path, SECRET)
    a = store.get_or_create("t1", "alice@example.org")
    assert a is not None
    store.close()
    raw = path.read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("subject_keys.sqlite3-*")
    )
    # Neither the key nor the subject id is in the file in clear: wrapped and hashed.
    assert a.key not in raw and b"alice@example.org" not in raw


@pytest.mark.postgres
@requires_postgres()
def test_the_postgres_tables_hold_no_key_or_subject_id_in_clear(tmp_path: Path) -> None:
    import psycopg

    with fresh_postgres_schema("keys_test") as url:
        store = open_subject_key_store(url, tmp_path, SECRET)
        assert isinstance(store, PostgresSubjectKeyStore)
        a = store.get_or_create("t1", "alice@example.org")
        assert a is not None
        store.close()
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT * FROM subject_keys").fetchall()
        dump = repr(rows).encode()
        assert len(rows) == 1 and a.key not in bytes(rows[0][3])
        assert b"alice@example.org" not in dump


def test_two_pods_share_keys_and_a_destruction_in_one_stops_the_other(
    open_keys: OpenKeys,
) -> None:
    """Ingestion seals with a key, the processor (another pod) opens with it, compliance
    (a third) destroys it: the processor refuses it within `revalidate_seconds`."""
    sealer_pod = open_keys()
    processor_pod = open_keys(revalidate_seconds=0.3)
    eraser_pod = open_keys()
    created = sealer_pod.get_or_create("t1", "kim")
    assert created is not None
    assert processor_pod.by_key_id("t1", created.key_id) == created  # cached from here on
    assert eraser_pod.get("t1", "kim") == created
    assert eraser_pod.destroy("t1", "kim") is True
    time.sleep(0.4)  # past the documented bound
    assert processor_pod.by_key_id("t1", created.key_id) is None
    assert sealer_pod.destroyed_at("t1", "kim") == eraser_pod.destroyed_at("t1", "kim")
    # fence() forgets at once, whatever the bound.
    again = sealer_pod.get_or_create("t1", "ola")
    assert again is not None and processor_pod.by_key_id("t1", again.key_id) == again
    eraser_pod.destroy("t1", "ola")
    processor_pod.fence()
    assert processor_pod.by_key_id("t1", again.key_id) is None


def test_concurrent_creation_in_two_pods_yields_one_key(open_keys: OpenKeys) -> None:
    pods = [open_keys(), open_keys()]
    results: list[object] = []

    def create(pod: BaseSubjectKeyStore) -> None:
        for i in range(20):
            results.append(pod.get_or_create("t1", f"s{i}"))

    threads = [threading.Thread(target=create, args=(pod,)) for pod in pods]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(20):
        assert pods[0].get("t1", f"s{i}") == pods[1].get("t1", f"s{i}") is not None


def test_destroy_forgets_the_key_invalidates_the_cache_and_blocks_older_events(
    keys: BaseSubjectKeyStore,
) -> None:
    key = keys.get_or_create("t1", "kim")
    assert key is not None
    assert keys.get("t1", "kim") == key  # now cached
    assert keys.by_key_id("t1", key.key_id) == key
    assert keys.destroy("t1", "kim") is True
    assert keys.get("t1", "kim") is None
    assert keys.by_key_id("t1", key.key_id) is None
    destroyed = keys.destroyed_at("t1", "kim")
    assert destroyed is not None
    # An event received before the erasure never gets a key the erasure did not destroy.
    assert keys.get_or_create("t1", "kim", destroyed - timedelta(seconds=1)) is None
    assert keys.get("t1", "kim") is None
    # One received after it starts a new lifecycle: a fresh key, a new token.
    fresh = keys.get_or_create("t1", "kim", destroyed + timedelta(seconds=1))
    assert fresh is not None and fresh.key != key.key and fresh.key_id != key.key_id
    # A late event of the erased lifecycle is refused the new key as well.
    assert keys.get_or_create("t1", "kim", destroyed - timedelta(seconds=1)) is None
    assert keys.get("t1", "kim") == fresh
    assert keys.destroy("t1", "nobody") is False


def test_a_destruction_by_another_process_is_seen_after_revalidation(
    open_keys: OpenKeys,
) -> None:
    reader = open_keys(revalidate_seconds=0.2)
    eraser = open_keys()
    key = reader.get_or_create("t1", "kim")
    assert key is not None and reader.by_key_id("t1", key.key_id) == key
    eraser.destroy("t1", "kim")
    time.sleep(0.3)
    assert reader.by_key_id("t1", key.key_id) is None


def test_destroy_waits_for_batches_decrypted_before_it(keys: BaseSubjectKeyStore) -> None:
    keys.get_or_create("t1", "kim")
    lease = keys.acquire_lease()
    finished = threading.Event()

    def erase() -> None:
        keys.destroy("t1", "kim")
        finished.set()

    thread = threading.Thread(target=erase)
    thread.start()
    assert not finished.wait(0.5), "destroy returned while an older batch was uncommitted"
    # destroy() deletes the key (a database write) before it fences: `later` must be taken
    # once the fence has advanced the lease generation, or it would be waited for too.
    deadline = time.monotonic() + 30
    while keys._leases._generation <= lease:
        assert time.monotonic() < deadline, "destroy never reached its fence"
        time.sleep(0.01)
    assert not finished.is_set(), "destroy returned while an older batch was uncommitted"
    later = keys.acquire_lease()  # taken after the destruction: not waited for
    assert later > lease
    keys.release_lease(lease)
    assert finished.wait(30)
    keys.release_lease(later)
    thread.join()


# --- cipher ------------------------------------------------------------------------------

PLAIN = {"ip_hash": "ab12cd34", "user_agent": '["Firefox","120","Linux","desktop"]'}


def test_seal_and_open_round_trip(keys: BaseSubjectKeyStore) -> None:
    cipher = PiiCipher(keys)
    sealed = cipher.seal("t1", "e-1", "kim", "anon-7", PLAIN)
    assert set(sealed.ciphertexts) == {"user_id", "anonymous_id", "ip_hash", "user_agent"}
    assert all("kim" not in text for text in sealed.ciphertexts.values())
    kim = keys.get("t1", "kim")
    assert kim is not None and sealed.subject_token == kim.key_id
    assert sealed.key_ids.split(",")[0] == kim.key_id and len(sealed.key_ids.split(",")) == 2
    opened = cipher.open("t1", "e-1", sealed.key_ids, sealed.ciphertexts)
    assert opened == {**PLAIN, "user_id": "kim", "anonymous_id": "anon-7"}
    # The same subject always gets the same token (distinct counts stay right).
    assert cipher.seal("t1", "e-2", "kim", "", {}).subject_token == sealed.subject_token


def test_tampered_or_misbound_ciphertexts_do_not_open(keys: BaseSubjectKeyStore) -> None:
    cipher = PiiCipher(keys)
    sealed = cipher.seal("t1", "e-1", "kim", "", PLAIN)
    raw = bytearray(base64.b64decode(sealed.ciphertexts["user_id"]))
    raw[-1] ^= 1
    tampered = {**sealed.ciphertexts, "user_id": base64.b64encode(bytes(raw)).decode()}
    with pytest.raises(PiiIntegrityError):
        cipher.open("t1", "e-1", sealed.key_ids, tampered)
    with pytest.raises(PiiIntegrityError):  # copied into another event
        cipher.open("t1", "e-2", sealed.key_ids, sealed.ciphertexts)
    swapped = {"user_id": sealed.ciphertexts["ip_hash"]}
    with pytest.raises(PiiIntegrityError):  # moved to another field
        cipher.open("t1", "e-1", sealed.key_ids, swapped)
    # Another tenant has no such key: nothing opens there.
    assert cipher.open("t2", "e-1", sealed.key_ids, sealed.ciphertexts) is None
    # The same subject id in another tenant has another key, which does not open it.
    other = cipher.seal("t2", "e-9", "kim", "", {})
    with pytest.raises(PiiIntegrityError):
        cipher.open("t2", "e-1", other.key_ids, sealed.ciphertexts)


def test_destroying_either_subject_key_shreds_the_event(keys: BaseSubjectKeyStore) -> None:
    cipher = PiiCipher(keys)
    both = cipher.seal("t1", "e-1", "kim", "anon-7", PLAIN)
    only_user = cipher.seal("t1", "e-2", "kim", "", PLAIN)
    only_anon = cipher.seal("t1", "e-3", "", "anon-7", PLAIN)
    keys.destroy("t1", "anon-7")
    assert cipher.open("t1", "e-1", both.key_ids, both.ciphertexts) is None
    assert cipher.open("t1", "e-3", only_anon.key_ids, only_anon.ciphertexts) is None
    assert cipher.open("t1", "e-2", only_user.key_ids, only_user.ciphertexts) is not None
    keys.destroy("t1", "kim")
    assert cipher.open("t1", "e-2", only_user.key_ids, only_user.ciphertexts) is None


# --- the Kafka path's batch sealer / opener ------------------------------------------------


def _event(
    i: int, user: str, anon: str = "", properties: str = "{}", schema_id: int = 0
) -> TrackedEvent:
    return TrackedEvent(
        tenant_id="t1",
        event_id=f"e-{i}",
        event_type=TrackedEventType.PAGE_VIEW,
        event_name="page_view",
        occurred_at=NOW,
        received_at=NOW,
        user_id=user,
        anonymous_id=anon,
        properties_json=properties,
        schema_id=schema_id,
        enrichment=Enrichment(
            ip_hash=f"iphash{i}",
            country_code="DE",
            browser_family="Firefox",
            browser_version="120",
            os_family="Linux",
            device_type="desktop",
        ),
    )


def test_sealed_batches_hold_no_pii_and_open_back_exactly(keys: BaseSubjectKeyStore) -> None:
    events = [_event(1, "kim"), _event(2, "", "anon-7"), _event(3, "ola", "anon-8"), _event(4, "")]
    table = events_to_table(events)
    sealed = PiiSealer(PiiCipher(keys)).seal_table(table)
    rows = sealed.to_pylist()
    for row in rows[:3]:
        assert row["user_id"] == row["anonymous_id"] == row["ip_hash"] == ""
        assert row["browser_family"] == row["device_type"] == ""
        assert row["pii_key_ids"] and row["subject_token"] and row["pii_ip_hash"]
    assert "kim" not in str(rows) and "anon-7" not in str(rows) and "iphash1" not in str(rows)
    # Neither id: no subject to erase, nothing sealed, left as it was.
    assert rows[3]["ip_hash"] == "iphash4" and rows[3]["pii_key_ids"] == ""
    store_part = sealed.select(table.column_names)
    opened = PiiOpener(PiiCipher(keys)).open_table(store_part, sealed.select(SEALED_FIELD_NAMES))
    assert opened.table.equals(table)
    assert (opened.sealed_events, opened.anonymised_events, opened.unreadable_events) == (3, 0, 0)


def test_personal_properties_are_sealed_and_dropped_when_shredded(
    keys: BaseSubjectKeyStore,
) -> None:
    personal = {42: frozenset({"email"})}
    events = [
        _event(1, "kim", properties='{"email":"kim@example.org","seat":"A12"}', schema_id=42),
        _event(2, "ola", properties='{"email":"ola@example.org","seat":"B3"}', schema_id=42),
        _event(3, "kim", properties='{"email":"x@example.org"}', schema_id=0),  # no definition
    ]
    table = events_to_table(events)
    sealer = PiiSealer(PiiCipher(keys), lambda schema_id: personal.get(schema_id, frozenset()))
    sealed = sealer.seal_table(table)
    assert sealed.column("properties_json").to_pylist()[:2] == ['{"seat":"A12"}', '{"seat":"B3"}']
    assert "kim@example.org" not in str(sealed.to_pylist())
    # Unmarked properties (no definition) stay in clear: documented.
    assert sealed.column("properties_json")[2].as_py() == '{"email":"x@example.org"}'
    keys.destroy("t1", "kim")
    opener = PiiOpener(PiiCipher(keys))
    result = opener.open_table(sealed.select(table.column_names), sealed.select(SEALED_FIELD_NAMES))
    rows = result.table.to_pylist()
    assert result.anonymised_events == 2 and result.sealed_events == 3
    assert rows[0]["user_id"] == "" and rows[0]["ip_hash"] == "" and rows[0]["os_family"] == ""
    assert rows[0]["properties_json"] == '{"seat":"A12"}'  # personal property gone
    assert rows[1]["user_id"] == "ola" and "ola@example.org" in rows[1]["properties_json"]
    assert rows[0]["event_id"] == "e-1" and rows[0]["country_code"] == "DE"  # the rest kept


def test_tampered_records_are_anonymised_and_counted(keys: BaseSubjectKeyStore) -> None:
    table = events_to_table([_event(1, "kim")])
    sealed = PiiSealer(PiiCipher(keys)).seal_table(table)
    seals = sealed.select(SEALED_FIELD_NAMES).to_pylist()
    seals[0]["pii_user_id"] = seals[0]["pii_ip_hash"]
    import pyarrow as pa

    result = PiiOpener(PiiCipher(keys)).open_table(
        sealed.select(table.column_names), pa.Table.from_pylist(seals)
    )
    assert result.unreadable_events == 1 and result.table.column("user_id")[0].as_py() == ""


def test_events_received_before_an_erasure_are_sealed_without_pii(
    keys: BaseSubjectKeyStore,
) -> None:
    keys.destroy("t1", "kim")
    destroyed = keys.destroyed_at("t1", "kim")
    assert destroyed is not None
    early = replace(_event(1, "kim"), received_at=destroyed - timedelta(seconds=5))
    late = replace(_event(2, "kim"), received_at=destroyed + timedelta(seconds=5))
    sealer = PiiSealer(PiiCipher(keys))
    rows = sealer.seal_table(events_to_table([early, late])).to_pylist()
    assert rows[0]["pii_key_ids"] == "" and rows[0]["user_id"] == "" and rows[0]["ip_hash"] == ""
    assert rows[1]["pii_key_ids"] != "" and sealer.withheld_events == 1


def test_definitions_mark_personal_fields() -> None:
    schema = {
        "type": "record",
        "name": "signup",
        "fields": [
            {"name": "email", "type": "string", "personal": True},
            {"name": "plan", "type": "string"},
            {"name": "phone", "type": "string", "personal": "yes"},  # only `true` counts
        ],
    }
    assert personal_fields_of(schema) == frozenset({"email"})


# --- erasure -----------------------------------------------------------------------------


class _OrderedRows:
    def __init__(self, store: DuckDBEventStore, keys: BaseSubjectKeyStore) -> None:
        self.store = store
        self.keys = keys
        self.key_gone_first: bool | None = None

    def erase_subject(self, tenant_id: str, subject_id: str) -> tuple[int, int]:
        self.key_gone_first = self.keys.get(tenant_id, subject_id) is None
        return self.store.erase_subject(tenant_id, subject_id)


def test_erasure_destroys_the_key_first_and_certifies_it(
    tmp_path: Path, keys: BaseSubjectKeyStore
) -> None:
    metadata = SQLiteMetadataStore(tmp_path / "metadata.sqlite3")
    store = DuckDBEventStore(tmp_path / "events.duckdb")
    store.append([_event(1, "kim"), _event(2, "ola")])
    cipher = PiiCipher(keys)
    kim = cipher.seal("t1", "e-1", "kim", "", PLAIN)
    ola = cipher.seal("t1", "e-2", "ola", "", PLAIN)
    rows = _OrderedRows(store, keys)
    service = ErasureService(
        metadata,
        rows,
        ConsentRegistry(metadata),
        ["Kafka topic events", "Pinot table tracked_events"],
        keys=keys,
    )
    done = service.create("t1", "req-1", "kim")
    assert done.state == "DONE" and rows.key_gone_first is True
    assert cipher.open("t1", "e-1", kim.key_ids, kim.ciphertexts) is None
    assert cipher.open("t1", "e-2", ola.key_ids, ola.ciphertexts) is not None
    assert store.read("SELECT user_id FROM tracked_events").column(0).to_pylist() == ["ola"]
    text = "\n".join(done.certificate)
    assert "data key destroyed" in text
    assert "Kafka topic events: the subject's events sealed since" in text
    assert "Pinot table tracked_events: the subject's events sealed since" in text
    # What the keys cannot reach is still named.
    assert "NOT ERASED: Kafka topic events, records produced before" in text
    assert "crypto-shredding is off" not in text
    store.close()


class _FailOnceRows:
    def __init__(self) -> None:
        self.calls = 0

    def erase_subject(self, tenant_id: str, subject_id: str) -> tuple[int, int]:
        self.calls += 1
        if self.calls == 1:
            raise OSError("disk gone")
        return 0, 0


def test_a_retried_erasure_certifies_the_key_its_first_run_destroyed(
    tmp_path: Path, keys: BaseSubjectKeyStore
) -> None:
    metadata = SQLiteMetadataStore(tmp_path / "metadata.sqlite3")
    keys.get_or_create("t1", "kim")
    service = ErasureService(
        metadata, _FailOnceRows(), ConsentRegistry(metadata), ["Kafka topic events"], keys=keys
    )
    assert service.create("t1", "req-1", "kim").state == "FAILED"
    assert keys.get("t1", "kim") is None  # destroyed before the failing step
    done = service.create("t1", "req-1", "kim")
    text = "\n".join(done.certificate)
    assert done.state == "DONE" and "data key already destroyed at" in text
    assert "Kafka topic events: the subject's events sealed since" in text


def test_a_batch_reads_its_keys_in_one_query_per_tenant(
    open_keys: OpenKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sealing and opening prefetch a batch's keys: on PostgreSQL one round trip per tenant
    instead of one per subject."""
    sealer_pod, processor_pod = open_keys(), open_keys()
    keys = [sealer_pod.get_or_create("t1", f"s{i}") for i in range(50)]
    assert all(k is not None for k in keys)

    def no_single_reads(*_args: object) -> None:
        raise AssertionError("a key was read alone instead of with its batch")

    processor_pod.prefetch_key_ids([("t1", k.key_id) for k in keys if k is not None])
    monkeypatch.setattr(processor_pod, "_select_by_key_id", no_single_reads)
    monkeypatch.setattr(processor_pod, "_select_by_subject", no_single_reads)
    assert [processor_pod.by_key_id("t1", k.key_id) for k in keys if k is not None] == keys
    processor_pod.prefetch_subjects([("t1", f"s{i}") for i in range(50)] + [("t1", "")])
    assert [processor_pod.get("t1", f"s{i}") for i in range(50)] == keys
