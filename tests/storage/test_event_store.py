"""DuckDBEventStore on real files: layout, atomicity, actor keys, reads, concurrency."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from services.events.model import Enrichment, EventSource, TrackedEvent, TrackedEventType
from services.storage.event_store import (
    COLUMNS,
    DERIVED_COLUMNS,
    DuckDBEventStore,
    ReadOnlyQueryError,
    events_to_table,
)
from tests.storage.generated_events import random_events

pytestmark = pytest.mark.integration

T0 = datetime(2024, 5, 1, 23, 30, tzinfo=UTC)


def event(event_id: str, **changes: object) -> TrackedEvent:
    base = TrackedEvent(
        tenant_id="acme",
        event_id=event_id,
        event_type=TrackedEventType.PAGE_VIEW,
        event_name="page_view",
        occurred_at=T0,
        received_at=T0 + timedelta(seconds=2),
        user_id="u1",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DuckDBEventStore]:
    with DuckDBEventStore(tmp_path / "events.duckdb") as s:
        yield s


def test_every_field_round_trips(store: DuckDBEventStore) -> None:
    plus_two = timezone(timedelta(hours=2))
    original = TrackedEvent(
        tenant_id="acme",
        event_id="e-1",
        event_type=TrackedEventType.CONVERSION,
        event_name="ticket_purchased",
        occurred_at=datetime(2024, 5, 2, 1, 15, 0, 123456, tzinfo=plus_two),  # 23:15 UTC
        received_at=datetime(2024, 5, 1, 23, 15, 1, tzinfo=UTC),
        source=EventSource.MOBILE,
        session_id="s-9",
        user_id="u-7",
        anonymous_id="anon-3",
        page_url="https://bilten.example/e/42",
        page_title="Concert \u00e9t\u00e9",
        referrer="https://search.example/",
        ticketed_event_id="concert-42",
        campaign_id="spring",
        order_id="o-1",
        revenue=Decimal("123456789012.123456"),
        currency="EUR",
        quantity=3,
        properties_json='{"seat": ["A", 1], "vip": true}',
        schema_id=17,
        enrichment=Enrichment("ab12", "DE", "Firefox", "128", "Linux", "desktop"),
    )
    store.append([original])
    (row,) = store.read("SELECT * FROM tracked_events").to_pylist()
    expected = {f.name: getattr(original, f.name) for f in dataclasses.fields(original)}
    expected.update(dataclasses.asdict(original.enrichment))
    del expected["enrichment"]
    expected["occurred_at"] = datetime(2024, 5, 1, 23, 15, 0, 123456, tzinfo=UTC)
    for name, value in expected.items():
        assert row[name] == value, name
    assert row["occurred_at"].utcoffset() == timedelta(0)
    assert row["occurred_on"].isoformat() == "2024-05-01"  # the UTC day, not the +02:00 one
    assert set(row) == {c.name for c in COLUMNS}
    assert set(row) >= DERIVED_COLUMNS


def test_actor_keys_are_dense_per_tenant_and_namespaced(tmp_path: Path) -> None:
    path = tmp_path / "events.duckdb"
    with DuckDBEventStore(path) as store:
        store.append(
            [
                event("1", user_id="same"),
                event("2", user_id="", anonymous_id="same"),  # not the user "same"
                event("3", user_id="", anonymous_id=""),  # nobody: no key
                event("4", user_id="same", anonymous_id="x"),  # user id wins
                event("5", tenant_id="globex", user_id="same"),
            ]
        )
    with DuckDBEventStore(path) as store:  # keys survive a reopen and keep counting
        store.append([event("6", user_id="new"), event("7", user_id="", anonymous_id="same")])
        rows = store.read(
            "SELECT tenant_id || '/' || event_id AS k, actor_key FROM tracked_events"
        ).to_pylist()
    keys = {row["k"]: row["actor_key"] for row in rows}
    assert keys == {
        "acme/1": 0,
        "acme/2": 1,
        "acme/3": None,
        "acme/4": 0,
        "globex/5": 0,
        "acme/6": 2,
        "acme/7": 1,
    }


def test_a_failed_batch_leaves_nothing_behind(store: DuckDBEventStore) -> None:
    store.append([event("ok", user_id="first")])
    poisoned = [event("a", user_id="second"), event("b", properties_json="{not json")]
    with pytest.raises(duckdb.ConversionException):
        store.append(poisoned)
    with pytest.raises(pa.ArrowInvalid):  # would need rounding: refused, not rounded
        store.append([event("c", revenue=Decimal("0.1234567"))])
    with pytest.raises(ValueError, match="timezone-aware"):
        store.append([event("d", occurred_at=datetime(2024, 5, 1))])
    assert store.count("acme") == 1
    # The rolled-back actor "second" did not burn a key: the next new actor gets 1.
    store.append([event("e", user_id="third")])
    rows = store.read("SELECT event_id, actor_key FROM tracked_events ORDER BY 1").to_pylist()
    assert rows == [{"event_id": "e", "actor_key": 1}, {"event_id": "ok", "actor_key": 0}]


def test_read_runs_only_one_select(store: DuckDBEventStore) -> None:
    store.append([event("1")])
    for sql in (
        "DELETE FROM tracked_events",
        "SELECT 1; DELETE FROM tracked_events",
        "CREATE TABLE x (a INTEGER)",
        "SET threads = 1",
    ):
        with pytest.raises(ReadOnlyQueryError):
            store.read(sql)
    with pytest.raises(duckdb.PermissionException):
        store.read("SELECT * FROM read_csv('/etc/hostname')")
    assert store.read("SELECT count(*) AS n FROM tracked_events WHERE tenant_id = ?", ["acme"])[
        "n"
    ].to_pylist() == [1]
    assert store.read("SELECT $x AS x", {"x": 5})["x"].to_pylist() == [5]


def test_event_ids_since_uses_received_at(store: DuckDBEventStore) -> None:
    store.append([event(f"e{i}", received_at=T0 + timedelta(minutes=i)) for i in range(10)])
    store.append([event("other", tenant_id="globex", received_at=T0 + timedelta(minutes=9))])
    since = T0 + timedelta(minutes=7)
    assert sorted(store.event_ids_since(since)) == [
        ("acme", "e7"),
        ("acme", "e8"),
        ("acme", "e9"),
        ("globex", "other"),
    ]
    with pytest.raises(ValueError):
        list(store.event_ids_since(datetime(2024, 1, 1)))


def test_append_table_casts_compatible_columns(store: DuckDBEventStore) -> None:
    table = events_to_table(random_events(3, 50))
    widened = table.set_column(
        table.schema.get_field_index("quantity"),
        "quantity",
        table.column("quantity").cast(pa.int64()),
    )
    store.append_table(widened)
    assert store.count("acme") + store.count("globex") == 50


def test_readers_see_whole_batches_while_appends_run(store: DuckDBEventStore) -> None:
    batches, size = 24, 250
    events = random_events(5, batches * size, tenants=("acme",))
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read_loop() -> None:
        try:
            while not done.is_set():
                seen.append(store.count("acme"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    readers = [threading.Thread(target=read_loop) for _ in range(3)]
    for reader in readers:
        reader.start()
    for b in range(batches):
        store.append(events[b * size : (b + 1) * size])
    done.set()
    for reader in readers:
        reader.join()
    assert not errors
    assert all(n % size == 0 for n in seen), "a reader saw half a batch"
    assert store.count("acme") == batches * size


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.duckdb"
    DuckDBEventStore(path).close()
    conn = duckdb.connect(str(path))
    conn.execute("UPDATE storage_schema SET version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="v99"):
        DuckDBEventStore(path)


def test_actor_key_answers_from_committed_actors_and_forgets_erased_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.duckdb"
    with DuckDBEventStore(path) as store:
        store.append([event("1", user_id="ann"), event("2", user_id="", anonymous_id="ann")])
        store.append([event("3", tenant_id="globex", user_id="ann")])
        assert store.actor_key("acme", "u:ann") == 0
        assert store.actor_key("acme", "a:ann") == 1
        assert store.actor_key("globex", "u:ann") == 0
        assert store.actor_key("acme", "u:bob") is None
        assert store.actor_key("nobody", "u:ann") is None
        store.erase_subject("acme", "ann")
        assert store.actor_key("acme", "u:ann") is None
        assert store.actor_key("globex", "u:ann") == 0  # another tenant's person
    with DuckDBEventStore(path) as store:  # the same answers from the reloaded map
        assert store.actor_key("acme", "u:ann") is None
        assert store.actor_key("globex", "u:ann") == 0


def test_reader_is_a_cursor_that_close_waits_for(tmp_path: Path) -> None:
    store = DuckDBEventStore(tmp_path / "events.duckdb")
    store.append([event("1")])
    inside = threading.Event()
    leave = threading.Event()
    closed = threading.Event()
    seen: list[object] = []

    def read_slowly() -> None:
        with store.reader() as cursor:
            inside.set()
            leave.wait(10)
            # Still usable: close() has not closed the connection under us.
            seen.append(cursor.execute("SELECT count(*) FROM tracked_events").fetchone())

    def close() -> None:
        store.close()
        closed.set()

    reader = threading.Thread(target=read_slowly)
    reader.start()
    assert inside.wait(10)
    closer = threading.Thread(target=close)
    closer.start()
    # close() waits while the reader's block is open...
    assert not closed.wait(0.3)
    leave.set()
    reader.join(10)
    # ...and finishes once it ended.
    assert closed.wait(10)
    closer.join(10)
    assert seen == [(1,)]
    with pytest.raises(RuntimeError, match="closed"):
        store.reader().__enter__()


def _owners(store: DuckDBEventStore) -> list[tuple[str, str, int]]:
    table = store.read("SELECT * FROM tenant_order_actors ORDER BY ALL")
    return [(r["tenant_id"], r["order_id"], r["actor_key"]) for r in table.to_pylist()]


def test_order_owners_are_kept_past_retention_and_erased_with_the_subject(
    tmp_path: Path,
) -> None:
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        old = T0 - timedelta(days=10)
        store.append(
            [
                event("1", user_id="ann", order_id="o-1"),
                event("2", user_id="ann", order_id="o-1"),  # the same pair once
                event("3", user_id="", anonymous_id="ann", order_id="o-2"),
                event("4", user_id="bob", anonymous_id="ann", order_id="o-3"),  # bob's key
                event("5", user_id="bob", order_id="o-4"),
                event("6", user_id="ann", order_id=""),  # no order: no row
                event("7", user_id="", order_id="o-5"),  # no actor: no row
                event("8", user_id="ann", order_id="o-old", occurred_at=old),
                event("9", tenant_id="globex", user_id="ann", order_id="o-1"),
            ]
        )
        ann, anon_ann, bob = 0, 1, 2
        assert _owners(store) == [
            ("acme", "o-1", ann),
            ("acme", "o-2", anon_ann),
            ("acme", "o-3", bob),
            ("acme", "o-4", bob),
            ("acme", "o-old", ann),
            ("globex", "o-1", 0),
        ]
        store.append([event("10", user_id="ann", order_id="o-1")])  # already known
        assert len(_owners(store)) == 6
        # Raw retention deletes rows, not the links: the rollups still hold the order.
        assert store.delete_occurred_before("acme", T0 - timedelta(days=1)) == 1
        assert ("acme", "o-old", ann) in _owners(store)
        # Her orders: by her keys (past retention too) and by raw rows naming her.
        assert store.subject_order_ids("acme", "ann") == ["o-1", "o-2", "o-3", "o-old"]
        store.erase_subject("acme", "ann")
        assert store.subject_order_ids("acme", "ann") == []
        assert _owners(store) == [("acme", "o-4", bob), ("globex", "o-1", 0)]


def test_an_older_file_gets_the_order_owners_from_its_raw_rows(tmp_path: Path) -> None:
    path = tmp_path / "events.duckdb"
    with DuckDBEventStore(path) as store:
        store.append([event("1", user_id="ann", order_id="o-1"), event("2", order_id="o-2")])
    conn = duckdb.connect(str(path))  # a file written before the table existed
    conn.execute("DROP TABLE tenant_order_actors")
    conn.close()
    with DuckDBEventStore(path) as store:
        assert _owners(store) == [("acme", "o-1", 0), ("acme", "o-2", 1)]
        assert store.subject_order_ids("acme", "ann") == ["o-1"]
    with DuckDBEventStore(path) as store:  # filled once, not again
        assert len(_owners(store)) == 2


def test_the_order_owner_insert_runs_only_when_a_row_qualifies(tmp_path: Path) -> None:
    # The commit skips the order-owner statement when no row has both an order id and an
    # actor; the table must end up exactly as if it always ran.
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        store.append([event("1", user_id="ann"), event("2", user_id="", order_id="o-1")])
        assert _owners(store) == []
        store.append([event("3", user_id="bob"), event("4", user_id="ann", order_id="o-2")])
        assert _owners(store) == [("acme", "o-2", 0)]
        store.append([event("5", user_id="ann", order_id="o-2")])  # known pair
        assert _owners(store) == [("acme", "o-2", 0)]
