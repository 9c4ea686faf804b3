"""Erasure applied by each stream-processor host from the shared metadata store
(services/compliance/erasure_hosts.py), without Kafka: the real PostgreSQL metadata, real
DuckDB stores (one for the compliance pod, one per host)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.compliance.consent import ConsentRegistry
from services.compliance.erasure import ErasureService
from services.compliance.erasure_hosts import ErasedSubjects, ErasureApplier, host_id
from services.events.model import TrackedEvent, TrackedEventType
from services.query.rollups import TIERS, RetentionPolicy, RollupMaintainer, RollupStore
from services.storage.event_store import DuckDBEventStore, events_to_table
from services.storage.postgres_metadata_store import PostgresMetadataStore
from tests.storage.metadata_backends import fresh_postgres_schema, postgres_dsn

T0 = datetime(2026, 11, 28, 0, 0, tzinfo=UTC)


def _event(
    i: int, user: str, anon: str = "", tenant: str = "t1", at: datetime = T0
) -> TrackedEvent:
    return TrackedEvent(
        tenant_id=tenant,
        event_id=f"e-{i}",
        event_type=TrackedEventType.PAGE_VIEW,
        event_name="page_view",
        occurred_at=at,
        received_at=at,
        user_id=user,
        anonymous_id=anon,
    )


def test_erased_subjects_drop_only_rows_received_before_the_erasure() -> None:
    erased = ErasedSubjects()
    table = events_to_table(
        [
            _event(1, "kim"),  # before: dropped
            _event(2, "", "kim"),  # the anonymous id counts too
            _event(3, "kim", at=T0 + timedelta(minutes=2)),  # after: a new lifecycle, kept
            _event(4, "kim", tenant="t2"),  # another tenant's "kim": kept
            _event(5, "ola"),
        ]
    )
    assert erased.drop_erased(table) is table  # nothing erased yet
    erased.add("t1", "kim", T0 + timedelta(minutes=1))
    kept = erased.drop_erased(table).column("event_id").to_pylist()
    assert kept == ["e-3", "e-4", "e-5"] and erased.dropped_events == 2
    assert len(erased) == 1
    erased.prune(T0)  # finished after T0: kept
    assert len(erased) == 1
    erased.prune(T0 + timedelta(minutes=2))  # past the topic retention: forgotten
    assert len(erased) == 0 and erased.drop_erased(table) is table


def test_a_host_id_is_stable_per_data_dir_and_new_when_the_data_dir_is_lost(
    tmp_path: Path,
) -> None:
    first = host_id("processor-0", tmp_path / "a")
    assert first.startswith("processor-0/") and host_id("processor-0", tmp_path / "a") == first
    assert host_id("processor-0", tmp_path / "b") != first


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[PostgresMetadataStore]:
    if postgres_dsn() is None:
        pytest.skip("BILTEN_TEST_POSTGRES_DSN is not set")
    with fresh_postgres_schema("erasure_hosts") as url:
        store = PostgresMetadataStore(url)
        yield store
        store.close()


def _applier(
    metadata: PostgresMetadataStore, store: DuckDBEventStore, host: str, **kwargs: object
) -> ErasureApplier:
    return ErasureApplier(
        metadata,
        store,
        host,
        ErasedSubjects(),
        timedelta(seconds=1),
        lookback=timedelta(days=8),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.postgres
def test_each_host_applies_the_erasure_to_its_own_store_and_it_is_certified(
    tmp_path: Path, shared: PostgresMetadataStore
) -> None:
    compliance_store = DuckDBEventStore(tmp_path / "compliance.duckdb")
    hosts = [DuckDBEventStore(tmp_path / f"host{i}.duckdb") for i in range(2)]
    for store in hosts:
        store.append([_event(1, "kim"), _event(2, "ola"), _event(3, "", "kim")])
    dropped: list[str] = []
    appliers = [
        _applier(shared, store, f"host-{i}", after_erase=dropped.append)
        for i, store in enumerate(hosts)
    ]
    service = ErasureService(
        shared, compliance_store, ConsentRegistry(shared), ["Kafka topic t"], hosts=shared
    )
    done = service.create("t1", "req-1", "kim")
    assert done.state == "DONE"
    assert any("this process's event store (tracked_events): 0 rows" in x for x in done.certificate)
    assert not any("stream-processor host host-" in x for x in done.certificate)

    assert appliers[0].apply_pending() == 1
    assert appliers[0].apply_pending() == 0  # recorded: not applied twice
    assert dropped == ["t1"]
    ids = hosts[0].read("SELECT user_id FROM tracked_events").column(0).to_pylist()
    assert ids == ["ola"]
    # The other host has not polled yet: its copy still holds the rows.
    assert hosts[1].read("SELECT count(*) FROM tracked_events").column(0)[0].as_py() == 3
    got = service.get("t1", done.erasure_request_id)
    assert got is not None
    lines = [x for x in got.certificate if "stream-processor host" in x and "rows deleted" in x]
    assert len(lines) == 1 and "host host-0: 2 rows deleted" in lines[0]

    assert appliers[1].apply_pending() == 1
    got = service.get("t1", done.erasure_request_id)
    assert got is not None
    assert sum("rows deleted, " in x and "host host-" in x for x in got.certificate) == 2
    # A host whose store was lost comes back with a new id and applies it again.
    assert _applier(shared, hosts[1], "host-1/new-store").apply_pending() == 1
    # A restarted host loads the erased subjects before its processor consumes.
    restarted = _applier(shared, hosts[0], "host-0")
    restarted.load()
    assert len(restarted.erased) == 1
    for store in (compliance_store, *hosts):
        store.close()


@pytest.mark.postgres
def test_the_delete_waits_for_batches_prepared_before_it(
    tmp_path: Path, shared: PostgresMetadataStore
) -> None:
    """A batch that passed the filter before the host learnt of the erasure commits
    before the delete, so the delete removes it instead of being undone by it."""
    host = DuckDBEventStore(tmp_path / "host.duckdb")
    applier = _applier(shared, host, "host-0", lease_wait_seconds=60)
    service = ErasureService(
        shared, DuckDBEventStore(tmp_path / "c.duckdb"), ConsentRegistry(shared), hosts=shared
    )
    lease = applier.erased.acquire()  # the processor is between filter and commit
    batch = applier.erased.drop_erased(events_to_table([_event(1, "kim")]))
    assert service.create("t1", "req-1", "kim").state == "DONE"
    finished = threading.Event()

    def apply() -> None:
        applier.apply_pending()
        finished.set()

    thread = threading.Thread(target=apply)
    thread.start()
    assert not finished.wait(0.5), "the delete ran before the batch prepared earlier committed"
    # A batch prepared now is filtered: the subject's earlier event is not stored again.
    # The applier learns of the erasure from a database query in its thread first.
    deadline = time.monotonic() + 30
    while applier.erased.drop_erased(events_to_table([_event(2, "kim")])).num_rows != 0:
        assert time.monotonic() < deadline, "the applier never took up the erasure"
        time.sleep(0.01)
    assert not finished.is_set(), "the delete ran before the batch prepared earlier committed"
    host.append_table(batch)
    applier.erased.release(lease)
    assert finished.wait(30)
    thread.join()
    assert host.read("SELECT count(*) FROM tracked_events").column(0)[0].as_py() == 0
    host.close()


@pytest.mark.postgres
def test_a_host_with_rollups_replaces_the_order_ids_there_and_it_is_certified(
    tmp_path: Path, shared: PostgresMetadataStore
) -> None:
    purchases = [
        dataclasses.replace(
            _event(i, user, at=T0 + timedelta(minutes=i)),
            event_type=TrackedEventType.CONVERSION,
            event_name="ticket_purchased",
            order_id=order,
            currency="EUR",
            revenue=Decimal("10"),
            quantity=1,
        )
        for i, (user, order) in enumerate((("kim", "kim-o1"), ("kim", "kim-o2"), ("ola", "ola-o1")))
    ]
    with_rollups = DuckDBEventStore(tmp_path / "host0.duckdb")
    without = DuckDBEventStore(tmp_path / "host1.duckdb")
    rollup_store = RollupStore(tmp_path / "rollups.duckdb")
    maintainer = RollupMaintainer(with_rollups, rollup_store, RetentionPolicy())
    for store in (with_rollups, without):
        store.append(purchases)
    maintainer.observe_events(purchases)
    maintainer.flush()
    service = ErasureService(
        shared, DuckDBEventStore(tmp_path / "c.duckdb"), ConsentRegistry(shared), hosts=shared
    )
    done = service.create("t1", "req-1", "kim")
    assert any("this process's rollups: none kept (no aggregation runtime)" in x
               for x in done.certificate)  # fmt: skip
    assert any("replaces the subject's order ids in its rollups" in x for x in done.certificate)

    assert _applier(
        shared, with_rollups, "host-0", orders=with_rollups, rollups=lambda: maintainer
    ).apply_pending() == 1  # fmt: skip
    assert _applier(shared, without, "host-1", orders=without).apply_pending() == 1

    for tier in TIERS:
        ids = rollup_store.read(f"SELECT DISTINCT unnest(order_ids) FROM {tier.table}")
        orders = set(ids.column(0).to_pylist())
        assert "ola-o1" in orders and not {"kim-o1", "kim-o2"} & orders, tier
        assert len([o for o in orders if o.startswith("erased:")]) == 2, tier
    got = service.get("t1", done.erasure_request_id)
    assert got is not None
    lines = [x for x in got.certificate if "rollups of stream-processor host" in x]
    assert len(lines) == 2
    assert "host host-0 (rollups.duckdb, minute/hour/day tiers): 2 order ids" in lines[0]
    assert "host host-1: nothing changed (no aggregation runtime on that host" in lines[1]
    rollup_store.close()
    for store in (with_rollups, without):
        store.close()
