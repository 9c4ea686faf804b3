"""The embedded event store: tracked events in one DuckDB file, one column per field.

Layout (table `tracked_events`, see `COLUMNS`):
- one column per `TrackedEvent` / `Enrichment` field, under the field's own name; absent
  strings stay `''` exactly as in the model, so a row maps back to the dataclass 1:1;
- times are `TIMESTAMPTZ` (an instant, UTC). Every connection runs with
  `TimeZone = 'UTC'`, so Arrow results carry `tz=UTC` and aware `datetime` parameters
  compare as instants whatever the host's zone. Queries must not bucket with
  `date_trunc`/`time_bucket` on these columns: on `TIMESTAMPTZ` those go through ICU
  calendars and cost 20-50x more than the two derived columns below;
- `revenue` is `DECIMAL(18,6)`; a value needing more digits fails the whole append
  instead of being rounded. `properties_json` is `JSON`: DuckDB checks the text on
  insert, so one malformed event fails its batch (ingestion validates it first);
- derived for queries: `occurred_on DATE` (the UTC calendar day of `occurred_at`: day,
  ISO week and month buckets come from it with plain date arithmetic) and
  `actor_key INTEGER`, a dense per-tenant number for "who did it" (see below).

Actor keys. Active users are counted as distinct actors, an actor being `user_id` when
set, else `anonymous_id` (namespaced `u:` / `a:` so the two id spaces never collide);
events with neither have a NULL key and count as events but not as users. Each new
actor of a tenant gets the next integer from 0 in `tenant_actors`, in the same
transaction as its events. Dense small integers let exact distinct counts use DuckDB's
bitmap aggregate (`bitstring_agg` + `bit_count`): ~10x faster than hashing strings and
still exact (`approx_count_distinct` is never used). The store keeps the actor → key
map in memory (roughly 200 B per actor; loaded when the store opens) so an append
costs no lookup query.

Durability (verified with strace on DuckDB 2.0.1, Linux): `COMMIT` writes the WAL and
`fdatasync`s it before returning; a large batch is written to the database file first
(also `fdatasync`ed) and the WAL only records where it is. So when `append` returns, the
rows survive a process kill (tests/storage/test_durability.py SIGKILLs a writer). DuckDB
does not fsync the directory when it re-creates the WAL after a checkpoint deleted it;
for power loss `append` fsyncs the directory after each commit. Checkpoints
run automatically when the WAL passes `checkpoint_threshold` (16 MiB), inside the commit
that crossed it, and on `close()`. `fsync_mode` is set explicitly (FULL on macOS, where
plain fsync does not flush the disk cache).

Stream offsets (table `stream_offsets`, one row per Kafka topic partition): the stream
processor passes the partitions' next offsets to `append_table`, which writes them in the
same transaction as the rows, after checking that the stored offsets are still the ones
the caller last read (else `StaleStreamOffsetError` and nothing is written). So rows and
the position they were read up to commit together, and a consumer that lost its
partition in a rebalance cannot write a batch the new owner also writes
(services/streaming/processor.py). Other callers never pass offsets.

Order owners (table `tenant_order_actors`: tenant_id, order_id, actor_key): which actor
each non-empty `order_id` was seen with, written in the same transaction as the rows (one
INSERT ... SELECT DISTINCT over the batch). Erasure needs it: the rollup tiers keep order
ids for exact distinct-order counts long after raw retention deleted the rows, so the
subject's order ids must be found without raw rows (`subject_order_ids`). So retention
never deletes from it; `erase_subject` deletes the subject's rows. An older file gets the
table at open, filled once from the raw rows it still holds.

Concurrency: DuckDB lets one process open the file. All appends go through one writer
cursor under a lock (one transaction each); every read gets its own cursor of the same
database, so reads run in parallel with appends and see only committed batches (MVCC).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from operator import attrgetter
from pathlib import Path
from types import TracebackType
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from services.events.model import TrackedEvent

TABLE = "tracked_events"
ACTORS_TABLE = "tenant_actors"
STREAM_OFFSETS_TABLE = "stream_offsets"
ORDER_ACTORS_TABLE = "tenant_order_actors"
SCHEMA_VERSION = 1

# Largest key a tenant's actors may take: the column is 32-bit to keep scans and
# bitmaps small; two billion distinct people per organizer is far beyond need.
MAX_ACTOR_KEY = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    sql_type: str
    arrow_type: pa.DataType


_S = pa.string()

# The single source of the table layout: the DDL and the Arrow schema come from it.
# Order: model fields, then enrichment fields, then the derived columns.
COLUMNS: tuple[Column, ...] = (
    Column("tenant_id", "VARCHAR NOT NULL", _S),
    Column("event_id", "VARCHAR NOT NULL", _S),
    Column("event_type", "VARCHAR NOT NULL", _S),
    Column("event_name", "VARCHAR NOT NULL", _S),
    Column("occurred_at", "TIMESTAMPTZ NOT NULL", pa.timestamp("us", tz="UTC")),
    Column("received_at", "TIMESTAMPTZ NOT NULL", pa.timestamp("us", tz="UTC")),
    Column("source", "VARCHAR NOT NULL", _S),
    Column("session_id", "VARCHAR NOT NULL", _S),
    Column("user_id", "VARCHAR NOT NULL", _S),
    Column("anonymous_id", "VARCHAR NOT NULL", _S),
    Column("page_url", "VARCHAR NOT NULL", _S),
    Column("page_title", "VARCHAR NOT NULL", _S),
    Column("referrer", "VARCHAR NOT NULL", _S),
    Column("ticketed_event_id", "VARCHAR NOT NULL", _S),
    Column("campaign_id", "VARCHAR NOT NULL", _S),
    Column("order_id", "VARCHAR NOT NULL", _S),
    Column("revenue", "DECIMAL(18,6) NOT NULL", pa.decimal128(18, 6)),
    Column("currency", "VARCHAR NOT NULL", _S),
    Column("quantity", "INTEGER NOT NULL", pa.int32()),
    Column("properties_json", "JSON NOT NULL", _S),
    Column("schema_id", "INTEGER NOT NULL", pa.int32()),
    Column("ip_hash", "VARCHAR NOT NULL", _S),
    Column("country_code", "VARCHAR NOT NULL", _S),
    Column("browser_family", "VARCHAR NOT NULL", _S),
    Column("browser_version", "VARCHAR NOT NULL", _S),
    Column("os_family", "VARCHAR NOT NULL", _S),
    Column("device_type", "VARCHAR NOT NULL", _S),
    Column("occurred_on", "DATE NOT NULL", pa.date32()),
    Column("actor_key", "INTEGER", pa.int32()),
)
DERIVED_COLUMNS = frozenset({"occurred_on", "actor_key"})
_ENRICHMENT_FIELDS = (
    "ip_hash",
    "country_code",
    "browser_family",
    "browser_version",
    "os_family",
    "device_type",
)

# What callers hand to `append_table`: every stored column but the derived ones.
EVENT_ARROW_SCHEMA = pa.schema(
    [
        pa.field(c.name, c.arrow_type, nullable=False)
        for c in COLUMNS
        if c.name not in DERIVED_COLUMNS
    ]
)


class EventStore(Protocol):
    """Where accepted tracked events live and analytics read them from.

    `read` takes DuckDB-dialect SQL over the table `tracked_events` (columns above);
    it only runs a single SELECT.
    """

    def append(self, events: Sequence[TrackedEvent]) -> None:
        """Stores the batch atomically; durable when this returns."""
        ...

    def read(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> pa.Table:
        """Runs one SELECT (`?` with a sequence, `$name` with a mapping) on a snapshot
        of committed data."""
        ...

    def event_ids_since(self, since: datetime) -> Iterator[tuple[str, str]]:
        """(tenant_id, event_id) of events received at or after `since`."""
        ...

    def count(self, tenant_id: str) -> int: ...

    def close(self) -> None: ...


class ReadOnlyQueryError(ValueError):
    """`read` was given something other than exactly one SELECT statement."""


@dataclass(frozen=True, slots=True)
class StreamOffset:
    """A Kafka partition's position to store with a batch (see the module docstring).

    `expected` is the stored next offset the writer last read (None: no row yet);
    `next_offset` is the first offset of the partition not in the store after the batch.
    """

    topic: str
    partition: int
    expected: int | None
    next_offset: int


class StaleStreamOffsetError(RuntimeError):
    """A partition's stored offset is not the one the writer expected: another
    consumer wrote it. The batch was rolled back."""


# The subject's actor keys and raw-row order ids, over the named parameters $tenant,
# $subject, $u (`u:<subject>`) and $a (`a:<subject>`).
_SUBJECT_KEYS = (
    f"SELECT actor_key FROM {ACTORS_TABLE} WHERE tenant_id = $tenant AND actor_id IN ($u, $a)"
)
_SUBJECT_RAW_ORDERS = (
    f"SELECT order_id FROM {TABLE} WHERE tenant_id = $tenant"
    " AND (user_id = $subject OR anonymous_id = $subject) AND order_id <> ''"
)


def _require_aware(name: str, values: Sequence[datetime]) -> None:
    # pyarrow would read a naive datetime as UTC without a word; the model promises
    # aware UTC times, so a naive one is a caller bug worth failing loudly on.
    for value in values:
        if value.utcoffset() is None:
            raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")


def events_to_table(events: Sequence[TrackedEvent]) -> pa.Table:
    """The batch as an Arrow table of `EVENT_ARROW_SCHEMA`, built column by column.

    One C-level pass (`attrgetter` over the list) per field instead of a Python dict per
    row: a few ms for 1,000 events.
    """
    columns: dict[str, pa.Array] = {}
    enrichments = list(map(attrgetter("enrichment"), events))
    for field in EVENT_ARROW_SCHEMA:
        source = enrichments if field.name in _ENRICHMENT_FIELDS else events
        values = list(map(attrgetter(field.name), source))
        if field.name in ("occurred_at", "received_at"):
            _require_aware(field.name, values)
        columns[field.name] = pa.array(values, field.type)
    return pa.Table.from_pydict(columns, schema=EVENT_ARROW_SCHEMA)


def _actor_ids(table: pa.Table) -> pa.Array:
    """`u:<user_id>`, else `a:<anonymous_id>`, else null; vectorised."""
    user = table.column("user_id").combine_chunks()
    anonymous = table.column("anonymous_id").combine_chunks()
    null = pa.scalar(None, pa.string())
    by_anonymous = pc.if_else(
        pc.not_equal(anonymous, ""), pc.binary_join_element_wise("a:", anonymous, ""), null
    )
    return pc.if_else(
        pc.not_equal(user, ""), pc.binary_join_element_wise("u:", user, ""), by_anonymous
    )


def _has_order_actors(rows: pa.Table) -> bool:
    """Whether any row has an order id and an actor key, i.e. whether the order-owner
    insert of `DuckDBEventStore._commit` has anything to add (same predicate as its
    WHERE clause, evaluated in Arrow)."""
    qualifying = pc.and_(
        pc.not_equal(rows.column("order_id"), ""), pc.is_valid(rows.column("actor_key"))
    )
    return bool(pc.any(qualifying).as_py())


class DuckDBEventStore:
    """`EventStore` on one DuckDB file; thread-safe; one instance per process and file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = duckdb.connect(str(self.path))
        # GLOBAL so every cursor (a duplicate connection) inherits it.
        self._conn.execute("SET GLOBAL TimeZone = 'UTC'")
        fsync_mode = "FULL" if sys.platform == "darwin" else "STANDARD"
        self._conn.execute(f"SET GLOBAL fsync_mode = '{fsync_mode}'")
        # A server writes logs, not terminal progress bars (DuckDB draws one on stderr
        # for any query over 2 s, e.g. loading a large actor map). A connection-local
        # option, which every cursor copies from this connection.
        self._conn.execute("SET enable_progress_bar = false")
        self._create_schema()
        # Outside the versioned schema: a plain addition that older files also get.
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {STREAM_OFFSETS_TABLE} (topic VARCHAR NOT NULL,"
            " kafka_partition INTEGER NOT NULL, next_offset BIGINT NOT NULL,"
            " PRIMARY KEY (topic, kafka_partition))"
        )
        self._create_order_actors()
        # Reads run caller-supplied SQL: no file, network or extension access from it.
        self._conn.execute("SET GLOBAL enable_external_access = false")
        self._conn.execute("SET GLOBAL lock_configuration = true")
        self._write_lock = threading.Lock()
        self._cursor_lock = threading.Lock()
        # Reader cursors in use: closing the connection while one still runs in another
        # thread crashes DuckDB (SIGSEGV), so close() waits for them.
        self._readers_done = threading.Condition(self._cursor_lock)
        self._active_readers = 0
        self._writer = self._conn.cursor()
        self._closed = False
        self._actor_keys: dict[str, dict[str, int]] = {}
        self._next_actor_key: dict[str, int] = {}
        self._load_actor_keys()
        self._fsync_directory()  # the new file's own directory entry

    # --- lifecycle -------------------------------------------------------------------

    def _create_schema(self) -> None:
        columns = ",\n  ".join(f"{c.name} {c.sql_type}" for c in COLUMNS)
        self._conn.execute("BEGIN")
        self._conn.execute("CREATE TABLE IF NOT EXISTS storage_schema (version INTEGER NOT NULL)")
        row = self._conn.execute("SELECT max(version) FROM storage_schema").fetchone()
        version = row[0] if row else None
        if version is None:
            self._conn.execute(f"CREATE TABLE {TABLE} (\n  {columns}\n)")
            self._conn.execute(
                f"CREATE TABLE {ACTORS_TABLE} (tenant_id VARCHAR NOT NULL, "
                "actor_id VARCHAR NOT NULL, actor_key INTEGER NOT NULL)"
            )
            self._conn.execute("INSERT INTO storage_schema VALUES (?)", [SCHEMA_VERSION])
        elif version != SCHEMA_VERSION:
            self._conn.execute("ROLLBACK")
            raise RuntimeError(
                f"{self.path} has event store schema v{version}; this build reads v{SCHEMA_VERSION}"
            )
        self._conn.execute("COMMIT")

    def _create_order_actors(self) -> None:
        """The order -> actor table (module docstring), outside the versioned schema like
        `stream_offsets`. A file from before it existed gets it filled from its raw rows
        in the same transaction, so no order id still in raw is missing from it (orders
        already past raw retention were gone before this table existed)."""
        self._conn.execute("BEGIN")
        try:
            found = self._conn.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [ORDER_ACTORS_TABLE]
            ).fetchone()
            if not (found and found[0]):
                # The primary key lets each commit add its batch's pairs with ON CONFLICT
                # DO NOTHING instead of an anti-join against the whole table.
                self._conn.execute(
                    f"CREATE TABLE {ORDER_ACTORS_TABLE} (tenant_id VARCHAR NOT NULL,"
                    " order_id VARCHAR NOT NULL, actor_key INTEGER NOT NULL,"
                    " PRIMARY KEY (tenant_id, order_id, actor_key))"
                )
                self._conn.execute(
                    f"INSERT INTO {ORDER_ACTORS_TABLE} SELECT DISTINCT tenant_id, order_id,"
                    f" actor_key FROM {TABLE} WHERE order_id <> '' AND actor_key IS NOT NULL"
                )
            self._conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                self._conn.execute("ROLLBACK")
            raise

    def _load_actor_keys(self) -> None:
        # One row per tenant with its actors as two lists: building each tenant's dict
        # from two Python lists runs at C speed (~1.5 s for 2 M actors).
        relation = self._conn.sql(
            f"SELECT tenant_id, list(actor_id) AS ids, list(actor_key) AS keys,"
            f" max(actor_key) AS top FROM {ACTORS_TABLE} GROUP BY tenant_id"
        )
        for batch in relation.to_arrow_reader():
            for row in range(batch.num_rows):
                tenant_id = batch.column("tenant_id")[row].as_py()
                ids = batch.column("ids")[row].values.to_pylist()
                keys = batch.column("keys")[row].values.to_pylist()
                self._actor_keys[tenant_id] = dict(zip(ids, keys, strict=True))
                self._next_actor_key[tenant_id] = batch.column("top")[row].as_py() + 1

    def close(self) -> None:
        """Checkpoints (DuckDB does on close) and releases the file; idempotent."""
        with self._write_lock:
            with self._cursor_lock:
                if self._closed:
                    return
                self._closed = True
                self._readers_done.wait_for(lambda: self._active_readers == 0, timeout=60)
            self._writer.close()
            self._conn.close()

    def __enter__(self) -> DuckDBEventStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- writes ----------------------------------------------------------------------

    def append(self, events: Sequence[TrackedEvent]) -> None:
        """Stores the batch in one transaction; when this returns the rows are durable."""
        if events:
            self.append_table(events_to_table(events))

    def append_table(self, table: pa.Table, stream_offsets: Sequence[StreamOffset] = ()) -> None:
        """Columnar append of rows shaped like `EVENT_ARROW_SCHEMA` (bulk loads, tests).

        Columns are matched by name and cast to the stored types (a lossy cast raises).
        `stream_offsets` commit in the same transaction (an empty table with offsets
        only moves the offsets); `StaleStreamOffsetError` when one was not `expected`.
        """
        if table.num_rows == 0 and not stream_offsets:
            return
        table = table.select(EVENT_ARROW_SCHEMA.names).cast(EVENT_ARROW_SCHEMA)
        with self._write_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            actor_keys, new_actors = self._assign_actor_keys(table)
            rows = table.append_column(
                "occurred_on", pc.cast(table.column("occurred_at"), pa.date32())
            ).append_column("actor_key", actor_keys)
            self._commit(rows, new_actors, stream_offsets)
            # Only now that the keys are durable may later batches reuse them.
            for tenant_id, actor_id, key in zip(
                new_actors.column(0).to_pylist(),
                new_actors.column(1).to_pylist(),
                new_actors.column(2).to_pylist(),
                strict=True,
            ):
                self._actor_keys.setdefault(tenant_id, {})[actor_id] = key
                self._next_actor_key[tenant_id] = key + 1
            # Every checkpoint deletes the WAL and the next commit creates it again;
            # DuckDB fsyncs its content but not the directory entry, so a power cut
            # could lose a new WAL with acknowledged batches in it. Syncing a directory
            # with nothing dirty costs microseconds, so it is done after every commit
            # rather than guessed from inode numbers (which the filesystem reuses).
            self._fsync_directory()

    def erase_subject(self, tenant_id: str, subject_id: str) -> tuple[int, int]:
        """Deletes the tenant's rows whose `user_id` or `anonymous_id` is `subject_id`
        and unlinks the subject from its actor key; returns (rows deleted, actor ids
        unlinked). For erasure (services/compliance/erasure.py).

        The actor row keeps its key (keys stay unique and dense) but its id becomes an
        opaque `erased:` token, so the table no longer names the subject; the key also
        leaves the in-memory map, so later events of the same id get a fresh key. The
        subject's `tenant_order_actors` rows go too (those of its actor keys and of the
        order ids on its raw rows), so call `subject_order_ids` before this when the
        rollups' order ids are to be replaced.
        """
        actor_ids = [f"u:{subject_id}", f"a:{subject_id}"]
        with self._write_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            cursor = self._writer
            cursor.execute("BEGIN")
            try:
                row = cursor.execute(
                    f"SELECT count(*) FROM {TABLE} WHERE tenant_id = ?"
                    " AND (user_id = ? OR anonymous_id = ?)",
                    [tenant_id, subject_id, subject_id],
                ).fetchone()
                deleted = int(row[0]) if row else 0
                # Before the raw rows and the actor ids it is found by are gone.
                cursor.execute(
                    f"DELETE FROM {ORDER_ACTORS_TABLE} WHERE tenant_id = $tenant AND"
                    f" (actor_key IN ({_SUBJECT_KEYS}) OR order_id IN ({_SUBJECT_RAW_ORDERS}))",
                    {
                        "tenant": tenant_id,
                        "subject": subject_id,
                        "u": actor_ids[0],
                        "a": actor_ids[1],
                    },
                )
                cursor.execute(
                    f"DELETE FROM {TABLE} WHERE tenant_id = ?"
                    " AND (user_id = ? OR anonymous_id = ?)",
                    [tenant_id, subject_id, subject_id],
                )
                unlinked = 0
                for actor_id in actor_ids:
                    found = cursor.execute(
                        f"SELECT count(*) FROM {ACTORS_TABLE} WHERE tenant_id = ? AND actor_id = ?",
                        [tenant_id, actor_id],
                    ).fetchone()
                    if found and found[0]:
                        unlinked += int(found[0])
                        cursor.execute(
                            f"UPDATE {ACTORS_TABLE} SET actor_id = 'erased:' || gen_random_uuid()"
                            " WHERE tenant_id = ? AND actor_id = ?",
                            [tenant_id, actor_id],
                        )
                cursor.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")
                raise
            for actor_id in actor_ids:
                self._actor_keys.get(tenant_id, {}).pop(actor_id, None)
            self._fsync_directory()
        return deleted, unlinked

    def subject_order_ids(self, tenant_id: str, subject_id: str) -> list[str]:
        """The distinct order ids of the subject (sorted): those `tenant_order_actors`
        links to its actor keys, kept past raw retention, plus those on raw rows naming
        it as user or anonymous id (an event of both ids is keyed by the user id)."""
        table = self.read(
            f"SELECT order_id FROM {ORDER_ACTORS_TABLE} WHERE tenant_id = $tenant"
            f" AND actor_key IN ({_SUBJECT_KEYS})"
            f" UNION SELECT order_id FROM ({_SUBJECT_RAW_ORDERS}) ORDER BY order_id",
            {
                "tenant": tenant_id,
                "subject": subject_id,
                "u": f"u:{subject_id}",
                "a": f"a:{subject_id}",
            },
        )
        return [str(value) for value in table.column(0).to_pylist()]

    def delete_occurred_before(self, tenant_id: str, cutoff: datetime) -> int:
        """Deletes the tenant's rows whose `occurred_at` is before `cutoff` (raw-tier
        retention); returns how many. Actor keys stay: other rows may use them."""
        _require_aware("cutoff", [cutoff])
        with self._write_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            cursor = self._writer
            row = cursor.execute(
                f"SELECT count(*) FROM {TABLE} WHERE tenant_id = ? AND occurred_at < ?",
                [tenant_id, cutoff],
            ).fetchone()
            count = int(row[0]) if row else 0
            if count:
                cursor.execute(
                    f"DELETE FROM {TABLE} WHERE tenant_id = ? AND occurred_at < ?",
                    [tenant_id, cutoff],
                )
                self._fsync_directory()
        return count

    def _assign_actor_keys(self, table: pa.Table) -> tuple[pa.Array, pa.Table]:
        """Per-row actor keys, and the (tenant_id, actor_id, actor_key) rows not yet known.

        Python touches each distinct actor of the batch once, never each row.
        """
        actors = _actor_ids(table)
        tenant_column = table.column("tenant_id").combine_chunks()
        tenants = pc.unique(tenant_column).to_pylist()
        keys = np.full(table.num_rows, -1, dtype=np.int64)
        new_tenants: list[str] = []
        new_ids: list[str] = []
        new_keys: list[int] = []
        for tenant_id in tenants:
            if len(tenants) == 1:
                rows = None
                tenant_actors = actors
            else:
                mask = pc.equal(tenant_column, tenant_id)
                rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
                tenant_actors = actors.take(pa.array(rows))
            encoded = pc.dictionary_encode(tenant_actors)
            known = self._actor_keys.get(tenant_id, {})
            next_key = self._next_actor_key.get(tenant_id, 0)
            distinct = encoded.dictionary.to_pylist()
            mapping = np.empty(len(distinct), dtype=np.int64)
            for position, actor_id in enumerate(distinct):
                key = known.get(actor_id)
                if key is None:
                    key = next_key
                    next_key += 1
                    new_tenants.append(tenant_id)
                    new_ids.append(actor_id)
                    new_keys.append(key)
                mapping[position] = key
            if next_key - 1 > MAX_ACTOR_KEY:
                raise OverflowError(f"tenant {tenant_id!r} has more actors than actor_key holds")
            per_row = pc.fill_null(pc.take(pa.array(mapping), encoded.indices), -1).to_numpy()
            if rows is None:
                keys = per_row.astype(np.int64, copy=True)
            else:
                keys[rows] = per_row
        actor_keys = pa.array(keys.astype(np.int32), type=pa.int32(), mask=keys < 0)
        new_actors = pa.table(
            {
                "tenant_id": pa.array(new_tenants, pa.string()),
                "actor_id": pa.array(new_ids, pa.string()),
                "actor_key": pa.array(new_keys, pa.int32()),
            }
        )
        return actor_keys, new_actors

    def _commit(
        self, rows: pa.Table, new_actors: pa.Table, stream_offsets: Sequence[StreamOffset] = ()
    ) -> None:
        cursor = self._writer
        cursor.execute("BEGIN")
        try:
            for offset in stream_offsets:
                self._move_stream_offset(cursor, offset)
            cursor.register("_bilten_batch", rows)
            cursor.execute(f"INSERT INTO {TABLE} BY NAME SELECT * FROM _bilten_batch")
            if new_actors.num_rows:
                cursor.register("_bilten_actors", new_actors)
                cursor.execute(f"INSERT INTO {ACTORS_TABLE} BY NAME SELECT * FROM _bilten_actors")
            # Set-based, in the commit of the rows: an acknowledged order is always
            # findable by its actor when an erasure asks (module docstring). Skipped when
            # no row qualifies (most batches carry no order id): the statement costs
            # ~3 ms of CPU even when it inserts nothing.
            if _has_order_actors(rows):
                cursor.execute(
                    f"INSERT INTO {ORDER_ACTORS_TABLE} SELECT DISTINCT tenant_id, order_id,"
                    " actor_key FROM _bilten_batch WHERE order_id <> ''"
                    " AND actor_key IS NOT NULL ON CONFLICT DO NOTHING"
                )
            cursor.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                cursor.execute("ROLLBACK")
            raise
        finally:
            for view in ("_bilten_batch", "_bilten_actors"):
                with contextlib.suppress(duckdb.Error):
                    cursor.unregister(view)

    def _move_stream_offset(self, cursor: duckdb.DuckDBPyConnection, offset: StreamOffset) -> None:
        row = cursor.execute(
            f"SELECT next_offset FROM {STREAM_OFFSETS_TABLE}"
            " WHERE topic = ? AND kafka_partition = ?",
            [offset.topic, offset.partition],
        ).fetchone()
        stored = None if row is None else int(row[0])
        if stored != offset.expected:
            raise StaleStreamOffsetError(
                f"{offset.topic}[{offset.partition}] is at {stored} in the store, "
                f"the writer expected {offset.expected}"
            )
        cursor.execute(
            f"INSERT OR REPLACE INTO {STREAM_OFFSETS_TABLE} VALUES (?, ?, ?)",
            [offset.topic, offset.partition, offset.next_offset],
        )

    def stream_offsets(self, topic: str) -> dict[int, int]:
        """{partition: next offset not yet stored} of a topic's partitions with rows."""
        table = self.read(
            f"SELECT kafka_partition, next_offset FROM {STREAM_OFFSETS_TABLE} WHERE topic = ?",
            [topic],
        )
        return dict(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))

    def _fsync_directory(self) -> None:
        descriptor = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    # --- reads -----------------------------------------------------------------------

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        with self._cursor_lock:
            if self._closed:
                raise RuntimeError("event store is closed")
            self._active_readers += 1
            return self._conn.cursor()

    def _release(self, cursor: duckdb.DuckDBPyConnection) -> None:
        cursor.close()
        with self._cursor_lock:
            self._active_readers -= 1
            self._readers_done.notify_all()

    @contextlib.contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read cursor of its own, for callers that need more than `read` (e.g. to
        `interrupt()` a query at a deadline from another thread).

        It counts as an active reader until the block ends, so `close()` waits for it:
        closing the connection while one of its cursors still runs in another thread
        crashes DuckDB. The caller must only run SELECTs on it (`read`'s check does not
        apply here) and must not keep it past the block.
        """
        cursor = self._cursor()
        try:
            yield cursor
        finally:
            self._release(cursor)

    def actor_key(self, tenant_id: str, actor_id: str) -> int | None:
        """The dense key of a committed actor (`u:<user_id>` / `a:<anonymous_id>`), None
        when the tenant has none such (never seen, or erased).

        From the in-memory map, so no scan of the actor table. A plain dict lookup is
        atomic under the GIL, and the writer only adds keys after its commit, so a key
        seen here always belongs to committed rows.
        """
        key = self._actor_keys.get(tenant_id, {}).get(actor_id)
        return None if key is None else int(key)

    def read(self, sql: str, params: Sequence[object] | Mapping[str, object] = ()) -> pa.Table:
        """Runs one SELECT on its own cursor and returns all rows.

        Parameters: a sequence for `?` placeholders, a mapping for `$name` ones.
        """
        cursor = self._cursor()
        try:
            statements = cursor.extract_statements(sql)
            if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
                raise ReadOnlyQueryError("read() runs exactly one SELECT statement")
            bound = dict(params) if isinstance(params, Mapping) else list(params)
            relation = cursor.sql(sql, params=bound)
            return relation.to_arrow_table()
        finally:
            self._release(cursor)

    def event_ids_since(self, since: datetime) -> Iterator[tuple[str, str]]:
        """Streams (tenant_id, event_id) received at or after `since`, in no order.

        For warming the dedup window after a restart; memory stays at one Arrow batch.
        """
        _require_aware("since", [since])
        cursor = self._cursor()
        try:
            relation = cursor.sql(
                f"SELECT tenant_id, event_id FROM {TABLE} WHERE received_at >= ?",
                params=[since],
            )
            for batch in relation.to_arrow_reader():
                yield from zip(
                    batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
                )
        finally:
            self._release(cursor)

    def count(self, tenant_id: str) -> int:
        table = self.read(f"SELECT count(*) AS n FROM {TABLE} WHERE tenant_id = ?", [tenant_id])
        return int(table.column(0)[0].as_py())
