"""Metrics over the event store: counts, active users, conversions, revenue, geography.

Plain functions, no gRPC: each takes an `EventStore`, a `Scope`, a `TimeRange` and (for
series) a `Granularity` plus optional `MetricFilters`, runs parameterised SQL (values are
never formatted into the text) and returns frozen dataclasses.

Definitions, the contract of every dashboard number:
- Time: events belong to [start, end) by `occurred_at`. Buckets are UTC: a minute,
  hour or day starts on the UTC boundary, a week on Monday 00:00 UTC (ISO 8601), a
  month on the 1st 00:00 UTC. The first and last buckets may be partial (only the part
  inside [start, end) is counted); `bucket_start` is the full bucket's start.
- Active user: a distinct actor, i.e. `user_id` when set, else `anonymous_id` (the two
  id spaces are kept apart); events with neither count as events but not as users. No
  identity stitching: a visitor who logs in mid-bucket counts twice. Users are tenant
  scoped, so across all tenants the count is the sum of the tenants' counts. All counts
  are exact (no sketches).
- DAU / WAU / MAU: distinct actors in the trailing 1 / 7 / 30 days before the range end,
  i.e. [end - N days, end), whatever the range start; the same filters apply.
- Conversion: an event of type `conversion`. Per bucket: conversions (events), the
  distinct converting users, the active users, and the rate converting / active users
  (0.0 when nobody was active). `event_name` / `event_type` filters narrow which
  conversions count; only `ticketed_event_id` also narrows the active users, so
  "conversion rate of concert X" means buyers of X over visitors of X.
- Revenue: conversion events with a currency, per bucket and currency (amounts in
  different currencies are never added): sum of `revenue`, orders (distinct non-empty
  `order_id`; a conversion without order id is one order on its own) and tickets
  (sum of `quantity`).
- Geography: per `country_code` ("" = unknown): events, distinct users and revenue per
  currency, over the whole range.

Series of single values (active users, conversions) have one row per bucket, zeros
included, so charts need no gap filling; multi-dimensional results (event counts,
revenue) list only the combinations that occur.

Speed: distinct users use DuckDB's exact bitmap aggregate over the dense per-tenant
`actor_key` (see `services.storage.event_store`) when the bitmaps fit in
`BITMAP_BUDGET_BYTES`, else an exact hash `count(DISTINCT ...)`. Time buckets come from
integer arithmetic on `epoch_us(occurred_at)` and from the `occurred_on` date column,
never from ICU calendar functions, which are 20-50x slower on `TIMESTAMPTZ`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.events.model import TrackedEventType
from services.storage.event_store import ACTORS_TABLE, TABLE, EventStore

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_BUCKETS = 100_000
# Working memory allowed for distinct-user bitmaps in one query; each group holds one
# bit per actor key in use (1 M actors: 125 KB per bucket).
BITMAP_BUDGET_BYTES = 256 * 1024 * 1024
# A bound on countries per query, for the bitmap budget of `geography`.
_MAX_COUNTRIES = 256
_MINUTE_US = 60_000_000
_HOUR_US = 3_600_000_000


class Granularity(enum.StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"  # ISO: starts Monday 00:00 UTC
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose events: one tenant, or every tenant (platform admins only: the caller
    checks the credential; `tenant_id=None` here simply means no tenant filter)."""

    tenant_id: str | None

    def __post_init__(self) -> None:
        if self.tenant_id == "":
            raise ValueError("tenant_id must not be empty; use Scope.all_tenants()")

    @classmethod
    def tenant(cls, tenant_id: str) -> Scope:
        return cls(tenant_id)

    @classmethod
    def all_tenants(cls) -> Scope:
        return cls(None)


