"""Rollups per retention tier, kept current as events land, and the metrics read from them.

Tiers (the product's retention promise): raw events 7 days, minute rollups 30 days,
hour rollups 1 year, day rollups 5 years (`RetentionPolicy`). Raw events stay in the
event store; the three rollup tiers live in their own DuckDB file (`rollups.duckdb`,
`RollupStore`), one table per tier with the same layout:

    tenant_id, bucket_us (bucket start, µs since the epoch), bucket_day (its UTC date),
    event_name, event_type, ticketed_event_id, country_code, currency   -- dimensions
    events, revenue, quantity, orders_without_id                        -- additive
    order_ids VARCHAR[], actor_keys INTEGER[]                           -- exact sets

Which metrics roll up exactly, and why:
- counts, revenue, tickets: sums per group add up across buckets and groups.
- distinct users: a bucket's set of `actor_key`s (the store's dense per-tenant actor
  number) is kept per group, so any union of buckets and groups is counted exactly
  (`count(DISTINCT unnest(actor_keys))`), never estimated. Sets are per tenant (keys
  are), so the all-tenants scope counts per tenant and adds, as the raw metrics do.
- orders: distinct non-empty `order_id`s as a set per group (an order paid in two
  minutes is one order in their hour), plus a count of conversions without an id.
So every metric of `services.query.metrics` that the aggregation service serves
(active users with DAU/WAU/MAU, conversions and the overall rate, revenue, geography,
event counts) is identical from a tier and from raw events over a range aligned to the
tier's buckets (tests/aggregation/test_rollups.py proves it per tier and granularity).
Filters work because every filterable field (event name and type, ticketed event) is a
dimension.

Maintenance (`RollupMaintainer`): it implements the live event observer protocol
(`services.live.observers.EventObserver`): for each committed batch it notes which
(tenant, minute) buckets changed, nothing more, so ingestion pays a dict update per
event. `flush()` (a background job every few seconds, and before any rollup read: the
read barrier that makes an acknowledged event visible) recomputes exactly those minutes
from the raw events, then their hours from the minutes and their days from the hours,
replacing the old rows in one transaction. Recomputing instead of adding deltas makes
a flush idempotent: running it twice, or after a crash, cannot count an event twice.

Recovery: the store records a clean close. After a crash (dirty minutes lost with the
process) or on first open of an existing event store, `rebuild` recomputes every minute
raw still holds from `since` on (events are accepted at most `raw_days` old, so the
raw window covers every minute a lost flush could have touched).

Reading older data (`plan`): a range (and, for active users, its 30-day trailing
window) that starts inside the raw window reads raw events, exactly as before. One that
reaches further back reads the whole range from a tier, the coarsest tier the range is
aligned to, else the finest that still holds the range start; a range edge inside a
tier bucket is widened to the bucket (documented in docs/live.md: older data has the
resolution of its tier). A granularity finer than the tier that holds the data is
refused (`RollupRangeError`): minute buckets of last year no longer exist.

Erasure (`RollupMaintainer.erase_orders`, called by services/compliance/erasure.py and
erasure_hosts.py): the tiers keep no user or anonymous id, and `actor_keys` hold dense
keys that the event store's erasure unlinks from the subject's id. Order ids do identify
a purchase (and, through ticketing, a person), so each of the subject's order ids is
replaced, in every tier's `order_ids`, by one opaque `erased:<random uuid>` token: the
same token in every tier and bucket, distinct per order id. So every served metric
(distinct orders across any union of buckets included) is unchanged, and nothing maps the
token back to the order (`erasure_tokens`).

Per-tenant retention (`TenantRetention`): compliance stores a tenant's own policy; the
reader plans with it (the strictest of all policies for an all-tenant read), `prune`
drops each tenant's buckets by its own policy, and `rebuild` leaves alone the days a
tenant's shorter raw window no longer holds.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from services.events.model import TrackedEvent, TrackedEventType
from services.query.metrics import (
    GROUPABLE,
    NO_FILTERS,
    ActiveUsers,
    ActiveUsersRow,
    ConversionRow,
    CurrencyAmount,
    EventCountRow,
    GeoRow,
    Granularity,
    GroupedEventCount,
    MetricFilters,
    RevenueRow,
    Scope,
    TimeRange,
    WhereBuilder,
    bucket_starts,
    check_groupable,
)
from services.storage.event_store import TABLE, EventStore

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = 1_000_000
_MINUTE_US = 60 * _US


class Tier(enum.Enum):
    """A rollup tier; the value is the bucket length in microseconds."""

    MINUTE = 60 * _US
    HOUR = 3600 * _US
    DAY = 86_400 * _US

    @property
    def table(self) -> str:
        return f"rollup_{self.name.lower()}"

    @property
    def step(self) -> timedelta:
        return timedelta(microseconds=self.value)


TIERS = (Tier.MINUTE, Tier.HOUR, Tier.DAY)  # finest first

# Requested granularity -> the finest tier bucket it can be built from.
_GRANULARITY_US = {
    Granularity.MINUTE: Tier.MINUTE.value,
    Granularity.HOUR: Tier.HOUR.value,
    Granularity.DAY: Tier.DAY.value,
    Granularity.WEEK: Tier.DAY.value,
    Granularity.MONTH: Tier.DAY.value,
}
TRAILING_DAYS = 30  # the longest trailing window (MAU) of `active_users`


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long each tier keeps data (the product promise: 7 d, 30 d, 1 y, 5 y)."""

    raw_days: int = 7
    minute_days: int = 30
    hour_days: int = 365
    day_days: int = 5 * 365 + 1

    def __post_init__(self) -> None:
        if not 0 < self.raw_days <= self.minute_days <= self.hour_days <= self.day_days:
            raise ValueError("retention must grow with the tier: raw <= minute <= hour <= day")

    def keeps(self, tier: Tier) -> timedelta:
        days = {Tier.MINUTE: self.minute_days, Tier.HOUR: self.hour_days, Tier.DAY: self.day_days}
        return timedelta(days=days[tier])


