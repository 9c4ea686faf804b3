"""PostgresMetadataStore with several instances on one database (several pods): what one
writes the others read at once, and what SQLite's single writer guaranteed (one audit
chain, ids committed in order, one erasure per request id, a token id burnt once) holds
across instances writing at the same moment."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from services.compliance.consent import ConsentMode, ConsentRegistry, Purpose
from services.platform.errors import AnalyticsError
from services.storage.metadata_store import (
    SCHEMA_VERSION,
    ApiKeyRecord,
    ConsentEntry,
    ErasureRecord,
    MetadataStore,
    Tenant,
    open_metadata_store,
)
from services.storage.postgres_metadata_store import PostgresMetadataStore
from tests.storage.metadata_backends import fresh_postgres_schema, postgres_dsn, requires_postgres

pytestmark = [pytest.mark.integration, pytest.mark.postgres, requires_postgres()]

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def url() -> Iterator[str]:
    with fresh_postgres_schema() as dsn:
        yield dsn


@pytest.fixture
def pods(url: str) -> Iterator[tuple[MetadataStore, MetadataStore]]:
    """Two store instances on the same database, as two pods would open it."""
    first, second = open_metadata_store(url, _unused_dir()), open_metadata_store(url, _unused_dir())
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def _unused_dir() -> Path:
    return Path("/nonexistent")  # open_metadata_store reads the data dir for SQLite only


def _run_threads(count: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            work(n)
        except BaseException as exc:  # surfaced below: a thread's failure fails the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_schema_is_created_in_the_search_path_schema_with_its_version(url: str) -> None:
    with PostgresMetadataStore(url) as store:
        store.create_tenant(Tenant("acme", "ACME", T0))
    dsn = postgres_dsn()
    assert dsn is not None
    schema = url.rsplit("search_path%3D", 1)[1]
    with psycopg.connect(dsn) as conn:
        version = conn.execute(f'SELECT version FROM "{schema}".metadata_schema_version').fetchone()
        assert version == (SCHEMA_VERSION,)
        # Reopening keeps the data; a newer schema than this build reads is refused.
        with PostgresMetadataStore(url) as again:
            assert again.get_tenant("acme") == Tenant("acme", "ACME", T0)
        conn.execute(f'UPDATE "{schema}".metadata_schema_version SET version = 99')
        conn.commit()
    with pytest.raises(RuntimeError, match="v99"):
        PostgresMetadataStore(url)


def test_pods_starting_at_once_create_the_schema_once(url: str) -> None:
    """CREATE SCHEMA/TABLE IF NOT EXISTS race with each other in PostgreSQL; the DDL runs
    under an advisory lock, so every pod starting together opens the store."""
    opened: list[PostgresMetadataStore] = []
    lock = threading.Lock()

    def start(n: int) -> None:
        store = PostgresMetadataStore(url, pool_size=1)
        with lock:
            opened.append(store)

    try:
        _run_threads(4, start)
        opened[0].create_tenant(Tenant("acme", "ACME", T0))
        assert all(s.get_tenant("acme") is not None for s in opened)
    finally:
        for store in opened:
            store.close()


def test_the_password_is_not_in_the_repr_or_a_settings_error(url: str) -> None:
    from services.platform.settings import PlatformSettings

    # The test server trusts local connections, so the password is accepted and unused.
    with_password = url.replace("://postgres@", "://postgres:pw-s3cret@", 1)
    with PostgresMetadataStore(with_password) as store:
        assert "pw-s3cret" not in repr(store)
    assert "pw-s3cret" not in repr(PlatformSettings(metadata_store_url=with_password))
    with pytest.raises(ValueError) as refused:
        PlatformSettings(metadata_store_url="mysql://root:pw-s3cret@db/x")
    assert "metadata_store_url" in str(refused.value)
    assert "pw-s3cret" not in str(refused.value)


def test_two_pods_see_each_others_keys_tenants_and_consent_at_once(
    pods: tuple[MetadataStore, MetadataStore],
) -> None:
    compliance, ingestion = pods
    compliance.create_tenant(Tenant("acme", "ACME", T0))
    assert ingestion.get_tenant("acme") == Tenant("acme", "ACME", T0)
    key = ApiKeyRecord("k1", "acme", "h" * 64, frozenset({"events:write"}), T0, display_name="web")
    compliance.add_api_key(key)
    assert ingestion.find_api_key("k1") == key
    assert ingestion.find_api_key_by_hash("h" * 64) == key
    assert compliance.revoke_api_key("acme", "k1", T0 + timedelta(hours=1))
    revoked = ingestion.find_api_key("k1")
    assert revoked is not None and revoked.revoked
    withdrawal = ConsentEntry("acme", "carol", "ANALYTICS", False, "banner", "v1", T0)
    compliance.add_consent(withdrawal)
    assert ingestion.latest_consents("ANALYTICS") == [withdrawal]
    assert ingestion.consent_history("acme", "carol") == [withdrawal]


def test_concurrent_audit_appends_from_two_pods_keep_one_chain(
    pods: tuple[MetadataStore, MetadataStore],
) -> None:
    per_thread = 25

    def append(n: int) -> None:
        store = pods[n % 2]  # threads alternate between the two pods
        for i in range(per_thread):
            for tenant in ("acme", ""):  # a tenant chain and the platform chain
                store.append_audit(
                    tenant, f"actor-{n}-{i}", "Rpc", "", "ipv4:10.0.0.1:1", "OK",
                    datetime.now(UTC),
                )  # fmt: skip

    _run_threads(8, append)
    for tenant in ("acme", ""):
        for store in pods:
            report = store.verify_audit_chain(tenant)
            assert report.intact, report
            assert report.checked_count == 8 * per_thread
        entries, token = pods[0].list_audit(tenant, 1000, "")
        assert token == ""
        assert [e.sequence for e in entries] == list(range(8 * per_thread, 0, -1))
        # No fork: each entry links to the one before it, and every append landed once.
        for newer, older in itertools.pairwise(entries):
            assert newer.prev_hash == older.entry_hash
        assert len({e.actor for e in entries}) == 8 * per_thread
    assert pods[1].audit_tenants() == ["", "acme"]


def test_a_single_use_token_id_burns_once_across_pods(
    pods: tuple[MetadataStore, MetadataStore],
) -> None:
    results: list[bool] = []
    lock = threading.Lock()

    def burn(n: int) -> None:
        burnt = pods[n % 2].burn_token_id("jti-1", T0 + timedelta(days=1), T0)
        with lock:
            results.append(burnt)

    _run_threads(8, burn)
    assert sorted(results) == [False] * 7 + [True]


def test_erasure_creation_is_idempotent_across_pods(
    pods: tuple[MetadataStore, MetadataStore],
) -> None:
    outcomes: list[tuple[ErasureRecord, bool]] = []
    lock = threading.Lock()

    def create(n: int) -> None:
        record = ErasureRecord(
            f"er-{n}", "acme", "req-1", "kim", "ACCEPTED", T0, T0 + timedelta(days=30)
        )
        outcome = pods[n % 2].create_erasure(record)
        with lock:
            outcomes.append(outcome)

    _run_threads(8, create)
    created = [record for record, fresh in outcomes if fresh]
    assert len(created) == 1
    assert {record.erasure_request_id for record, _ in outcomes} == {created[0].erasure_request_id}
    assert pods[1].get_erasure("acme", created[0].erasure_request_id) == created[0]


def test_a_following_registry_catches_up_with_every_decision_of_other_pods(
    pods: tuple[MetadataStore, MetadataStore],
) -> None:
    writers, reader = pods
    follower = ConsentRegistry(reader, feed=reader)
    recorder = ConsentRegistry(writers)
    recorder.record("acme", "carol", Purpose.ANALYTICS, False, "banner", "v1")
    assert follower.allows_analytics("acme", "carol", "")  # not caught up yet
    follower.catch_up()
    assert not follower.allows_analytics("acme", "carol", "")
    # A mode change and an erasure are not appended decisions: they reset the follower.
    recorder.set_mode("acme", ConsentMode.REQUIRED)
    follower.catch_up()
    assert not follower.allows_analytics("acme", "dave", "")
    recorder.record("acme", "dave", Purpose.ANALYTICS, True, "banner", "v1")
    recorder.forget("acme", "carol")
    follower.catch_up()
    assert follower.allows_analytics("acme", "dave", "")
    assert not follower.allows_analytics("acme", "carol", "")  # required, nothing granted
    # Decisions written by many threads of both pods while the follower keeps catching
    # up: consent ids commit in order, so nothing is skipped.
    stop = threading.Event()

    def follow() -> None:
        while not stop.is_set():
            follower.catch_up()

    reader_thread = threading.Thread(target=follow)
    reader_thread.start()
    try:

        def write(n: int) -> None:
            registry = ConsentRegistry(pods[n % 2])
            for i in range(40):
                registry.record("acme", f"s{i % 10}", Purpose.ANALYTICS, (n + i) % 3 != 0, "x", "v")

        _run_threads(6, write)
    finally:
        stop.set()
        reader_thread.join()
    follower.catch_up()
    latest = {e.subject_id: e.granted for e in reader.latest_consents("ANALYTICS")}
    for subject, granted in latest.items():
        assert follower.allows_analytics("acme", subject, "") is granted, subject


async def test_refresh_fails_closed_when_the_store_is_gone(url: str) -> None:
    store = open_metadata_store(url, _unused_dir())
    registry = ConsentRegistry(store, feed=store)
    await registry.refresh()
    store.close()
    with pytest.raises(AnalyticsError) as caught:
        await registry.refresh()
    assert caught.value.reason == "DEPENDENCY_UNAVAILABLE"


def test_audit_verify_command_reads_the_shared_database(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.cli import main

    with PostgresMetadataStore(url) as store:
        for n in range(3):
            store.append_audit("acme", f"a{n}", "Rpc", "", "local", "OK", datetime.now(UTC))
    # The URL comes from the environment, as in a pod; there is no SQLite file at all.
    monkeypatch.setenv("BILTEN_METADATA_STORE_URL", url)
    assert main(["audit", "verify", "--data-dir", str(tmp_path)]) == 0
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE audit_log SET actor = 'someone-else' WHERE sequence = 2")
    capsys.readouterr()
    assert main(["audit", "verify", "--data-dir", str(tmp_path)]) == 1
    assert '"first_broken_sequence": 2' in capsys.readouterr().out
