"""A Pinot backend for the query and aggregation services: the metrics of
`services.query.metrics`, answered by Pinot SQL through pinotdb.

Each public method has the signature of the metrics function of the same name without
its `store` argument and returns the same dataclasses, so a servicer switches backends
by calling `backend.event_counts(scope, ...)` instead of `metrics.event_counts(store,
scope, ...)`. Definitions are the ones in `services.query.metrics` (UTC buckets, ISO
weeks, actors = user else anonymous id, conversions, revenue per currency), except:

- distinct users are HyperLogLog estimates (`DISTINCTCOUNTHLL`, served from the
  star-tree; ~6.5 % standard error with Pinot's default log2m=8, and small counts can be
  off by one or two). `distinct="DISTINCTCOUNTSMARTHLL"` counts exactly up to 100k
  values per group instead, without the star-tree;
- revenue sums are `SUM(revenue_micros)`, doubles in Pinot: exact while a bucket's sum
  stays under 2^53 micros (~9 billion currency units).

Every query: the caller's tenant as a filter (`Scope.all_tenants()` alone omits it, and
then distinct users are counted per tenant and added, as tenants' users are distinct
people), the table's time column bounds, and `timeoutMs` as a query option. Values are
rendered as SQL literals by `literal` (the broker API has no bind parameters). The
multi-stage engine is asked for only by `cohort_retention`, the one query with a join;
funnels use `funnelMaxStep` (Pinot ≥ 1.1; 0.11 answers "Unsupported function").
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final
from urllib.parse import urlsplit

from services.events.model import TrackedEventType
from services.pinot.config import DAY_MICROS, HOUR_MICROS
from services.platform.errors import AnalyticsError, StatusCode
from services.query.metrics import (
    NO_FILTERS,
    ActiveUsers,
    ActiveUsersRow,
    ConversionRow,
    CurrencyAmount,
    EventCountRow,
    GeoRow,
    Granularity,
    MetricFilters,
    RevenueRow,
    Scope,
    TimeRange,
    bucket_floor,
    bucket_starts,
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)
_CONVERSION: Final = TrackedEventType.CONVERSION.value
_DISTINCT_FUNCTIONS: Final = ("DISTINCTCOUNTHLL", "DISTINCTCOUNTSMARTHLL")


def literal(value: str | int) -> str:
    """A Pinot SQL literal: integers as digits, strings single-quoted with `'` doubled.

    Control characters are refused: ids and names never carry them, and the parser's
    handling of them is not something to bet tenant isolation on.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"no Pinot literal for {type(value).__name__}")
    if isinstance(value, int):
        return str(int(value))
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError("control characters are not allowed in query values")
    return "'" + value.replace("'", "''") + "'"


def _micros(moment: datetime) -> int:
    return (moment.astimezone(UTC) - _EPOCH) // _MICRO