class RollupRangeError(ValueError):
    """The range cannot be answered at the requested granularity from the kept tiers."""


class RollupDimensionError(RollupRangeError):
    """The range must be read from a tier, and the tiers do not keep a dimension asked
    for (e.g. `source`): raw events, which do, no longer cover the range."""


def strictest(policies: Iterable[RetentionPolicy]) -> RetentionPolicy:
    """The tier-wise shortest retention: what every one of the policies still holds.
    (Each is ordered raw <= minute <= hour <= day, so the minimums are too.)"""
    chosen = list(policies)
    return RetentionPolicy(
        raw_days=min(p.raw_days for p in chosen),
        minute_days=min(p.minute_days for p in chosen),
        hour_days=min(p.hour_days for p in chosen),
        day_days=min(p.day_days for p in chosen),
    )


def _no_own_policy(tenant_id: str) -> RetentionPolicy | None:
    return None


def _no_own_policies() -> Mapping[str, RetentionPolicy]:
    return {}


@dataclass(frozen=True, slots=True)
class TenantRetention:
    """The platform's default retention plus the tenants' own policies (compliance
    stores them per tenant in the metadata store; docs/compliance.md).

    `lookup(tenant)` is the tenant's own policy or None; `listing()` every tenant that
    has one. Both are read at each use, not cached: a policy changed through the
    compliance API applies to the next read and the next prune.

    Reads plan with `policy_for(scope)`: a tenant's own policy, else the default; across
    all tenants the strictest of all of them, because a cross-tenant answer is only
    exact where every tenant's raw events (or tier) still hold the range.
    """

    default: RetentionPolicy = RetentionPolicy()
    lookup: Callable[[str], RetentionPolicy | None] = _no_own_policy
    listing: Callable[[], Mapping[str, RetentionPolicy]] = _no_own_policies

    def policy_for(self, tenant_id: str | None) -> RetentionPolicy:
        if tenant_id is not None:
            return self.lookup(tenant_id) or self.default
        return strictest([self.default, *self.listing().values()])

    __call__ = policy_for


def _us(moment: datetime) -> int:
    delta = moment.astimezone(UTC) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds


def _from_us(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=value)