@dataclass(frozen=True, slots=True)
class TimeRange:
    """[start, end) in UTC; both aware, start before end."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.utcoffset() is None or self.end.utcoffset() is None:
            raise ValueError("time range bounds must be timezone-aware")
        if self.start >= self.end:
            raise ValueError("time range start must be before its end")
        object.__setattr__(self, "start", self.start.astimezone(UTC))
        object.__setattr__(self, "end", self.end.astimezone(UTC))


@dataclass(frozen=True, slots=True)
class MetricFilters:
    """Optional narrowing; None means no filter on that field."""

    event_name: str | None = None
    event_type: TrackedEventType | None = None
    ticketed_event_id: str | None = None


NO_FILTERS = MetricFilters()


@dataclass(frozen=True, slots=True)
class EventCountRow:
    bucket_start: datetime
    event_name: str
    event_type: TrackedEventType
    events: int


# Columns event counts can be grouped by (`grouped_event_counts`), as GetMetrics names
# them in a point's dimensions.
GROUPABLE = ("event_name", "event_type", "country_code", "ticketed_event_id", "source")


@dataclass(frozen=True, slots=True)
class GroupedEventCount:
    bucket_start: datetime
    values: tuple[str, ...]  # one per grouped dimension, in the order asked
    events: int


@dataclass(frozen=True, slots=True)
class ActiveUsersRow:
    bucket_start: datetime
    active_users: int


@dataclass(frozen=True, slots=True)
class ActiveUsers:
    buckets: tuple[ActiveUsersRow, ...]
    as_of: datetime  # the range end: DAU/WAU/MAU cover the days before it
    dau: int
    wau: int
    mau: int


@dataclass(frozen=True, slots=True)
class ConversionRow:
    bucket_start: datetime
    conversions: int
    converting_users: int
    active_users: int
    conversion_rate: float  # converting_users / active_users, 0.0 when none active


@dataclass(frozen=True, slots=True)
class RevenueRow:
    bucket_start: datetime
    currency: str
    revenue: Decimal
    orders: int
    tickets: int


@dataclass(frozen=True, slots=True)
class CurrencyAmount:
    currency: str  # ISO 4217
    amount: Decimal


@dataclass(frozen=True, slots=True)
class GeoRow:
    country_code: str  # ISO 3166-1 alpha-2, "" when unknown
    events: int
    users: int
    revenue: tuple[CurrencyAmount, ...] = ()  # one per currency, sorted by currency


# --- buckets -------------------------------------------------------------------------


def bucket_floor(moment: datetime, granularity: Granularity) -> datetime:
    """Start of the UTC bucket holding `moment`."""
    moment = moment.astimezone(UTC)
    if granularity is Granularity.MINUTE:
        return moment.replace(second=0, microsecond=0)
    if granularity is Granularity.HOUR:
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity is Granularity.DAY:
        return day
    if granularity is Granularity.WEEK:
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


# Bucket lengths of the fixed-size granularities (a month has none).
_STEPS = {
    Granularity.MINUTE: timedelta(minutes=1),
    Granularity.HOUR: timedelta(hours=1),
    Granularity.DAY: timedelta(days=1),
    Granularity.WEEK: timedelta(weeks=1),
}


def _next_bucket(start: datetime, granularity: Granularity) -> datetime:
    if granularity is Granularity.MONTH:
        return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    return start + _STEPS[granularity]


def bucket_starts(time_range: TimeRange, granularity: Granularity) -> list[datetime]:
    """Every bucket that overlaps the range, in order; refuses more than `MAX_BUCKETS`."""
    first = bucket_floor(time_range.start, granularity)
    end = time_range.end
    if granularity is Granularity.MONTH:
        count = (end.year - first.year) * 12 + end.month - first.month + 1
    else:
        count = (end - first) // _STEPS[granularity] + 1
    if count > MAX_BUCKETS:
        raise ValueError(
            f"about {count} {granularity.value} buckets (limit {MAX_BUCKETS}); "
            "use a coarser granularity"
        )
    starts = []
    current = first
    while current < end:
        starts.append(current)
        current = _next_bucket(current, granularity)
    return starts


def _bucket_key_sql(granularity: Granularity) -> str:
    """A compact key of the UTC bucket, without ICU functions.

    Day, week and month keys are DATEs from the `occurred_on` column (a plain DATE
    column lets DuckDB group with a perfect hash); minute and hour keys are the number
    of whole minutes / hours since the epoch. `_bucket_start` turns a key back into
    the bucket's start.
    """
    if granularity in (Granularity.MINUTE, Granularity.HOUR):
        step = _MINUTE_US if granularity is Granularity.MINUTE else _HOUR_US
        # Floor division: DuckDB's // and % truncate toward zero.
        return (
            f"((epoch_us(occurred_at) - ((epoch_us(occurred_at) % {step}) + {step}) % {step})"
            f" // {step})"
        )
    if granularity is Granularity.DAY:
        return "occurred_on"
    return f"CAST(date_trunc('{granularity.value}', occurred_on) AS DATE)"


def _bucket_start(key: int | date, granularity: Granularity) -> datetime:
    if isinstance(key, date):
        return datetime(key.year, key.month, key.day, tzinfo=UTC)
    return EPOCH + key * _STEPS[granularity]


# --- SQL building --------------------------------------------------------------------


class WhereBuilder:
    """Collects WHERE clauses with named parameters, so no value enters the SQL text.
    Over raw events here; the rollup tiers subclass it for their bucket column."""

    def __init__(self) -> None:
        self.params: dict[str, object] = {}

    def bind(self, name: str, value: object) -> str:
        self.params[name] = value
        return f"${name}"

    def where(
        self,
        scope: Scope,
        start: datetime,
        end: datetime,
        filters: MetricFilters,
        *,
        event_filters: bool = True,
    ) -> str:
        clauses = []
        if scope.tenant_id is not None:
            # Only `Scope.all_tenants()` reads across tenants; every other scope filters.
            clauses.append(f"tenant_id = {self.bind('tenant_id', scope.tenant_id)}")
        clauses.extend(self.time_clauses(start, end))
        if filters.ticketed_event_id is not None:
            clauses.append(
                f"ticketed_event_id = {self.bind('ticketed_event_id', filters.ticketed_event_id)}"
            )
        if event_filters:
            clauses.extend(self.event_filters(filters))
        return " AND ".join(clauses)

    def time_clauses(self, start: datetime, end: datetime) -> list[str]:
        return [
            f"occurred_at >= {self.bind('start', start)}",
            f"occurred_at < {self.bind('end', end)}",
        ]

    def event_filters(self, filters: MetricFilters) -> list[str]:
        clauses = []
        if filters.event_name is not None:
            clauses.append(f"event_name = {self.bind('event_name', filters.event_name)}")
        if filters.event_type is not None:
            clauses.append(f"event_type = {self.bind('event_type', filters.event_type.value)}")
        return clauses


def _bitmap_bytes(store: EventStore, scope: Scope) -> int:
    """Memory of one bucket's distinct-user bitmaps, for the whole scope.

    DuckDB sizes each bitmap from the column statistics of `actor_key`, i.e. up to the
    largest key of any tenant; with every tenant in scope, each tenant has its own.
    """
    if scope.tenant_id is not None:
        stats = store.read(f"SELECT coalesce(max(actor_key), 0) + 1 AS width FROM {ACTORS_TABLE}")
        tenants = 1
    else:
        stats = store.read(
            f"SELECT coalesce(max(actor_key), 0) + 1 AS width,"
            f" count(DISTINCT tenant_id) AS tenants FROM {ACTORS_TABLE}"
        )
        tenants = max(1, int(stats.column("tenants")[0].as_py()))
    width = int(stats.column("width")[0].as_py())
    return tenants * (width // 8 + 1)


def _fits(bitmap_bytes: int, groups: int) -> bool:
    return groups * bitmap_bytes <= BITMAP_BUDGET_BYTES


def _distinct_users(bitmaps: bool, condition: str | None = None) -> str:
    only = f" FILTER (WHERE {condition})" if condition else ""
    if bitmaps:
        # No explicit bounds: DuckDB takes them from the column statistics, which
        # cover every committed key, so a key added by a concurrent append can never
        # fall outside the bitmap (explicit bounds read earlier could).
        return f"coalesce(bit_count(bitstring_agg(actor_key){only}), 0)"
    return f"count(DISTINCT actor_key){only}"


@dataclass(frozen=True, slots=True)
class _Measure:
    """One aggregate of a grouped query: its SQL and the type of its all-tenant sum."""

    expr: str
    sum_type: str = "BIGINT"


def _grouped(
    store: EventStore,
    scope: Scope,
    query: WhereBuilder,
    where: str,
    keys: Mapping[str, str],
    measures: Mapping[str, _Measure],
) -> list[dict[str, Any]]:
    """`SELECT keys, measures FROM tracked_events WHERE where GROUP BY keys` as dicts.

    Distinct users cannot be added across groups unless the groups hold disjoint
    users. Tenants do (users are tenant scoped), so with every tenant in scope the
    query groups by tenant as well and adds the tenants up; a tenant scope skips that
    extra string key, which slows a large scan noticeably.
    """
    key_exprs = [f"{expr} AS {name}" for name, expr in keys.items()]
    measure_exprs = [f"{m.expr} AS {name}" for name, m in measures.items()]
    if scope.tenant_id is not None:
        select = ", ".join([*key_exprs, *measure_exprs])
        sql = f"SELECT {select} FROM {TABLE} WHERE {where} GROUP BY ALL"
    else:
        inner = ", ".join([*key_exprs, "tenant_id", *measure_exprs])
        outer = ", ".join(
            [
                *keys,
                *(f"CAST(sum({name}) AS {m.sum_type}) AS {name}" for name, m in measures.items()),
            ]
        )
        group = f" GROUP BY {', '.join(keys)}" if keys else ""
        sql = f"SELECT {outer} FROM (SELECT {inner} FROM {TABLE} WHERE {where} GROUP BY ALL){group}"
    rows: list[dict[str, Any]] = store.read(sql, query.params).to_pylist()
    return rows


# --- metrics -------------------------------------------------------------------------


def event_counts(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters = NO_FILTERS,
) -> tuple[EventCountRow, ...]:
    """Events per bucket x event_name x event_type, ordered by those three."""
    bucket_starts(time_range, granularity)  # refuses absurd bucket counts early
    query = WhereBuilder()
    where = query.where(scope, time_range.start, time_range.end, filters)
    sql = (
        f"SELECT {_bucket_key_sql(granularity)} AS bucket, event_name, event_type,"
        f" count(*) AS events FROM {TABLE} WHERE {where}"
        " GROUP BY ALL ORDER BY bucket, event_name, event_type"
    )
    return tuple(
        EventCountRow(
            _bucket_start(row["bucket"], granularity),
            row["event_name"],
            TrackedEventType(row["event_type"]),
            row["events"],
        )
        for row in store.read(sql, query.params).to_pylist()
    )


def check_groupable(dimensions: Sequence[str]) -> None:
    """Refuses anything but `GROUPABLE` names: they become column names in the SQL."""
    unknown = [d for d in dimensions if d not in GROUPABLE]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}; one of {', '.join(GROUPABLE)}")
    if len(set(dimensions)) != len(dimensions):
        raise ValueError("a dimension is named twice")


def regroup_event_counts(
    rows: Iterable[EventCountRow], dimensions: Sequence[str]
) -> tuple[GroupedEventCount, ...]:
    """`event_counts` rows (per bucket, event name and type) added up by `dimensions`,
    which must be among event_name and event_type: the same answer as
    `grouped_event_counts`, from any `MetricBackend` (Pinot too)."""
    check_groupable(dimensions)
    if not set(dimensions) <= {"event_name", "event_type"}:
        raise ValueError("event_counts rows only carry event_name and event_type")
    sums: dict[tuple[datetime, tuple[str, ...]], int] = {}
    for row in rows:
        values = {"event_name": row.event_name, "event_type": row.event_type.value}
        key = (row.bucket_start, tuple(values[d] for d in dimensions))
        sums[key] = sums.get(key, 0) + row.events
    return tuple(GroupedEventCount(b, v, n) for (b, v), n in sorted(sums.items()))


def grouped_event_counts(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    dimensions: Sequence[str] = (),
    filters: MetricFilters = NO_FILTERS,
) -> tuple[GroupedEventCount, ...]:
    """Events per bucket and combination of the `dimensions`' values, ordered by bucket
    then values; only combinations that occur. No dimensions: one row per bucket with
    events. A value is the column as stored ("" when unknown, e.g. no country)."""
    check_groupable(dimensions)
    bucket_starts(time_range, granularity)  # refuses absurd bucket counts early
    query = WhereBuilder()
    where = query.where(scope, time_range.start, time_range.end, filters)
    columns = "".join(f", {d}" for d in dimensions)
    sql = (
        f"SELECT {_bucket_key_sql(granularity)} AS bucket{columns}, count(*) AS events"
        f" FROM {TABLE} WHERE {where} GROUP BY ALL ORDER BY ALL"
    )
    return tuple(
        GroupedEventCount(
            _bucket_start(row["bucket"], granularity),
            tuple(str(row[d]) for d in dimensions),
            int(row["events"]),
        )
        for row in store.read(sql, query.params).to_pylist()
    )


def active_users(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters = NO_FILTERS,
) -> ActiveUsers:
    """Distinct users per bucket, and DAU / WAU / MAU as of the range end."""
    starts = bucket_starts(time_range, granularity)
    # Slices are (bucket, trailing window) pairs; the window only varies in the last
    # 30 days, so 4 per bucket plus 4 before the range is a safe bound.
    if _fits(_bitmap_bytes(store, scope), 4 * len(starts) + 4):
        per_bucket, trailing = _active_users_in_one_scan(
            store, scope, time_range, granularity, filters
        )
    else:
        per_bucket, trailing = _active_users_hashed(store, scope, time_range, granularity, filters)
    return ActiveUsers(
        buckets=tuple(ActiveUsersRow(start, per_bucket.get(start, 0)) for start in starts),
        as_of=time_range.end,
        dau=trailing.get("dau", 0),
        wau=trailing.get("wau", 0),
        mau=trailing.get("mau", 0),
    )


def _active_users_in_one_scan(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters,
) -> tuple[dict[datetime, int], dict[str, int]]:
    """Per-bucket users and DAU/WAU/MAU from one scan.

    Each row falls in exactly one slice: its bucket, and the innermost trailing window
    it is in. Each slice keeps a bitmap of its users; a bucket's users, or a window's,
    are the bit count of the OR of its slices' bitmaps. Exact, and about half the work
    of scanning once for the series and once more for the trailing windows.
    """
    end = time_range.end
    query = WhereBuilder()
    scan_start = min(time_range.start, end - timedelta(days=30))
    where = query.where(scope, scan_start, end, filters)
    bucket = _bucket_key_sql(granularity)
    if bucket_floor(time_range.start, granularity) != time_range.start:
        # The first bucket is partial: rows of it from before the range start (read
        # for the trailing windows) must not count for it.
        bucket = f"CASE WHEN occurred_at >= {query.bind('range_start', time_range.start)}"
        bucket += f" THEN {_bucket_key_sql(granularity)} END"
    # Otherwise rows before the start land in earlier buckets, dropped below; a bare
    # column key lets DuckDB group with a perfect hash.
    day = query.bind("day_start", end - timedelta(days=1))
    week = query.bind("week_start", end - timedelta(days=7))
    month = query.bind("month_start", end - timedelta(days=30))
    tenant = "tenant_id, " if scope.tenant_id is None else ""
    windows = "".join(
        f" UNION ALL SELECT '{name}', NULL, {tenant}bit_count(bit_or(actors))"
        f" FROM slices WHERE recency >= {level} GROUP BY ALL"
        for name, level in (("dau", 3), ("wau", 2), ("mau", 1))
    )
    sql = f"""
        WITH slices AS MATERIALIZED (
          SELECT {bucket} AS bucket,
                 CASE WHEN occurred_at >= {day} THEN 3 WHEN occurred_at >= {week} THEN 2
                      WHEN occurred_at >= {month} THEN 1 ELSE 0 END AS recency,
                 {tenant}bitstring_agg(actor_key) AS actors
          FROM {TABLE} WHERE {where} GROUP BY ALL
        ),
        per_tenant AS (
          SELECT 'bucket' AS kind, bucket, {tenant}bit_count(bit_or(actors)) AS users
          FROM slices WHERE bucket IS NOT NULL GROUP BY ALL
          {windows}
        )
        SELECT kind, bucket, CAST(sum(users) AS BIGINT) AS users FROM per_tenant GROUP BY ALL
    """
    per_bucket: dict[datetime, int] = {}
    trailing: dict[str, int] = {}
    for row in store.read(sql, query.params).to_pylist():
        users = int(row["users"] or 0)
        if row["kind"] == "bucket":
            per_bucket[_bucket_start(row["bucket"], granularity)] = users
        else:
            trailing[row["kind"]] = users
    return per_bucket, trailing


def _active_users_hashed(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters,
) -> tuple[dict[datetime, int], dict[str, int]]:
    """The same numbers with hash-based distinct counts, for when bitmaps are too big."""
    query = WhereBuilder()
    where = query.where(scope, time_range.start, time_range.end, filters)
    per_bucket = {
        _bucket_start(row["bucket"], granularity): int(row["active_users"])
        for row in _grouped(
            store,
            scope,
            query,
            where,
            {"bucket": _bucket_key_sql(granularity)},
            {"active_users": _Measure(_distinct_users(False))},
        )
    }
    end = time_range.end
    trailing = WhereBuilder()
    trailing_where = trailing.where(scope, end - timedelta(days=30), end, filters)
    day_start = trailing.bind("day_start", end - timedelta(days=1))
    week_start = trailing.bind("week_start", end - timedelta(days=7))
    (totals,) = _grouped(
        store,
        scope,
        trailing,
        trailing_where,
        {},
        {
            "dau": _Measure(_distinct_users(False, f"occurred_at >= {day_start}")),
            "wau": _Measure(_distinct_users(False, f"occurred_at >= {week_start}")),
            "mau": _Measure(_distinct_users(False)),
        },
    )
    return per_bucket, {name: int(totals[name] or 0) for name in ("dau", "wau", "mau")}


def _converted_condition(query: WhereBuilder, filters: MetricFilters) -> str:
    """Which events count as conversions: type `conversion`, narrowed by the event
    filters (the active users they are divided by are not narrowed by them)."""
    return " AND ".join(
        [
            f"event_type = {query.bind('conversion', TrackedEventType.CONVERSION.value)}",
            *query.event_filters(filters),
        ]
    )


def conversions(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters = NO_FILTERS,
) -> tuple[ConversionRow, ...]:
    """Per bucket: conversion events, converting users, active users and the rate."""
    starts = bucket_starts(time_range, granularity)
    bitmaps = _fits(_bitmap_bytes(store, scope), len(starts))
    query = WhereBuilder()
    # Active users see only the scope, time and ticketed event; the event filters
    # narrow which conversions count (see the module docstring).
    where = query.where(scope, time_range.start, time_range.end, filters, event_filters=False)
    converted = _converted_condition(query, filters)
    rows = _grouped(
        store,
        scope,
        query,
        where,
        {"bucket": _bucket_key_sql(granularity)},
        {
            "conversions": _Measure(f"count(*) FILTER (WHERE {converted})"),
            "converting_users": _Measure(_distinct_users(bitmaps, converted)),
            "active_users": _Measure(_distinct_users(bitmaps)),
        },
    )
    by_bucket = {_bucket_start(row["bucket"], granularity): row for row in rows}
    result = []
    for start in starts:
        row = by_bucket.get(start)
        count = int(row["conversions"]) if row else 0
        converting = int(row["converting_users"]) if row else 0
        active = int(row["active_users"]) if row else 0
        result.append(
            ConversionRow(start, count, converting, active, converting / active if active else 0.0)
        )
    return tuple(result)


def _revenue_filter(query: WhereBuilder) -> str:
    return " AND ".join(
        [
            f"event_type = {query.bind('conversion', TrackedEventType.CONVERSION.value)}",
            "currency <> ''",
        ]
    )


def _revenue_measures() -> dict[str, _Measure]:
    return {
        "revenue": _Measure("sum(revenue)", "DECIMAL(38,6)"),
        # A conversion without order id is an order of its own.
        "orders": _Measure(
            "count(DISTINCT order_id) FILTER (WHERE order_id <> '')"
            " + count(*) FILTER (WHERE order_id = '')"
        ),
        "tickets": _Measure("CAST(sum(quantity) AS BIGINT)"),
    }


def revenue(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters = NO_FILTERS,
) -> tuple[RevenueRow, ...]:
    """Per bucket and currency: revenue, orders and tickets of conversion events."""
    bucket_starts(time_range, granularity)
    query = WhereBuilder()
    where = query.where(scope, time_range.start, time_range.end, filters)
    where = f"{where} AND {_revenue_filter(query)}"
    rows = _grouped(
        store,
        scope,
        query,
        where,
        {"bucket": _bucket_key_sql(granularity), "currency": "currency"},
        _revenue_measures(),
    )
    rows.sort(key=lambda row: (row["bucket"], row["currency"]))
    return tuple(
        RevenueRow(
            _bucket_start(row["bucket"], granularity),
            row["currency"],
            Decimal(row["revenue"]),
            int(row["orders"]),
            int(row["tickets"]),
        )
        for row in rows
    )


def geography(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    filters: MetricFilters = NO_FILTERS,
) -> tuple[GeoRow, ...]:
    """Per country over the whole range: events, users, revenue by currency.

    No granularity: a map shows one period. Ordered by events, most first.
    """
    bitmaps = _fits(_bitmap_bytes(store, scope), _MAX_COUNTRIES)
    query = WhereBuilder()
    where = query.where(scope, time_range.start, time_range.end, filters)
    counts = _grouped(
        store,
        scope,
        query,
        where,
        {"country_code": "country_code"},
        {"events": _Measure("count(*)"), "users": _Measure(_distinct_users(bitmaps))},
    )
    money_query = WhereBuilder()
    money_where = money_query.where(scope, time_range.start, time_range.end, filters)
    money_where = f"{money_where} AND {_revenue_filter(money_query)}"
    money: dict[str, dict[str, Decimal]] = {}
    for row in _grouped(
        store,
        scope,
        money_query,
        money_where,
        {"country_code": "country_code", "currency": "currency"},
        {"revenue": _Measure("sum(revenue)", "DECIMAL(38,6)")},
    ):
        money.setdefault(row["country_code"], {})[row["currency"]] = Decimal(row["revenue"])
    counts.sort(key=lambda row: (-row["events"], row["country_code"]))
    return tuple(
        GeoRow(
            row["country_code"],
            int(row["events"]),
            int(row["users"]),
            tuple(
                CurrencyAmount(currency, amount)
                for currency, amount in sorted(money.get(row["country_code"], {}).items())
            ),
        )
        for row in counts
    )


def overall_conversion_rate(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    filters: MetricFilters = NO_FILTERS,
) -> float:
    """Converting users / active users, each distinct over the whole range (not a mean
    of bucket rates); 0.0 when nobody was active. Filters work as in `conversions`."""
    bitmaps = _fits(_bitmap_bytes(store, scope), 1)
    query = WhereBuilder()
    where = query.where(scope, time_range.start, time_range.end, filters, event_filters=False)
    rows = _grouped(
        store,
        scope,
        query,
        where,
        {},
        {
            "converting_users": _Measure(
                _distinct_users(bitmaps, _converted_condition(query, filters))
            ),
            "active_users": _Measure(_distinct_users(bitmaps)),
        },
    )
    active = int(rows[0]["active_users"] or 0) if rows else 0
    return int(rows[0]["converting_users"] or 0) / active if active else 0.0