def _from_micros(value: float | int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


@dataclass(frozen=True, slots=True)
class FunnelStepCount:
    step: int  # 1-based
    event_name: str
    users: int  # actors who reached at least this step, in order, within the window


@dataclass(frozen=True, slots=True)
class CohortRow:
    cohort_week: datetime  # Monday 00:00 UTC of the actors' first week in the range
    weeks_later: int  # 0 = the cohort week itself
    users: int


class PinotQueryError(AnalyticsError):
    pass


def _error(exc: Exception) -> AnalyticsError:
    text = str(exc)
    if "Timeout" in text or "timed out" in text.lower() or "errorCode': 250" in text:
        return PinotQueryError(
            StatusCode.DEADLINE_EXCEEDED, "QUERY_TIMEOUT", f"Pinot: {text[:500]}"
        )
    if "SQLParsingError" in text or "Unsupported function" in text:
        return PinotQueryError(
            StatusCode.UNIMPLEMENTED,
            "NOT_IMPLEMENTED",
            "this Pinot cluster cannot run the query (funnel functions need Pinot >= 1.1, "
            f"joins the multi-stage engine): {text[:300]}",
        )
    if "onnect" in text or "429" in text or "BrokerResourceMissing" in text:
        return PinotQueryError(
            StatusCode.UNAVAILABLE,
            "DEPENDENCY_UNAVAILABLE",
            f"Pinot broker unavailable: {text[:500]}",
            retry_after_seconds=2.0,
        )
    return PinotQueryError(StatusCode.INTERNAL, "INTERNAL", f"Pinot query failed: {text[:500]}")


class PinotMetrics:
    """Metrics over the Pinot REALTIME table of tracked events; thread-safe."""

    def __init__(
        self,
        broker_url: str,
        table: str = "tracked_events",
        timeout_ms: int = 10_000,
        *,
        distinct: str = "DISTINCTCOUNTHLL",
        execute: Callable[[str, str], list[Sequence[Any]]] | None = None,
    ) -> None:
        if distinct not in _DISTINCT_FUNCTIONS:
            raise ValueError(f"distinct must be one of {_DISTINCT_FUNCTIONS}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
            raise ValueError(f"not a plain table name: {table!r}")
        self.table = table
        self.timeout_ms = timeout_ms
        self.distinct = distinct
        self._broker_url = broker_url
        self._execute = execute or self._pinotdb_execute
        self._connection: Any = None
        # The last statements run, newest last (tests and debugging look at them).
        self.statements: list[str] = []

    # --- transport ------------------------------------------------------------------

    def _pinotdb_execute(self, sql: str, query_options: str) -> list[Sequence[Any]]:
        import pinotdb  # type: ignore[import-untyped]

        if self._connection is None:
            parts = urlsplit(self._broker_url)
            self._connection = pinotdb.connect(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 8099,
                path="/query/sql",
                scheme=parts.scheme or "http",
                timeout=self.timeout_ms / 1000 + 5,
            )
        cursor = self._connection.cursor()
        try:
            cursor.execute(sql, queryOptions=query_options)
            return list(cursor.fetchall())
        finally:
            cursor.close()

    def query(self, sql: str, *, multistage: bool = False) -> list[Sequence[Any]]:
        """Runs one statement with the timeout (and the multi-stage engine if asked)."""
        options = f"timeoutMs={self.timeout_ms}"
        if multistage:
            options += ";useMultistageEngine=true"
        self.statements.append(sql)
        del self.statements[:-50]
        try:
            return self._execute(sql, options)
        except AnalyticsError:
            raise
        except Exception as exc:  # pinotdb raises DatabaseError / httpx errors
            raise _error(exc) from exc

    # --- SQL pieces -----------------------------------------------------------------

    def _where(
        self,
        scope: Scope,
        start: datetime,
        end: datetime,
        filters: MetricFilters = NO_FILTERS,
        *,
        event_filters: bool = True,
    ) -> str:
        clauses = []
        if scope.tenant_id is not None:
            clauses.append(f"tenant_id = {literal(scope.tenant_id)}")
        start_us, end_us = _micros(start), _micros(end)
        # Filters on star-tree dimensions when the range allows: aligned to whole days
        # or hours, the range is exactly a set of occurred_day / occurred_hour values.
        if start_us % DAY_MICROS == 0 and end_us % DAY_MICROS == 0:
            first, last = start_us // DAY_MICROS, end_us // DAY_MICROS
            clauses.append(f"occurred_day >= {first} AND occurred_day < {last}")
        elif start_us % HOUR_MICROS == 0 and end_us % HOUR_MICROS == 0:
            clauses.append(
                f"occurred_hour >= {start_us // HOUR_MICROS}"
                f" AND occurred_hour < {end_us // HOUR_MICROS}"
            )
        else:
            clauses.append(f"occurred_at >= {start_us} AND occurred_at < {end_us}")
        if filters.ticketed_event_id is not None:
            clauses.append(f"ticketed_event_id = {literal(filters.ticketed_event_id)}")
        if event_filters:
            clauses.extend(self._event_filters(filters))
        return " AND ".join(clauses)

    @staticmethod
    def _event_filters(filters: MetricFilters) -> list[str]:
        clauses = []
        if filters.event_name is not None:
            clauses.append(f"event_name = {literal(filters.event_name)}")
        if filters.event_type is not None:
            clauses.append(f"event_type = {literal(filters.event_type.value)}")
        return clauses

    @staticmethod
    def _bucket(granularity: Granularity, *, additive: bool) -> str:
        """Bucket key expression. Hours and days are star-tree dimensions; weeks and
        months of additive measures are summed from days here (so the star-tree still
        serves them); other cases truncate the time column."""
        if granularity is Granularity.HOUR:
            return "occurred_hour"
        if granularity is Granularity.DAY or (
            additive and granularity in (Granularity.WEEK, Granularity.MONTH)
        ):
            return "occurred_day"
        unit = {"minute": "MINUTE", "week": "WEEK", "month": "MONTH"}[granularity.value]
        return f"DATETRUNC('{unit}', occurred_at, 'MICROSECONDS')"

    @staticmethod
    def _bucket_start(key: Any, expr: str, granularity: Granularity) -> datetime:
        if expr == "occurred_hour":
            moment = _from_micros(int(key) * HOUR_MICROS)
        elif expr == "occurred_day":
            moment = _from_micros(int(key) * DAY_MICROS)
        else:
            moment = _from_micros(int(key))
        return bucket_floor(moment, granularity)

    def _users(self) -> str:
        # Events with neither id share the tenant's "<tenant>|a:" key: it is not a user.
        return f"{self.distinct}(actor_key) - MAX(no_actor)"

    def _from(self) -> str:
        return self.table

    # --- metrics --------------------------------------------------------------------

    def event_counts(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        filters: MetricFilters = NO_FILTERS,
    ) -> tuple[EventCountRow, ...]:
        bucket_starts(time_range, granularity)  # refuses absurd bucket counts early
        bucket = self._bucket(granularity, additive=True)
        where = self._where(scope, time_range.start, time_range.end, filters)
        rows = self.query(
            f"SELECT {bucket}, event_name, event_type, COUNT(*) FROM {self._from()}"
            f" WHERE {where} GROUP BY {bucket}, event_name, event_type LIMIT 1000000"
        )
        sums: dict[tuple[datetime, str, str], int] = defaultdict(int)
        for key, name, event_type, count in rows:
            sums[(self._bucket_start(key, bucket, granularity), name, event_type)] += int(count)
        return tuple(
            EventCountRow(start, name, TrackedEventType(event_type), count)
            for (start, name, event_type), count in sorted(sums.items())
        )

    def _users_per_bucket(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        where: str,
    ) -> dict[datetime, int]:
        bucket = self._bucket(granularity, additive=False)
        tenant = "" if scope.tenant_id is not None else ", tenant_id"
        rows = self.query(
            f"SELECT {bucket}{tenant}, {self._users()} FROM {self._from()} WHERE {where}"
            f" GROUP BY {bucket}{tenant} LIMIT 1000000"
        )
        users: dict[datetime, int] = defaultdict(int)
        for row in rows:
            users[self._bucket_start(row[0], bucket, granularity)] += max(0, round(row[-1]))
        return users

    def _users_total(self, scope: Scope, where: str) -> int:
        if scope.tenant_id is not None:
            rows = self.query(f"SELECT {self._users()} FROM {self._from()} WHERE {where}")
        else:
            rows = self.query(
                f"SELECT tenant_id, {self._users()} FROM {self._from()} WHERE {where}"
                " GROUP BY tenant_id LIMIT 1000000"
            )
        return sum(
            max(0, round(row[-1])) for row in rows if row[-1] is not None and not _nan(row[-1])
        )

    def active_users(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        filters: MetricFilters = NO_FILTERS,
    ) -> ActiveUsers:
        starts = bucket_starts(time_range, granularity)
        where = self._where(scope, time_range.start, time_range.end, filters)
        per_bucket = self._users_per_bucket(scope, time_range, granularity, where)
        end = time_range.end
        trailing = {
            name: self._users_total(
                scope, self._where(scope, end - timedelta(days=days), end, filters)
            )
            for name, days in (("dau", 1), ("wau", 7), ("mau", 30))
        }
        return ActiveUsers(
            buckets=tuple(ActiveUsersRow(s, per_bucket.get(s, 0)) for s in starts),
            as_of=end,
            dau=trailing["dau"],
            wau=trailing["wau"],
            mau=trailing["mau"],
        )

    def conversions(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        filters: MetricFilters = NO_FILTERS,
    ) -> tuple[ConversionRow, ...]:
        starts = bucket_starts(time_range, granularity)
        base = self._where(scope, time_range.start, time_range.end, filters, event_filters=False)
        active = self._users_per_bucket(scope, time_range, granularity, base)
        converted_where = " AND ".join(
            [base, f"event_type = {literal(_CONVERSION)}", *self._event_filters(filters)]
        )
        converting = self._users_per_bucket(scope, time_range, granularity, converted_where)
        bucket = self._bucket(granularity, additive=True)
        counts: dict[datetime, int] = defaultdict(int)
        for key, count in self.query(
            f"SELECT {bucket}, COUNT(*) FROM {self._from()} WHERE {converted_where}"
            f" GROUP BY {bucket} LIMIT 1000000"
        ):
            counts[self._bucket_start(key, bucket, granularity)] += int(count)
        result = []
        for start in starts:
            users = active.get(start, 0)
            buyers = min(converting.get(start, 0), users) if users else converting.get(start, 0)
            result.append(
                ConversionRow(
                    start, counts.get(start, 0), buyers, users, buyers / users if users else 0.0
                )
            )
        return tuple(result)

    def overall_conversion_rate(
        self, scope: Scope, time_range: TimeRange, filters: MetricFilters = NO_FILTERS
    ) -> float:
        base = self._where(scope, time_range.start, time_range.end, filters, event_filters=False)
        active = self._users_total(scope, base)
        converted_where = " AND ".join(
            [base, f"event_type = {literal(_CONVERSION)}", *self._event_filters(filters)]
        )
        converting = self._users_total(scope, converted_where)
        return min(1.0, converting / active) if active else 0.0

    def revenue(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        filters: MetricFilters = NO_FILTERS,
    ) -> tuple[RevenueRow, ...]:
        bucket_starts(time_range, granularity)
        # Orders are distinct, so weeks and months are not sums of days: truncate.
        bucket = self._bucket(granularity, additive=False)
        where = " AND ".join(
            [
                self._where(scope, time_range.start, time_range.end, filters),
                f"event_type = {literal(_CONVERSION)}",
                "currency <> ''",
            ]
        )
        rows = self.query(
            f"SELECT {bucket}, currency, SUM(revenue_micros), DISTINCTCOUNT(order_key),"
            f" SUM(quantity) FROM {self._from()} WHERE {where}"
            f" GROUP BY {bucket}, currency LIMIT 1000000"
        )
        out = [
            RevenueRow(
                self._bucket_start(key, bucket, granularity),
                currency,
                _money(micros),
                int(orders),
                int(tickets),
            )
            for key, currency, micros, orders, tickets in rows
        ]
        return tuple(sorted(out, key=lambda r: (r.bucket_start, r.currency)))

    def geography(
        self, scope: Scope, time_range: TimeRange, filters: MetricFilters = NO_FILTERS
    ) -> tuple[GeoRow, ...]:
        where = self._where(scope, time_range.start, time_range.end, filters)
        tenant = "" if scope.tenant_id is not None else ", tenant_id"
        events: dict[str, int] = defaultdict(int)
        users: dict[str, int] = defaultdict(int)
        for row in self.query(
            f"SELECT country_code{tenant}, COUNT(*), {self._users()} FROM {self._from()}"
            f" WHERE {where} GROUP BY country_code{tenant} LIMIT 1000000"
        ):
            events[row[0]] += int(row[-2])
            users[row[0]] += max(0, round(row[-1]))
        money: dict[str, dict[str, Decimal]] = defaultdict(dict)
        for country, currency, micros in self.query(
            f"SELECT country_code, currency, SUM(revenue_micros) FROM {self._from()}"
            f" WHERE {where} AND event_type = {literal(_CONVERSION)} AND currency <> ''"
            " GROUP BY country_code, currency LIMIT 1000000"
        ):
            money[country][currency] = _money(micros)
        return tuple(
            GeoRow(
                country,
                count,
                users[country],
                tuple(CurrencyAmount(c, a) for c, a in sorted(money.get(country, {}).items())),
            )
            for country, count in sorted(events.items(), key=lambda item: (-item[1], item[0]))
        )

    # --- analyses beyond the metrics module ------------------------------------------

    def funnel_sql(
        self, scope: Scope, time_range: TimeRange, steps: Sequence[str], window: timedelta
    ) -> str:
        """Per actor, the furthest step reached in order within `window` (funnelMaxStep);
        the histogram over actors is summed by `funnel`."""
        if not 2 <= len(steps) <= 20:
            raise ValueError("a funnel has 2 to 20 steps")
        where = self._where(scope, time_range.start, time_range.end)
        names = ", ".join(literal(step) for step in steps)
        predicates = ", ".join(f"event_name = {literal(step)}" for step in steps)
        return (
            f"SELECT actor_key, funnelMaxStep(occurred_at, {window // _MICRO}, {len(steps)},"
            f" {predicates}) FROM {self._from()}"
            f" WHERE {where} AND event_name IN ({names}) AND no_actor = 0"
            " GROUP BY actor_key LIMIT 10000000"
        )

    def funnel(
        self, scope: Scope, time_range: TimeRange, steps: Sequence[str], window: timedelta
    ) -> tuple[FunnelStepCount, ...]:
        reached = [0] * (len(steps) + 1)
        for _, step in self.query(self.funnel_sql(scope, time_range, steps, window)):
            reached[int(step)] += 1
        # Reaching step k means reaching every step before it.
        at_least = [sum(reached[k:]) for k in range(len(reached))]
        return tuple(
            FunnelStepCount(index, name, at_least[index]) for index, name in enumerate(steps, 1)
        )

    def cohort_retention_sql(self, scope: Scope, time_range: TimeRange) -> str:
        """Weekly cohorts by first activity in the range and their activity in later
        weeks: a join of two aggregations, hence the multi-stage engine."""
        where = self._where(scope, time_range.start, time_range.end)
        # 1970-01-01 was a Thursday: shift by 3 days so weeks start on Monday (ISO).
        week = "FLOOR((occurred_day + 3) / 7)"
        return (
            "SELECT firsts.cohort, activity.week - firsts.cohort AS weeks_later,"
            " COUNT(DISTINCT activity.actor_key) AS users"
            f" FROM (SELECT actor_key, MIN({week}) AS cohort FROM {self._from()}"
            f" WHERE {where} AND no_actor = 0 GROUP BY actor_key) AS firsts"
            f" JOIN (SELECT actor_key, {week} AS week FROM {self._from()}"
            f" WHERE {where} AND no_actor = 0 GROUP BY actor_key, {week}) AS activity"
            " ON firsts.actor_key = activity.actor_key"
            " GROUP BY firsts.cohort, activity.week - firsts.cohort"
            " ORDER BY 1, 2 LIMIT 100000"
        )

    def cohort_retention(self, scope: Scope, time_range: TimeRange) -> tuple[CohortRow, ...]:
        rows = self.query(self.cohort_retention_sql(scope, time_range), multistage=True)
        return tuple(
            CohortRow(_from_micros((int(cohort) * 7 - 3) * DAY_MICROS), int(later), int(users))
            for cohort, later, users in rows
        )


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _money(micros: Any) -> Decimal:
    return Decimal(round(float(micros))).scaleb(-6) if micros is not None else Decimal(0)


__all__ = [
    "CohortRow",
    "FunnelStepCount",
    "PinotMetrics",
    "PinotQueryError",
    "literal",
]