def floor_to(moment: datetime, tier: Tier) -> datetime:
    return _from_us(_us(moment) // tier.value * tier.value)


def ceil_to(moment: datetime, tier: Tier) -> datetime:
    return _from_us(-(-_us(moment) // tier.value) * tier.value)


def aligned(time_range: TimeRange, tier: Tier) -> bool:
    return _us(time_range.start) % tier.value == 0 and _us(time_range.end) % tier.value == 0


def snap(time_range: TimeRange, tier: Tier) -> TimeRange:
    """The range widened outward to whole buckets of `tier`."""
    return TimeRange(floor_to(time_range.start, tier), ceil_to(time_range.end, tier))


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Where to read: raw events (`tier=None`), or a tier over the (snapped) range."""

    tier: Tier | None
    time_range: TimeRange


def plan(
    time_range: TimeRange,
    granularity: Granularity | None,
    now: datetime,
    policy: RetentionPolicy,
    trailing_days: int = 0,
) -> ReadPlan:
    """Chooses the source of a read (see the module docstring)."""
    trailing = timedelta(days=trailing_days)
    span_start = min(time_range.start, time_range.end - trailing)
    if span_start >= now - timedelta(days=policy.raw_days):
        return ReadPlan(None, time_range)
    finest_us = _GRANULARITY_US[granularity] if granularity is not None else Tier.DAY.value
    usable = [
        tier
        for tier in TIERS
        if tier.value <= finest_us
        and min(snap(time_range, tier).start, snap(time_range, tier).end - trailing)
        >= ceil_to(now - policy.keeps(tier), tier)
    ]
    if not usable:
        kept = ", ".join(f"{t.name.lower()} buckets {policy.keeps(t).days} days" for t in TIERS)
        raise RollupRangeError(
            f"events older than {policy.raw_days} days are kept as rollups ({kept}); "
            "this range needs a coarser granularity or a later start"
        )
    for tier in reversed(usable):  # coarsest first: fewest rows, exact when aligned
        if aligned(time_range, tier):
            return ReadPlan(tier, time_range)
    return ReadPlan(usable[0], snap(time_range, usable[0]))


# --- the store -------------------------------------------------------------------------

_DIMENSIONS = (
    "event_name",
    "event_type",
    "ticketed_event_id",
    "country_code",
    "currency",
)
_COLUMNS = f"""
  tenant_id VARCHAR NOT NULL,
  bucket_us BIGINT NOT NULL,
  bucket_day DATE NOT NULL,
  {", ".join(f"{d} VARCHAR NOT NULL" for d in _DIMENSIONS)},
  events BIGINT NOT NULL,
  revenue DECIMAL(38,6) NOT NULL,
  quantity BIGINT NOT NULL,
  orders_without_id BIGINT NOT NULL,
  order_ids VARCHAR[] NOT NULL,
  actor_keys INTEGER[] NOT NULL
"""
_STATE_TABLE = "rollup_state"

# Raw events -> minute rows. Epoch microseconds are positive for every accepted event
# (they are at most `raw_days` old), so integer division is the floor.
_MINUTES_FROM_RAW = f"""
SELECT tenant_id,
       epoch_us(occurred_at) // {_MINUTE_US} * {_MINUTE_US} AS bucket_us,
       occurred_on AS bucket_day,
       {", ".join(_DIMENSIONS)},
       count(*) AS events,
       CAST(sum(revenue) AS DECIMAL(38,6)) AS revenue,
       CAST(sum(quantity) AS BIGINT) AS quantity,
       count(*) FILTER (WHERE order_id = '') AS orders_without_id,
       coalesce(list_sort(list(DISTINCT order_id) FILTER (WHERE order_id <> '')),
                []::VARCHAR[]) AS order_ids,
       coalesce(list_sort(list(DISTINCT actor_key) FILTER (WHERE actor_key IS NOT NULL)),
                []::INTEGER[]) AS actor_keys
FROM {TABLE}
WHERE {{where}}
GROUP BY ALL
"""


def _coarser_sql(source: Tier, target: Tier) -> str:
    """Rows of `target` from rows of the finer `source` tier over `{where}`."""
    return f"""
SELECT tenant_id,
       bucket_us // {target.value} * {target.value} AS bucket_us,
       bucket_day,
       {", ".join(_DIMENSIONS)},
       CAST(sum(events) AS BIGINT) AS events,
       CAST(sum(revenue) AS DECIMAL(38,6)) AS revenue,
       CAST(sum(quantity) AS BIGINT) AS quantity,
       CAST(sum(orders_without_id) AS BIGINT) AS orders_without_id,
       list_sort(list_distinct(flatten(list(order_ids)))) AS order_ids,
       list_sort(list_distinct(flatten(list(actor_keys)))) AS actor_keys
FROM {source.table}
WHERE {{where}}
GROUP BY ALL
"""


class RollupStore:
    """The rollup tiers in one DuckDB file; thread-safe, one instance per process."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self._conn = duckdb.connect(str(self.path))
        self._conn.execute("SET GLOBAL TimeZone = 'UTC'")
        self._conn.execute("SET enable_progress_bar = false")
        for tier in TIERS:
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {tier.table} ({_COLUMNS})")
        self._conn.execute(
            f"CREATE TABLE IF NOT EXISTS {_STATE_TABLE}"
            " (name VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)"
        )
        self._lock = threading.Lock()
        # Cursors in use. DuckDB crashes (SIGSEGV) when a connection is closed while a
        # cursor of it still runs in another thread — e.g. a flush left running in a
        # worker thread after its asyncio task was cancelled — so close() waits for zero.
        self._in_use = threading.Condition(self._lock)
        self._active = 0
        self._closed = False
        state = self._state("closed_cleanly")
        # New file: nothing rolled up yet, so everything raw holds must be built; not
        # closed cleanly: dirty minutes were lost with the process.
        self.created = not existed
        self.needs_rebuild = self.created or state != "yes"
        self._set_state("closed_cleanly", "no")

    def _state(self, name: str) -> str | None:
        row = self._conn.execute(
            f"SELECT value FROM {_STATE_TABLE} WHERE name = ?", [name]
        ).fetchone()
        return None if row is None else str(row[0])

    def _set_state(self, name: str, value: str) -> None:
        self._conn.execute(f"INSERT OR REPLACE INTO {_STATE_TABLE} VALUES (?, ?)", [name, value])

    def read(self, sql: str, params: Mapping[str, object] | Sequence[object] = ()) -> pa.Table:
        """One SELECT on its own cursor (reads run in parallel with a flush)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("rollup store is closed")
            cursor = self._conn.cursor()
            self._active += 1
        try:
            bound = dict(params) if isinstance(params, Mapping) else list(params)
            return cursor.sql(sql, params=bound).to_arrow_table()
        finally:
            cursor.close()
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._active -= 1
            self._in_use.notify_all()

    def transaction(self) -> _Transaction:
        return _Transaction(self)

    def replace_order_ids(self, tenant_id: str, tokens: Mapping[str, str]) -> int:
        """Replaces each order id of `tokens` by its token in the tenant's `order_ids`
        lists of every tier, in one transaction; returns the rows changed. Idempotent: a
        replaced id is no longer found. Callers serialise writes (`RollupMaintainer`)."""
        if not tokens:
            return 0
        ids = sorted(tokens)
        params = {"tenant": tenant_id, "ids": ids, "tokens": [tokens[i] for i in ids]}
        changed = 0
        with self.transaction() as cursor:
            for tier in TIERS:
                # A list holds an order id at most once and tokens are distinct, so the
                # result stays a set; sorted again like every list the maintainer writes.
                row = cursor.execute(
                    f"UPDATE {tier.table} SET order_ids = list_sort(list_transform(order_ids,"
                    " lambda o: coalesce($tokens[list_position($ids, o)], o)))"
                    " WHERE tenant_id = $tenant AND list_has_any(order_ids, $ids)",
                    params,
                ).fetchone()
                changed += int(row[0]) if row else 0
        return changed

    def close(self) -> None:
        """Marks a clean close (no rebuild needed at the next open) and releases the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._in_use.wait_for(lambda: self._active == 0, timeout=60)
            with contextlib.suppress(duckdb.Error):
                self._set_state("closed_cleanly", "yes")
            self._conn.close()


class _Transaction:
    """One write transaction on the rollup store (writes are serialised by the caller)."""

    def __init__(self, store: RollupStore) -> None:
        self._store = store
        self.cursor: duckdb.DuckDBPyConnection | None = None

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        with self._store._lock:
            if self._store._closed:
                raise RuntimeError("rollup store is closed")
            self.cursor = self._store._conn.cursor()
            self._store._active += 1
        self.cursor.execute("BEGIN")
        return self.cursor

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.cursor is not None
        try:
            if exc_type is None:
                self.cursor.execute("COMMIT")
            else:
                with contextlib.suppress(duckdb.Error):
                    self.cursor.execute("ROLLBACK")
        finally:
            self.cursor.close()
            self._store._release()


# --- maintenance -----------------------------------------------------------------------


def _key_filter(expression: str, keys: Iterable[int], step: int) -> tuple[str, dict[str, object]]:
    """`expression` (a bucket start in µs) in `keys`: a range DuckDB can prune row groups
    with (zone maps), then a semi-join on the exact keys (late events scatter them)."""
    ordered = sorted(set(keys))
    return (
        f"{expression} >= $key_lo AND {expression} < $key_hi"
        f" AND {expression} IN (SELECT unnest($keys))",
        {"key_lo": ordered[0], "key_hi": ordered[-1] + step, "keys": ordered},
    )


def _minute_of(column: str) -> str:
    return f"(epoch_us({column}) // {_MINUTE_US} * {_MINUTE_US})"


class RollupMaintainer:
    """Keeps the tiers equal to the raw events (see the module docstring).

    `observe_events` / `observe_rows` may be called from any thread and only record
    dirty minutes; `flush`, `rebuild` and `prune` do the work and run one at a time.
    """

    def __init__(
        self,
        events: EventStore,
        store: RollupStore,
        policy: RetentionPolicy | TenantRetention,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """`policy`: one policy for every tenant, or the default plus tenants' own."""
        self.events = events
        self.store = store
        self.retention = policy if isinstance(policy, TenantRetention) else TenantRetention(policy)
        self.policy = self.retention.default
        self._clock = clock
        self._dirty_lock = threading.Lock()
        self._dirty: dict[str, set[int]] = defaultdict(set)
        self._work_lock = threading.Lock()
        self.flushed_minutes = 0

    # --- the observer side (cheap) --------------------------------------------------

    def observe_events(self, events: Sequence[TrackedEvent]) -> None:
        with self._dirty_lock:
            for event in events:
                self._dirty[event.tenant_id].add(_us(event.occurred_at) // _MINUTE_US * _MINUTE_US)

    def observe_rows(self, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        minutes = pc.multiply(
            pc.divide(pc.cast(rows.column("occurred_at"), pa.int64()), _MINUTE_US), _MINUTE_US
        )
        pairs = pa.table({"t": rows.column("tenant_id"), "m": minutes}).group_by(["t", "m"])
        distinct = pairs.aggregate([])
        with self._dirty_lock:
            for tenant_id, minute in zip(
                distinct.column("t").to_pylist(), distinct.column("m").to_pylist(), strict=True
            ):
                self._dirty[tenant_id].add(int(minute))

    def pending(self, tenant_id: str | None = None) -> bool:
        """Whether some committed events are not in the tiers yet (for a tenant, or any)."""
        with self._dirty_lock:
            if tenant_id is None:
                return any(self._dirty.values())
            return bool(self._dirty.get(tenant_id))

    # --- the work ---------------------------------------------------------------------

    def catch_up(self, tenant_id: str | None = None) -> None:
        """The read barrier: flushes when the scope has events not rolled up yet."""
        if self.pending(tenant_id):
            self.flush()

    def flush(self) -> set[str]:
        """Recomputes the dirty minutes and their hours and days; returns the tenants."""
        with self._work_lock:
            with self._dirty_lock:
                dirty = {t: m for t, m in self._dirty.items() if m}
                self._dirty = defaultdict(set)
            try:
                for tenant_id, minutes in dirty.items():
                    self._recompute(tenant_id, minutes)
            except BaseException:
                # Nothing of a failed flush is lost: its minutes are dirty again.
                with self._dirty_lock:
                    for tenant_id, minutes in dirty.items():
                        self._dirty[tenant_id] |= minutes
                raise
            return set(dirty)

    def _recompute(self, tenant_id: str, minutes: set[int]) -> None:
        where, params = _key_filter(_minute_of("occurred_at"), minutes, _MINUTE_US)
        # The time range again on the raw column itself, so DuckDB prunes row groups.
        params.update(
            tenant_id=tenant_id,
            time_lo=_from_us(min(minutes)),
            time_hi=_from_us(max(minutes) + _MINUTE_US),
        )
        fresh = self.events.read(
            _MINUTES_FROM_RAW.format(
                where="tenant_id = $tenant_id AND occurred_at >= $time_lo"
                f" AND occurred_at < $time_hi AND {where}"
            ),
            params,
        )
        self.flushed_minutes += len(minutes)
        with self.store.transaction() as cursor:
            _replace(cursor, Tier.MINUTE, tenant_id, minutes, fresh)
            self._roll_up(
                cursor, tenant_id, {m // Tier.HOUR.value * Tier.HOUR.value for m in minutes}
            )

    def _roll_up(
        self,
        cursor: duckdb.DuckDBPyConnection,
        tenant_id: str | None,
        hours: set[int],
        tenants: _Tenants | None = None,
    ) -> None:
        """Hours from minutes, then days from hours, for the given hour buckets: of one
        tenant, of the `tenants` selection, or (neither) of every tenant."""
        if not hours:
            return
        if tenants is None:
            tenants = _Tenants.one(tenant_id) if tenant_id is not None else _Tenants.every()
        days = {h // Tier.DAY.value * Tier.DAY.value for h in hours}
        for source, target, keys in ((Tier.MINUTE, Tier.HOUR, hours), (Tier.HOUR, Tier.DAY, days)):
            tenant = f"{tenants.sql} AND "
            target_where, params = _key_filter("bucket_us", keys, target.value)
            source_where, _ = _key_filter(
                f"(bucket_us // {target.value} * {target.value})", keys, target.value
            )
            params.update(tenants.params)
            cursor.execute(f"DELETE FROM {target.table} WHERE {tenant}{target_where}", params)
            cursor.execute(
                f"INSERT INTO {target.table} BY NAME "
                + _coarser_sql(source, target).format(where=tenant + source_where),
                params,
            )

    def rebuild(
        self, since: datetime | None = None, later: Mapping[str, datetime] | None = None
    ) -> None:
        """Recomputes every tier bucket from `since` on from the raw events.

        `None` rebuilds everything from raw: only for a new rollup file, since raw past
        its retention may be gone while its rollups are all that is left.

        `later`: tenants whose raw events only go back to a later instant (a shorter
        raw retention of their own): they are rebuilt from that day on only, so tier
        buckets whose raw events the retention job already deleted are kept rather than
        recomputed from nothing. (A lost flush in their oldest raw day stays lost.)
        """
        with self._work_lock:
            start = floor_to(since, Tier.DAY) if since is not None else None
            own = {
                tenant_id: ceil_to(moment, Tier.DAY)
                for tenant_id, moment in (later or {}).items()
                if start is not None and ceil_to(moment, Tier.DAY) > start
            }
            groups = [(_Tenants.all_but(sorted(own)), start)]
            groups += [(_Tenants.one(t), own[t]) for t in sorted(own)]
            with self.store.transaction() as cursor:
                for tenants, group_start in groups:
                    self._rebuild_group(cursor, tenants, group_start)

    def _rebuild_group(
        self, cursor: duckdb.DuckDBPyConnection, tenants: _Tenants, start: datetime | None
    ) -> None:
        where = tenants.sql if start is None else f"{tenants.sql} AND occurred_at >= $start"
        params: dict[str, object] = dict(tenants.params)
        bucket_where = tenants.sql
        bucket_params: dict[str, object] = dict(tenants.params)
        if start is not None:
            params["start"] = start
            bucket_where += " AND bucket_us >= $start_us"
            bucket_params["start_us"] = _us(start)
        fresh = self.events.read(_MINUTES_FROM_RAW.format(where=where), params)
        for tier in TIERS:
            cursor.execute(f"DELETE FROM {tier.table} WHERE {bucket_where}", bucket_params)
        cursor.register("_bilten_minutes", fresh)
        try:
            cursor.execute(f"INSERT INTO {Tier.MINUTE.table} BY NAME SELECT * FROM _bilten_minutes")
        finally:
            cursor.unregister("_bilten_minutes")
        hours = {
            int(h)
            for h in pc.unique(
                pc.multiply(pc.divide(fresh.column("bucket_us"), Tier.HOUR.value), Tier.HOUR.value)
            ).to_pylist()
        }
        self._roll_up(cursor, None, hours, tenants)

    def erase_orders(self, tenant_id: str, tokens: Mapping[str, str]) -> int:
        """Erasure hook: replaces the order ids of `tokens` (order id -> token, from
        `erasure_tokens`) in every tier; returns the rows changed.

        Dirty minutes are flushed first, so a subject's events not rolled up yet are in
        the tiers (counted, anonymously) before the event store deletes their raw rows:
        a flush after that delete would recompute those minutes without them. The
        caller runs this again after deleting the raw rows, with the same tokens: a
        flush between the two calls may have recomputed a minute from the rows still
        there, putting the order id back."""
        self.flush()
        with self._work_lock:
            return self.store.replace_order_ids(tenant_id, tokens)

    def prune(self) -> None:
        """Drops tier buckets past their retention (a day's margin: retention is a floor).

        Per tenant: a tenant with its own policy keeps each tier as long as that policy
        says (shorter or longer than the default), every other tenant as the default.
        """
        now = self._clock()
        own = dict(self.retention.listing())

        def horizon(policy: RetentionPolicy, tier: Tier) -> int:
            return _us(floor_to(now - policy.keeps(tier) - timedelta(days=1), Tier.DAY))

        with self._work_lock, self.store.transaction() as cursor:
            for tier in TIERS:
                others = _Tenants.all_but(sorted(own))
                cursor.execute(
                    f"DELETE FROM {tier.table} WHERE {others.sql} AND bucket_us < $horizon",
                    {**others.params, "horizon": horizon(self.retention.default, tier)},
                )
                for tenant_id, policy in sorted(own.items()):
                    cursor.execute(
                        f"DELETE FROM {tier.table} WHERE tenant_id = $t AND bucket_us < $horizon",
                        {"t": tenant_id, "horizon": horizon(policy, tier)},
                    )


def erasure_tokens(order_ids: Iterable[str]) -> dict[str, str]:
    """One opaque token per order id: `erased:` and a random UUID, unrelated to the id.

    One token per order (not one for all of them, not one per row): the tiers count
    distinct orders across buckets and tiers by their ids, so an order paid over two
    minutes must stay one value everywhere and two orders must stay two values; random,
    not a hash of the id, so nobody holding the order id can find its rows again."""
    return {order_id: f"erased:{uuid.uuid4()}" for order_id in sorted(set(order_ids))}


@dataclass(frozen=True, slots=True)
class _Tenants:
    """A tenant selection as a SQL condition with its named parameters."""

    sql: str
    params: Mapping[str, object]

    @classmethod
    def every(cls) -> _Tenants:
        return cls("true", {})

    @classmethod
    def one(cls, tenant_id: str) -> _Tenants:
        return cls("tenant_id = $tenant_id", {"tenant_id": tenant_id})

    @classmethod
    def all_but(cls, tenant_ids: Sequence[str]) -> _Tenants:
        if not tenant_ids:
            return cls.every()
        names = {f"except_{i}": t for i, t in enumerate(tenant_ids)}
        marks = ", ".join(f"${name}" for name in names)
        return cls(f"tenant_id NOT IN ({marks})", names)


def _replace(
    cursor: duckdb.DuckDBPyConnection,
    tier: Tier,
    tenant_id: str,
    keys: set[int],
    fresh: pa.Table,
) -> None:
    where, params = _key_filter("bucket_us", keys, tier.value)
    params["tenant_id"] = tenant_id
    cursor.execute(f"DELETE FROM {tier.table} WHERE tenant_id = $tenant_id AND {where}", params)
    if fresh.num_rows:
        cursor.register("_bilten_fresh", fresh)
        try:
            cursor.execute(f"INSERT INTO {tier.table} BY NAME SELECT * FROM _bilten_fresh")
        finally:
            cursor.unregister("_bilten_fresh")


# --- reading ---------------------------------------------------------------------------


def _bucket_key(granularity: Granularity) -> str:
    if granularity is Granularity.MINUTE:
        return f"bucket_us // {Tier.MINUTE.value}"
    if granularity is Granularity.HOUR:
        return f"bucket_us // {Tier.HOUR.value}"
    if granularity is Granularity.DAY:
        return "bucket_day"
    return f"CAST(date_trunc('{granularity.value}', bucket_day) AS DATE)"


def _bucket_start(key: int | date, granularity: Granularity) -> datetime:
    if isinstance(key, date):
        return datetime(key.year, key.month, key.day, tzinfo=UTC)
    step = Tier.MINUTE if granularity is Granularity.MINUTE else Tier.HOUR
    return _from_us(int(key) * step.value)


class _Query(WhereBuilder):
    """WHERE clauses with named parameters over a tier table (no value in the SQL)."""

    def time_clauses(self, start: datetime, end: datetime) -> list[str]:
        return [
            f"bucket_us >= {self.bind('start_us', _us(start))}",
            f"bucket_us < {self.bind('end_us', _us(end))}",
        ]

    def converted(self, filters: MetricFilters) -> str:
        return " AND ".join(
            [
                f"event_type = {self.bind('conversion', TrackedEventType.CONVERSION.value)}",
                *self.event_filters(filters),
            ]
        )


def _check_tier(time_range: TimeRange, tier: Tier, granularity: Granularity | None) -> None:
    if not aligned(time_range, tier):
        raise ValueError(f"rollup reads need a range aligned to {tier.name.lower()} buckets")
    if granularity is not None and _GRANULARITY_US[granularity] < tier.value:
        raise ValueError(f"{granularity.value} buckets cannot be built from {tier.name} rollups")


def _per_tenant_sum(
    rows: Iterable[dict[str, Any]], keys: Sequence[str], measures: Sequence[str]
) -> dict[tuple[Any, ...], dict[str, int]]:
    """Adds per-tenant distinct counts up by `keys` (users are tenant scoped)."""
    out: dict[tuple[Any, ...], dict[str, int]] = {}
    for row in rows:
        slot = out.setdefault(tuple(row[k] for k in keys), dict.fromkeys(measures, 0))
        for measure in measures:
            slot[measure] += int(row[measure] or 0)
    return out


def event_counts(
    rollups: RollupStore,
    tier: Tier,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters = NO_FILTERS,
) -> tuple[EventCountRow, ...]:
    """`metrics.event_counts` from a tier."""
    _check_tier(time_range, tier, granularity)
    bucket_starts(time_range, granularity)
    query = _Query()
    where = query.where(scope, time_range.start, time_range.end, filters)
    sql = (
        f"SELECT {_bucket_key(granularity)} AS bucket, event_name, event_type,"
        f" CAST(sum(events) AS BIGINT) AS events FROM {tier.table} WHERE {where}"
        " GROUP BY ALL ORDER BY bucket, event_name, event_type"
    )
    return tuple(
        EventCountRow(
            _bucket_start(row["bucket"], granularity),
            row["event_name"],
            TrackedEventType(row["event_type"]),
            int(row["events"]),
        )
        for row in rollups.read(sql, query.params).to_pylist()
    )


# Groupable dimensions (`metrics.GROUPABLE`) the tiers keep; `source` is not one.
ROLLUP_DIMENSIONS = frozenset(_DIMENSIONS) & frozenset(GROUPABLE)


def grouped_event_counts(
    rollups: RollupStore,
    tier: Tier,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    dimensions: Sequence[str] = (),
    filters: MetricFilters = NO_FILTERS,
) -> tuple[GroupedEventCount, ...]:
    """`metrics.grouped_event_counts` from a tier; `RollupDimensionError` for a dimension
    the tiers do not keep."""
    check_groupable(dimensions)
    missing = [d for d in dimensions if d not in ROLLUP_DIMENSIONS]
    if missing:
        raise RollupDimensionError(f"rollups do not keep {', '.join(missing)}")
    _check_tier(time_range, tier, granularity)
    bucket_starts(time_range, granularity)
    query = _Query()
    where = query.where(scope, time_range.start, time_range.end, filters)
    columns = "".join(f", {d}" for d in dimensions)
    sql = (
        f"SELECT {_bucket_key(granularity)} AS bucket{columns},"
        f" CAST(sum(events) AS BIGINT) AS events FROM {tier.table} WHERE {where}"
        " GROUP BY ALL ORDER BY ALL"
    )
    return tuple(
        GroupedEventCount(
            _bucket_start(row["bucket"], granularity),
            tuple(str(row[d]) for d in dimensions),
            int(row["events"]),
        )
        for row in rollups.read(sql, query.params).to_pylist()
    )


def active_users(
    rollups: RollupStore,
    tier: Tier,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters = NO_FILTERS,
) -> ActiveUsers:
    """`metrics.active_users` from a tier: per-bucket users and DAU / WAU / MAU."""
    _check_tier(time_range, tier, granularity)
    starts = bucket_starts(time_range, granularity)
    end = time_range.end
    query = _Query()
    scan_start = min(time_range.start, end - timedelta(days=TRAILING_DAYS))
    where = query.where(scope, scan_start, end, filters)
    range_start = query.bind("range_start", _us(time_range.start))
    day = query.bind("day_start", _us(end - timedelta(days=1)))
    week = query.bind("week_start", _us(end - timedelta(days=7)))
    month = query.bind("month_start", _us(end - timedelta(days=TRAILING_DAYS)))
    sql = f"""
        WITH actors AS MATERIALIZED (
          SELECT tenant_id, bucket_us, {_bucket_key(granularity)} AS bucket,
                 unnest(actor_keys) AS actor
          FROM {tier.table} WHERE {where}
        )
        SELECT 'bucket' AS kind, bucket, tenant_id, count(DISTINCT actor) AS users,
               0 AS dau, 0 AS wau, 0 AS mau
        FROM actors WHERE bucket_us >= {range_start} GROUP BY ALL
        UNION ALL
        SELECT 'trailing', NULL, tenant_id, 0,
               count(DISTINCT actor) FILTER (WHERE bucket_us >= {day}),
               count(DISTINCT actor) FILTER (WHERE bucket_us >= {week}),
               count(DISTINCT actor) FILTER (WHERE bucket_us >= {month})
        FROM actors GROUP BY ALL
    """
    rows = rollups.read(sql, query.params).to_pylist()
    per_bucket = _per_tenant_sum((r for r in rows if r["kind"] == "bucket"), ["bucket"], ["users"])
    trailing = _per_tenant_sum(
        (r for r in rows if r["kind"] == "trailing"), [], ["dau", "wau", "mau"]
    ).get((), {"dau": 0, "wau": 0, "mau": 0})
    users = {_bucket_start(k[0], granularity): v["users"] for k, v in per_bucket.items()}
    return ActiveUsers(
        buckets=tuple(ActiveUsersRow(start, users.get(start, 0)) for start in starts),
        as_of=end,
        dau=trailing["dau"],
        wau=trailing["wau"],
        mau=trailing["mau"],
    )


def _conversion_counts(
    rollups: RollupStore,
    tier: Tier,
    scope: Scope,
    time_range: TimeRange,
    filters: MetricFilters,
    bucket: str | None,
) -> dict[tuple[Any, ...], dict[str, int]]:
    query = _Query()
    where = query.where(scope, time_range.start, time_range.end, filters, event_filters=False)
    converted = query.converted(filters)
    key = f"{bucket} AS bucket, " if bucket else ""
    keys = ["bucket"] if bucket else []
    events_sql = (
        f"SELECT {key}tenant_id, CAST(sum(events) FILTER (WHERE {converted}) AS BIGINT)"
        f" AS conversions FROM {tier.table} WHERE {where} GROUP BY ALL"
    )
    users_sql = f"""
        WITH actors AS (
          SELECT {key}tenant_id, event_type, event_name, unnest(actor_keys) AS actor
          FROM {tier.table} WHERE {where}
        )
        SELECT {"bucket, " if bucket else ""}tenant_id,
               count(DISTINCT actor) FILTER (WHERE {converted}) AS converting_users,
               count(DISTINCT actor) AS active_users
        FROM actors GROUP BY ALL
    """
    counts = _per_tenant_sum(
        rollups.read(events_sql, query.params).to_pylist(), keys, ["conversions"]
    )
    users = _per_tenant_sum(
        rollups.read(users_sql, query.params).to_pylist(),
        keys,
        ["converting_users", "active_users"],
    )
    merged: dict[tuple[Any, ...], dict[str, int]] = {}
    for group in set(counts) | set(users):
        merged[group] = {
            **counts.get(group, {"conversions": 0}),
            **users.get(group, {"converting_users": 0, "active_users": 0}),
        }
    return merged


def conversions(
    rollups: RollupStore,
    tier: Tier,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters = NO_FILTERS,
) -> tuple[ConversionRow, ...]:
    """`metrics.conversions` from a tier."""
    _check_tier(time_range, tier, granularity)
    starts = bucket_starts(time_range, granularity)
    groups = _conversion_counts(rollups, tier, scope, time_range, filters, _bucket_key(granularity))
    by_bucket = {_bucket_start(k[0], granularity): v for k, v in groups.items()}
    result = []
    for start in starts:
        row = by_bucket.get(start, {"conversions": 0, "converting_users": 0, "active_users": 0})
        active = row["active_users"]
        result.append(
            ConversionRow(
                start,
                row["conversions"],
                row["converting_users"],
                active,
                row["converting_users"] / active if active else 0.0,
            )
        )
    return tuple(result)


def overall_conversion_rate(
    rollups: RollupStore,
    tier: Tier,
    scope: Scope,
    time_range: TimeRange,
    filters: MetricFilters = NO_FILTERS,
) -> float:
    """`metrics.overall_conversion_rate` from a tier."""
    _check_tier(time_range, tier, None)
    totals = _conversion_counts(rollups, tier, scope, time_range, filters, None).get(())
    if not totals or not totals["active_users"]:
        return 0.0
    return totals["converting_users"] / totals["active_users"]


def _money_where(query: _Query, where: str) -> str:
    conversion = query.bind("conversion", TrackedEventType.CONVERSION.value)
    return f"{where} AND event_type = {conversion} AND currency <> ''"


def revenue(
    rollups: RollupStore,
    tier: Tier,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters = NO_FILTERS,
) -> tuple[RevenueRow, ...]:
    """`metrics.revenue` from a tier: revenue, orders and tickets per bucket and currency."""
    _check_tier(time_range, tier, granularity)
    bucket_starts(time_range, granularity)
    query = _Query()
    where = _money_where(query, query.where(scope, time_range.start, time_range.end, filters))
    bucket = _bucket_key(granularity)
    sums_sql = (
        f"SELECT {bucket} AS bucket, currency, CAST(sum(revenue) AS DECIMAL(38,6)) AS revenue,"
        " CAST(sum(quantity) AS BIGINT) AS tickets,"
        " CAST(sum(orders_without_id) AS BIGINT) AS orders_without_id"
        f" FROM {tier.table} WHERE {where} GROUP BY ALL"
    )
    # Order ids are per tenant, like users: distinct per tenant, then added.
    orders_sql = f"""
        SELECT bucket, currency, tenant_id, count(DISTINCT order_id) AS orders FROM (
          SELECT {bucket} AS bucket, currency, tenant_id, unnest(order_ids) AS order_id
          FROM {tier.table} WHERE {where}
        ) GROUP BY ALL
    """
    orders = _per_tenant_sum(
        rollups.read(orders_sql, query.params).to_pylist(), ["bucket", "currency"], ["orders"]
    )
    rows = rollups.read(sums_sql, query.params).to_pylist()
    rows.sort(key=lambda row: (row["bucket"], row["currency"]))
    return tuple(
        RevenueRow(
            _bucket_start(row["bucket"], granularity),
            row["currency"],
            Decimal(row["revenue"]),
            int(row["orders_without_id"])
            + orders.get((row["bucket"], row["currency"]), {"orders": 0})["orders"],
            int(row["tickets"]),
        )
        for row in rows
    )


def geography(
    rollups: RollupStore,
    tier: Tier,
    scope: Scope,
    time_range: TimeRange,
    filters: MetricFilters = NO_FILTERS,
) -> tuple[GeoRow, ...]:
    """`metrics.geography` from a tier: per country events, users, revenue by currency."""
    _check_tier(time_range, tier, None)
    query = _Query()
    where = query.where(scope, time_range.start, time_range.end, filters)
    events = {
        row["country_code"]: int(row["events"])
        for row in rollups.read(
            f"SELECT country_code, CAST(sum(events) AS BIGINT) AS events FROM {tier.table}"
            f" WHERE {where} GROUP BY ALL",
            query.params,
        ).to_pylist()
    }
    users = _per_tenant_sum(
        rollups.read(
            f"SELECT country_code, tenant_id, count(DISTINCT actor) AS users FROM ("
            f" SELECT country_code, tenant_id, unnest(actor_keys) AS actor FROM {tier.table}"
            f" WHERE {where}) GROUP BY ALL",
            query.params,
        ).to_pylist(),
        ["country_code"],
        ["users"],
    )
    money_query = _Query()
    money_where = _money_where(
        money_query, money_query.where(scope, time_range.start, time_range.end, filters)
    )
    money: dict[str, dict[str, Decimal]] = {}
    for row in rollups.read(
        f"SELECT country_code, currency, CAST(sum(revenue) AS DECIMAL(38,6)) AS revenue"
        f" FROM {tier.table} WHERE {money_where} GROUP BY ALL",
        money_query.params,
    ).to_pylist():
        money.setdefault(row["country_code"], {})[row["currency"]] = Decimal(row["revenue"])
    ordered = sorted(events.items(), key=lambda item: (-item[1], item[0]))
    return tuple(
        GeoRow(
            country,
            count,
            users.get((country,), {"users": 0})["users"],
            tuple(
                CurrencyAmount(currency, amount)
                for currency, amount in sorted(money.get(country, {}).items())
            ),
        )
        for country, count in ordered
    )
