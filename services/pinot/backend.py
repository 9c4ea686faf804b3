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

Tenant isolation has one place: `_select` is the only code that writes `FROM <table>`,
and it always writes `WHERE tenant_id = <caller's tenant> AND (<the rest>)`, from the
`Scope` it is given (no default). The rest is parenthesised, so nothing in it can widen
the tenant condition. `Scope.all_tenants()` (which `convert.scope` gives only to
platform-admin credentials) alone omits the condition; then distinct users are counted
per tenant and added, as tenants' users are distinct people. Before a statement is sent,
`_run` checks again that every `FROM <table>` carries that scope's condition, so a future
query written around `_select` fails loudly instead of reading other tenants' rows.

Every query also bounds the table's time column and sends `timeoutMs` as a query option
(the broker's JSON `queryOptions` field). Values are rendered as SQL literals by
`literal` (the broker API has no bind parameters), and the statement reaches the broker
verbatim (see `_pinotdb_execute`). The multi-stage engine is asked for only by
`cohort_retention`, the one query with a join; funnels use `funnelMaxStep` (Pinot ≥ 1.1;
0.11 refuses the function).

Errors become `AnalyticsError`s with the gRPC status a client can act on (`pinot_error`):
broker unreachable or overloaded → UNAVAILABLE with retry advice; Pinot's timeouts →
DEADLINE_EXCEEDED; statements Pinot cannot compile or values it cannot take →
INVALID_ARGUMENT (`QUERY_REFUSED`); anything else → INTERNAL.
"""

from __future__ import annotations

import math
import re
import threading
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


class PinotBrokerError(Exception):
    """What the broker answered instead of rows: its HTTP status and the `errorCode`s of
    the response's `exceptions` (Pinot's QueryException codes)."""

    def __init__(
        self, message: str, *, status_code: int | None = None, error_codes: Sequence[int] = ()
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_codes = tuple(error_codes)


# Pinot QueryException codes (pinot-common, 0.11 and later), grouped by what a client
# can do about them.
_TIMEOUT_CODES: Final = frozenset(
    {
        170,  # COMBINE_SEGMENT_PLAN_TIMEOUT
        240,  # QUERY_SCHEDULING_TIMEOUT
        250,  # EXECUTION_TIMEOUT
        400,  # BROKER_TIMEOUT
    }
)
_UNAVAILABLE_CODES: Final = frozenset(
    {
        190,  # TABLE_DOES_NOT_EXIST (not applied yet: `bilten-analytics pinot apply`)
        210,  # SERVER_SHUTTING_DOWN
        211,  # SERVER_OUT_OF_CAPACITY
        230,  # SERVER_TABLE_MISSING
        235,  # SERVER_SEGMENT_MISSING
        305,  # BROKER_SEGMENT_UNAVAILABLE
        410,  # BROKER_RESOURCE_MISSING (the table's routing is not built yet)
        420,  # BROKER_INSTANCE_MISSING
        425,  # BROKER_REQUEST_SEND
        427,  # SERVER_NOT_RESPONDING
        429,  # TOO_MANY_REQUESTS (table quota)
    }
)
_REFUSED_CODES: Final = frozenset(
    {
        150,  # SQL_PARSING (includes functions this Pinot does not know)
        700,  # QUERY_VALIDATION
        710,  # UNKNOWN_COLUMN
        720,  # QUERY_PLANNING
    }
)
_RETRY_SECONDS: Final = 2.0


def _codes_in(text: str) -> tuple[int, ...]:
    # pinotdb's DatabaseError text is the pformat of the response's exceptions.
    return tuple(int(code) for code in re.findall(r"'errorCode': (\d+)", text))


def pinot_error(exc: Exception) -> AnalyticsError:
    """The AnalyticsError (hence gRPC status) for a failed Pinot statement."""
    import httpx

    text = str(exc)
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        # The broker took the statement but did not answer within timeoutMs + 5 s.
        return PinotQueryError(
            StatusCode.DEADLINE_EXCEEDED, "QUERY_TIMEOUT", f"Pinot did not answer in time: {text}"
        )
    if isinstance(exc, httpx.TransportError):
        return PinotQueryError(
            StatusCode.UNAVAILABLE,
            "DEPENDENCY_UNAVAILABLE",
            f"Pinot broker unreachable ({type(exc).__name__}: {text[:200]}); "
            f"retry in {_RETRY_SECONDS:.0f} s",
            retry_after_seconds=_RETRY_SECONDS,
        )
    codes = exc.error_codes if isinstance(exc, PinotBrokerError) else _codes_in(text)
    status = exc.status_code if isinstance(exc, PinotBrokerError) else None
    if status is not None and (status == 429 or status >= 500):
        # An overloaded or restarting broker (or the proxy in front of it); checked
        # first, as pinotdb words a body without server counts as "timed out".
        return PinotQueryError(
            StatusCode.UNAVAILABLE,
            "DEPENDENCY_UNAVAILABLE",
            f"Pinot broker answered HTTP {status}; retry in {_RETRY_SECONDS:.0f} s",
            retry_after_seconds=_RETRY_SECONDS,
        )
    if set(codes) & _TIMEOUT_CODES or (not codes and "timed out" in text.lower()):
        return PinotQueryError(
            StatusCode.DEADLINE_EXCEEDED,
            "QUERY_TIMEOUT",
            f"Pinot query timed out (BILTEN_PINOT_QUERY_TIMEOUT_MS): {text[:400]}",
        )
    if set(codes) & _UNAVAILABLE_CODES or "BrokerResourceMissing" in text:
        return PinotQueryError(
            StatusCode.UNAVAILABLE,
            "DEPENDENCY_UNAVAILABLE",
            f"Pinot cannot serve the table now: {text[:400]}; retry in {_RETRY_SECONDS:.0f} s",
            retry_after_seconds=_RETRY_SECONDS,
        )
    if set(codes) & _REFUSED_CODES or "Unsupported function" in text:
        return PinotQueryError(
            StatusCode.INVALID_ARGUMENT,
            "QUERY_REFUSED",
            "this Pinot cluster cannot answer the request (funnel functions need Pinot >= 1.1, "
            f"joins the multi-stage engine): {text[:300]}",
        )
    return PinotQueryError(StatusCode.INTERNAL, "INTERNAL", f"Pinot query failed: {text[:500]}")


def _refused(error: ValueError) -> AnalyticsError:
    return PinotQueryError(StatusCode.INVALID_ARGUMENT, "QUERY_REFUSED", str(error))


_LITERAL: Final = re.compile(r"'(?:[^']|'')*'")


class _Verbatim:
    """A pinotdb parameter that formats as the statement itself.

    pinotdb runs every statement through `escape_operation(sql) % parameters`, which
    rewrites `%%` to `%` and chokes on `%(`: a tenant id `a%%b` would be sent as `a%b`,
    another tenant's id. Passing the whole statement as the one parameter of `%(sql)s`
    keeps it byte for byte (`escape_parameter` returns objects other than str, bool and
    sequences unchanged, and `%s` formats them with `str`).
    """

    __slots__ = ("sql",)

    def __init__(self, sql: str) -> None:
        self.sql = sql

    def __str__(self) -> str:
        return self.sql


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
        session: Any = None,
    ) -> None:
        """`execute(sql, query_options)` replaces the broker (tests capture statements);
        `session`: the httpx.Client pinotdb posts with (default: its own)."""
        if distinct not in _DISTINCT_FUNCTIONS:
            raise ValueError(f"distinct must be one of {_DISTINCT_FUNCTIONS}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
            raise ValueError(f"not a plain table name: {table!r}")
        self.table = table
        self.timeout_ms = timeout_ms
        self.distinct = distinct
        self._broker_url = broker_url
        self._execute = execute or self._pinotdb_execute
        self._session = session
        self._connection: Any = None
        self._connect_lock = threading.Lock()
        # The last statements run, newest last (tests and debugging look at them).
        self.statements: list[str] = []

    # --- transport ------------------------------------------------------------------

    def _connect(self) -> Any:
        import pinotdb  # type: ignore[import-untyped]

        with self._connect_lock:
            if self._connection is None:
                parts = urlsplit(self._broker_url)
                self._connection = pinotdb.connect(
                    host=parts.hostname or "127.0.0.1",
                    port=parts.port or 8099,
                    path="/query/sql",
                    scheme=parts.scheme or "http",
                    # The broker enforces timeoutMs; the HTTP wait is a backstop for a
                    # broker that stops answering altogether.
                    timeout=self.timeout_ms / 1000 + 5,
                    session=self._session,
                )
            return self._connection

    def _pinotdb_execute(self, sql: str, query_options: str) -> list[Sequence[Any]]:
        from pinotdb import exceptions as pinot_exceptions

        cursor = self._connect().cursor()
        try:
            cursor.execute("%(sql)s", {"sql": _Verbatim(sql)}, queryOptions=query_options)
            return list(cursor.fetchall())
        except pinot_exceptions.Error as exc:
            # Classify on the broker's answer itself, not on pinotdb's message text.
            raw = cursor.raw_query_response or {}
            body = raw.get("response")
            found = body.get("exceptions", []) if isinstance(body, dict) else []
            codes = [int(e["errorCode"]) for e in found if isinstance(e, dict) and "errorCode" in e]
            raise PinotBrokerError(
                str(exc), status_code=raw.get("status_code"), error_codes=codes
            ) from exc
        finally:
            cursor.close()

    def _run(self, scope: Scope, sql: str, *, multistage: bool = False) -> list[Sequence[Any]]:
        """Runs one statement of `_select` with the timeout (and the multi-stage engine
        if asked), after checking it is confined to `scope`."""
        self._check_confined(scope, sql)
        options = f"timeoutMs={self.timeout_ms}"
        if multistage:
            options += ";useMultistageEngine=true"
        self.statements.append(sql)
        del self.statements[:-50]
        try:
            return self._execute(sql, options)
        except AnalyticsError:
            raise
        except Exception as exc:  # pinotdb / httpx errors, PinotBrokerError
            raise pinot_error(exc) from exc

    def _check_confined(self, scope: Scope, sql: str) -> None:
        """Every read of the table carries the scope's tenant condition (literals
        masked first, so a value that spells SQL can neither add nor fake one)."""
        if scope.tenant_id is None:
            return
        masked = _LITERAL.sub("?", sql)
        reads = re.findall(rf"\bFROM\s+{self.table}\b", masked, re.IGNORECASE)
        guarded = masked.count(f"FROM {self.table} WHERE tenant_id = ? AND (")
        tenants = set(
            re.findall(rf"FROM {self.table} WHERE tenant_id = ('(?:[^']|'')*') AND \(", sql)
        )
        if not reads or len(reads) != guarded or tenants != {literal(scope.tenant_id)}:
            raise AssertionError(f"refusing a Pinot statement not confined to the tenant: {sql}")

    # --- SQL: the one place a statement is built -----------------------------------

    def _select(
        self,
        scope: Scope,
        columns: str,
        conditions: Sequence[str],
        group_by: str = "",
        *,
        limit: int | None = 1_000_000,
    ) -> str:
        """`SELECT columns FROM table WHERE <tenant> AND (conditions) [GROUP BY] [LIMIT]`.

        The tenant condition comes from `scope` and nothing else, and is written first
        and outside the parentheses, so no condition can widen it."""
        rest = " AND ".join(conditions) or "TRUE"
        if scope.tenant_id is not None:
            where = f"tenant_id = {literal(scope.tenant_id)} AND ({rest})"
        else:
            where = f"({rest})"
        sql = f"SELECT {columns} FROM {self.table} WHERE {where}"
        if group_by:
            sql += f" GROUP BY {group_by}"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return sql

    def _conditions(
        self,
        start: datetime,
        end: datetime,
        filters: MetricFilters = NO_FILTERS,
        *,
        event_filters: bool = True,
    ) -> list[str]:
        """Time range and filters (never the tenant: `_select` adds it)."""
        clauses = []
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
        return clauses

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

    # --- metrics --------------------------------------------------------------------
    # Each public metric refuses values Pinot cannot take (control characters in a
    # filter, absurd bucket counts) as INVALID_ARGUMENT, like a bad request field.

    def event_counts(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        filters: MetricFilters = NO_FILTERS,
    ) -> tuple[EventCountRow, ...]:
        try:
            bucket_starts(time_range, granularity)  # refuses absurd bucket counts early
            bucket = self._bucket(granularity, additive=True)
            sql = self._select(
                scope,
                f"{bucket}, event_name, event_type, COUNT(*)",
                self._conditions(time_range.start, time_range.end, filters),
                f"{bucket}, event_name, event_type",
            )
        except ValueError as error:
            raise _refused(error) from error
        sums: dict[tuple[datetime, str, str], int] = defaultdict(int)
        for key, name, event_type, count in self._run(scope, sql):
            sums[(self._bucket_start(key, bucket, granularity), name, event_type)] += int(count)
        return tuple(
            EventCountRow(start, name, TrackedEventType(event_type), count)
            for (start, name, event_type), count in sorted(sums.items())
        )

    def _users_per_bucket(
        self, scope: Scope, granularity: Granularity, conditions: Sequence[str]
    ) -> dict[datetime, int]:
        bucket = self._bucket(granularity, additive=False)
        tenant = "" if scope.tenant_id is not None else ", tenant_id"
        sql = self._select(
            scope, f"{bucket}{tenant}, {self._users()}", conditions, f"{bucket}{tenant}"
        )
        users: dict[datetime, int] = defaultdict(int)
        for row in self._run(scope, sql):
            users[self._bucket_start(row[0], bucket, granularity)] += _count(row[-1])
        return users

    def _users_total(self, scope: Scope, conditions: Sequence[str]) -> int:
        if scope.tenant_id is not None:
            sql = self._select(scope, self._users(), conditions, limit=None)
        else:
            sql = self._select(scope, f"tenant_id, {self._users()}", conditions, "tenant_id")
        return sum(_count(row[-1]) for row in self._run(scope, sql))

    def active_users(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        filters: MetricFilters = NO_FILTERS,
    ) -> ActiveUsers:
        try:
            starts = bucket_starts(time_range, granularity)
            conditions = self._conditions(time_range.start, time_range.end, filters)
            end = time_range.end
            windows = {
                name: self._conditions(end - timedelta(days=days), end, filters)
                for name, days in (("dau", 1), ("wau", 7), ("mau", 30))
            }
        except ValueError as error:
            raise _refused(error) from error
        per_bucket = self._users_per_bucket(scope, granularity, conditions)
        trailing = {name: self._users_total(scope, where) for name, where in windows.items()}
        return ActiveUsers(
            buckets=tuple(ActiveUsersRow(s, per_bucket.get(s, 0)) for s in starts),
            as_of=end,
            dau=trailing["dau"],
            wau=trailing["wau"],
            mau=trailing["mau"],
        )

    def _converted(self, base: Sequence[str], filters: MetricFilters) -> list[str]:
        return [*base, f"event_type = {literal(_CONVERSION)}", *self._event_filters(filters)]

    def conversions(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        filters: MetricFilters = NO_FILTERS,
    ) -> tuple[ConversionRow, ...]:
        try:
            starts = bucket_starts(time_range, granularity)
            base = self._conditions(time_range.start, time_range.end, filters, event_filters=False)
            converted = self._converted(base, filters)
        except ValueError as error:
            raise _refused(error) from error
        active = self._users_per_bucket(scope, granularity, base)
        converting = self._users_per_bucket(scope, granularity, converted)
        bucket = self._bucket(granularity, additive=True)
        counts: dict[datetime, int] = defaultdict(int)
        for key, count in self._run(
            scope, self._select(scope, f"{bucket}, COUNT(*)", converted, bucket)
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
        try:
            base = self._conditions(time_range.start, time_range.end, filters, event_filters=False)
            converted = self._converted(base, filters)
        except ValueError as error:
            raise _refused(error) from error
        active = self._users_total(scope, base)
        converting = self._users_total(scope, converted)
        return min(1.0, converting / active) if active else 0.0

    def revenue(
        self,
        scope: Scope,
        time_range: TimeRange,
        granularity: Granularity,
        filters: MetricFilters = NO_FILTERS,
    ) -> tuple[RevenueRow, ...]:
        try:
            bucket_starts(time_range, granularity)
            # Orders are distinct, so weeks and months are not sums of days: truncate.
            bucket = self._bucket(granularity, additive=False)
            sql = self._select(
                scope,
                f"{bucket}, currency, SUM(revenue_micros), DISTINCTCOUNT(order_key), SUM(quantity)",
                [
                    *self._conditions(time_range.start, time_range.end, filters),
                    f"event_type = {literal(_CONVERSION)}",
                    "currency <> ''",
                ],
                f"{bucket}, currency",
            )
        except ValueError as error:
            raise _refused(error) from error
        out = [
            RevenueRow(
                self._bucket_start(key, bucket, granularity),
                currency,
                _money(micros),
                int(orders),
                int(tickets),
            )
            for key, currency, micros, orders, tickets in self._run(scope, sql)
        ]
        return tuple(sorted(out, key=lambda r: (r.bucket_start, r.currency)))

    def geography(
        self, scope: Scope, time_range: TimeRange, filters: MetricFilters = NO_FILTERS
    ) -> tuple[GeoRow, ...]:
        try:
            conditions = self._conditions(time_range.start, time_range.end, filters)
        except ValueError as error:
            raise _refused(error) from error
        tenant = "" if scope.tenant_id is not None else ", tenant_id"
        events: dict[str, int] = defaultdict(int)
        users: dict[str, int] = defaultdict(int)
        counted = self._select(
            scope,
            f"country_code{tenant}, COUNT(*), {self._users()}",
            conditions,
            f"country_code{tenant}",
        )
        for row in self._run(scope, counted):
            events[row[0]] += int(row[-2])
            users[row[0]] += _count(row[-1])
        money: dict[str, dict[str, Decimal]] = defaultdict(dict)
        paid = self._select(
            scope,
            "country_code, currency, SUM(revenue_micros)",
            [*conditions, f"event_type = {literal(_CONVERSION)}", "currency <> ''"],
            "country_code, currency",
        )
        for country, currency, micros in self._run(scope, paid):
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
    # Not served to clients on Pinot 0.11 (docs/streaming.md): the query service answers
    # funnels and cohorts from the embedded store.

    def funnel_sql(
        self, scope: Scope, time_range: TimeRange, steps: Sequence[str], window: timedelta
    ) -> str:
        """Per actor, the furthest step reached in order within `window` (funnelMaxStep);
        the histogram over actors is summed by `funnel`."""
        if not 2 <= len(steps) <= 20:
            raise ValueError("a funnel has 2 to 20 steps")
        names = ", ".join(literal(step) for step in steps)
        predicates = ", ".join(f"event_name = {literal(step)}" for step in steps)
        return self._select(
            scope,
            f"actor_key, funnelMaxStep(occurred_at, {window // _MICRO}, {len(steps)},"
            f" {predicates})",
            [
                *self._conditions(time_range.start, time_range.end),
                f"event_name IN ({names})",
                "no_actor = 0",
            ],
            "actor_key",
            limit=10_000_000,
        )

    def funnel(
        self, scope: Scope, time_range: TimeRange, steps: Sequence[str], window: timedelta
    ) -> tuple[FunnelStepCount, ...]:
        try:
            sql = self.funnel_sql(scope, time_range, steps, window)
        except ValueError as error:
            raise _refused(error) from error
        reached = [0] * (len(steps) + 1)
        for _, step in self._run(scope, sql):
            reached[int(step)] += 1
        # Reaching step k means reaching every step before it.
        at_least = [sum(reached[k:]) for k in range(len(reached))]
        return tuple(
            FunnelStepCount(index, name, at_least[index]) for index, name in enumerate(steps, 1)
        )

    def cohort_retention_sql(self, scope: Scope, time_range: TimeRange) -> str:
        """Weekly cohorts by first activity in the range and their activity in later
        weeks: a join of two aggregations, hence the multi-stage engine. Both sides are
        `_select`s, so each carries the tenant condition."""
        conditions = [*self._conditions(time_range.start, time_range.end), "no_actor = 0"]
        # 1970-01-01 was a Thursday: shift by 3 days so weeks start on Monday (ISO).
        week = "FLOOR((occurred_day + 3) / 7)"
        firsts = self._select(
            scope, f"actor_key, MIN({week}) AS cohort", conditions, "actor_key", limit=None
        )
        activity = self._select(
            scope, f"actor_key, {week} AS week", conditions, f"actor_key, {week}", limit=None
        )
        return (
            "SELECT firsts.cohort, activity.week - firsts.cohort AS weeks_later,"
            " COUNT(DISTINCT activity.actor_key) AS users"
            f" FROM ({firsts}) AS firsts JOIN ({activity}) AS activity"
            " ON firsts.actor_key = activity.actor_key"
            " GROUP BY firsts.cohort, activity.week - firsts.cohort"
            " ORDER BY 1, 2 LIMIT 100000"
        )

    def cohort_retention(self, scope: Scope, time_range: TimeRange) -> tuple[CohortRow, ...]:
        rows = self._run(scope, self.cohort_retention_sql(scope, time_range), multistage=True)
        return tuple(
            CohortRow(_from_micros((int(cohort) * 7 - 3) * DAY_MICROS), int(later), int(users))
            for cohort, later, users in rows
        )


def _count(value: Any) -> int:
    """An HLL estimate as a count: NaN / None (no rows) is 0, never negative."""
    if value is None or _nan(value):
        return 0
    return max(0, round(float(value)))


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _money(micros: Any) -> Decimal:
    return Decimal(round(float(micros))).scaleb(-6) if micros is not None else Decimal(0)


__all__ = [
    "CohortRow",
    "FunnelStepCount",
    "PinotBrokerError",
    "PinotMetrics",
    "PinotQueryError",
    "literal",
    "pinot_error",
]
