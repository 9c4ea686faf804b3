"""Cohorts by first occurrence and their retention matrix. Plain functions, no gRPC;
docs/analytics.md is the user-facing definition.

Definitions (people are actors as in `services.query.metrics`):
- Periods are UTC days, ISO weeks (Monday 00:00) or calendar months.
- A person's first occurrence is their earliest cohort event over all history (any
  event when no cohort event is named: "first seen"). They belong to the cohort of the
  period holding it if it lies in [start, end) of the range; someone whose first
  occurrence is before the range start is in no cohort. The first and last cohort may
  so be partial, like the first and last metric buckets.
- Property filter: the person counts only if their first cohort event has every given
  property value (`scoped_sql.property_text`); when several cohort events share the
  first instant, one of them matching is enough.
- Retention: `retained_counts[i]` = members with a return event (any event when none
  is named) at any moment of period `cohort period + i`; index 0 is the cohort period
  itself, so with "any event" it is the whole cohort. Rates are retained / size.
- Every period overlapping the range has a row, oldest first (size 0 when nobody
  started then). A row stops at the last period that has begun by `as_of` (now, by
  default): periods still to come are left out rather than shown as 0 %.

How: without a property filter, one scan builds an exact bitmap of people per period
(`bitstring_agg` over the dense `actor_key`): the cohort of period p is who did the
cohort event in p and in no earlier period (nor before the range), and the retained of
(p, i) is the bit count of cohort(p) AND returners(p + i). With a property filter the
first occurrences come from a per-person aggregate over the cohort event's rows, then
the same bitmaps. When the bitmaps would exceed the memory budget, exact hash joins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from services.query.metrics import Granularity, Scope, TimeRange, bucket_floor
from services.query.scoped_sql import (
    BITMAP_BUDGET_BYTES,
    Params,
    actor_columns,
    bitmap_bytes,
    properties_match,
    tenant_filter,
)
from services.storage.event_store import TABLE, EventStore

DEFAULT_PERIOD_COUNT = 12
MAX_PERIOD_COUNT = 52
# Rows of one matrix: ~3 years of daily cohorts; longer spans want weeks or months.
MAX_COHORTS = 1000
PERIODS = (Granularity.DAY, Granularity.WEEK, Granularity.MONTH)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class CohortSpec:
    cohort_event_name: str | None = None  # None: first seen (any event)
    return_event_name: str | None = None  # None: any event
    period: Granularity = Granularity.WEEK
    period_count: int = DEFAULT_PERIOD_COUNT
    property_equals: tuple[tuple[str, str], ...] = ()
    as_of: datetime | None = field(default=None, compare=False)  # None: now

    def __post_init__(self) -> None:
        if self.period not in PERIODS:
            raise ValueError("cohort periods are days, weeks or months")
        if not 1 <= self.period_count <= MAX_PERIOD_COUNT:
            raise ValueError(f"period_count must be 1-{MAX_PERIOD_COUNT}")


@dataclass(frozen=True, slots=True)
class CohortRow:
    cohort_start: datetime
    size: int
    retained_counts: tuple[int, ...]
    retention_rates: tuple[float, ...]


def period_index(start: datetime, moment: datetime, period: Granularity) -> int:
    """Whole periods from the period holding `start` to the one holding `moment`."""
    first, last = bucket_floor(start, period), bucket_floor(moment, period)
    if period is Granularity.MONTH:
        return (last.year - first.year) * 12 + last.month - first.month
    days = (last - first).days
    return days // 7 if period is Granularity.WEEK else days


def period_start(origin: datetime, index: int, period: Granularity) -> datetime:
    """Start of the period `index` periods after the one holding `origin`."""
    first = bucket_floor(origin, period)
    if period is Granularity.MONTH:
        months = first.year * 12 + first.month - 1 + index
        return datetime(months // 12, months % 12 + 1, 1, tzinfo=UTC)
    days = index * 7 if period is Granularity.WEEK else index
    return datetime.fromordinal(first.toordinal() + days).replace(tzinfo=UTC)


def _index_sql(params: Params, origin: datetime, period: Granularity) -> str:
    """SQL of `period_index(origin, occurred_at)` from the `occurred_on` DATE column
    (plain date arithmetic, no ICU calendar functions)."""
    first: date = bucket_floor(origin, period).date()
    if period is Granularity.MONTH:
        months = first.year * 12 + first.month - 1
        return f"(year(occurred_on) * 12 + month(occurred_on) - 1 - {int(months)})"
    anchor = params.bind(first, "origin")
    if period is Granularity.WEEK:
        return f"((CAST(date_trunc('week', occurred_on) AS DATE) - {anchor}) // 7)"
    return f"(occurred_on - {anchor})"


def _or(a: str, b: str) -> str:
    """Bitwise OR of two bitmaps of which either may be NULL (no one)."""
    return f"CASE WHEN {a} IS NULL THEN {b} WHEN {b} IS NULL THEN {a} ELSE {a} | {b} END"


def _minus(a: str, b: str) -> str:
    """`a` without the people in `b` (NULL: no one)."""
    return f"CASE WHEN {b} IS NULL THEN {a} ELSE {a} & ~({b}) END"


def _event_condition(params: Params, name: str | None) -> str:
    return "TRUE" if name is None else f"event_name = {params.bind(name, 'event')}"


def compute_cohorts(
    store: EventStore, scope: Scope, time_range: TimeRange, spec: CohortSpec
) -> tuple[CohortRow, ...]:
    """One row per period overlapping the range, oldest first (see the module docstring)."""
    as_of = spec.as_of or datetime.now(UTC)
    cohorts = period_index(time_range.start, time_range.end - _MICROSECOND, spec.period) + 1
    if cohorts > MAX_COHORTS:
        raise ValueError(
            f"{cohorts} {spec.period.value} cohorts (at most {MAX_COHORTS});"
            " use a longer period or a shorter range"
        )
    # Periods of the matrix: the cohorts' and up to `period_count - 1` after the last.
    periods = cohorts + spec.period_count - 1
    started = [i for i in range(periods) if period_start(time_range.start, i, spec.period) < as_of]
    horizon_index = (started[-1] + 1) if started else 0
    horizon = period_start(time_range.start, horizon_index, spec.period)
    groups = (cohorts + horizon_index + 2) * 8  # x early / late / kind of event
    if groups * bitmap_bytes(store, scope) <= BITMAP_BUDGET_BYTES:
        counts = _bitmap_counts(store, scope, time_range, spec, horizon)
    else:
        counts = _hashed_counts(store, scope, time_range, spec, horizon)
    rows = []
    for cohort in range(cohorts):
        size = counts.get((cohort, -1), 0)
        retained = tuple(
            counts.get((cohort, offset), 0)
            for offset in range(spec.period_count)
            if cohort + offset < horizon_index
        )
        rows.append(
            CohortRow(
                cohort_start=period_start(time_range.start, cohort, spec.period),
                size=size,
                retained_counts=retained,
                retention_rates=tuple(r / size if size else 0.0 for r in retained),
            )
        )
    return tuple(rows)


def _bitmap_counts(
    store: EventStore, scope: Scope, time_range: TimeRange, spec: CohortSpec, horizon: datetime
) -> dict[tuple[int, int], int]:
    """{(cohort, offset): retained} and {(cohort, -1): size}, from per-period bitmaps."""
    params = Params()
    tenant = "tenant_id, " if scope.tenant_id is None else ""
    partition = "PARTITION BY tenant_id " if scope.tenant_id is None else ""
    join_tenant = "c.tenant_id = r.tenant_id AND " if scope.tenant_id is None else ""
    index = _index_sql(params, time_range.start, spec.period)
    start = params.bind(time_range.start, "start")
    end = params.bind(time_range.end, "end")
    where = " AND ".join(
        [
            tenant_filter(scope, params),
            "actor_key IS NOT NULL",
            # Membership needs the whole range even where no retention is due yet.
            f"occurred_at < {params.bind(max(horizon, time_range.end), 'horizon')}",
        ]
    )
    cohort_event = _event_condition(params, spec.cohort_event_name)
    returned = _event_condition(params, spec.return_event_name)
    if spec.cohort_event_name is not None and spec.return_event_name is not None:
        where += f" AND ({cohort_event} OR {returned})"  # other events matter to neither
    # Each row sets one bit, in the bitmap of its group: the period, whether it is before
    # the range start (early) or at/after its end (late), and what kind of event it is.
    # Cheaper than one filtered bitmap per kind (each row would pay for every kind).
    marks = f"""
        marks AS (
          SELECT {tenant}greatest({index}, -1) AS p, occurred_at < {start} AS early,
                 occurred_at >= {end} AS late, {cohort_event} AS is_cohort,
                 {returned} AS is_return, bitstring_agg(actor_key) AS bits
          FROM {TABLE} WHERE {where} GROUP BY ALL
        ),"""
    if spec.property_equals:
        # The person's first cohort event decides; only the cohort event's rows are
        # aggregated per person (see the module docstring).
        match = properties_match(params, spec.property_equals)
        firsts_where = " AND ".join(
            [tenant_filter(scope, params), "actor_key IS NOT NULL", f"occurred_at < {end}"]
        )
        members = f"""
          firsts AS (
            SELECT {tenant}actor_key, min(occurred_at) AS occurred_at,
                   min(occurred_on) AS occurred_on,
                   min(occurred_at) FILTER (WHERE {match}) AS first_match
            FROM {TABLE} WHERE {firsts_where} AND {cohort_event} GROUP BY ALL
          ),
          cohorts AS (
            SELECT {tenant}{index} AS p, bitstring_agg(actor_key) AS bits FROM firsts
            WHERE occurred_at >= {start} AND first_match = occurred_at GROUP BY ALL
          ),"""
    else:
        # Cohort of p: did the cohort event in p (inside the range) and never before,
        # neither in an earlier period nor earlier in p (before the range start).
        members = f"""
          firsts AS (
            SELECT {tenant}p,
                   bit_or(bits) FILTER (WHERE is_cohort AND NOT early AND NOT late) AS bits,
                   bit_or(bits) FILTER (WHERE is_cohort AND early) AS early_seen,
                   bit_or(bits) FILTER (WHERE is_cohort AND NOT late) AS seen
            FROM marks GROUP BY ALL
          ),
          prior AS (
            SELECT *, bit_or(seen) OVER ({partition}ORDER BY p
                        ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before_p
            FROM firsts
          ),
          cohorts AS (
            SELECT {tenant}p, {_minus("bits", _or("before_p", "early_seen"))} AS bits
            FROM prior WHERE p >= 0 AND bits IS NOT NULL
          ),"""
    sql = f"""
        WITH {marks}
        {members}
        returns AS (
          SELECT {tenant}p, bit_or(bits) AS bits FROM marks WHERE p >= 0 AND is_return
          GROUP BY ALL
        ),
        per_tenant AS (
          SELECT c.p AS cohort, -1 AS k, bit_count(c.bits) AS n FROM cohorts c
          UNION ALL
          SELECT c.p, r.p - c.p, bit_count(c.bits & r.bits)
          FROM cohorts c JOIN returns r ON {join_tenant}r.p >= c.p
            AND r.p < c.p + {int(spec.period_count)}
        )
        SELECT cohort, k, CAST(sum(n) AS BIGINT) AS n FROM per_tenant GROUP BY ALL
    """
    return {
        (int(row["cohort"]), int(row["k"])): int(row["n"])
        for row in store.read(sql, params.values).to_pylist()
    }


def _hashed_counts(
    store: EventStore, scope: Scope, time_range: TimeRange, spec: CohortSpec, horizon: datetime
) -> dict[tuple[int, int], int]:
    """The same counts with per-person hash aggregates and a join (no bitmaps)."""
    params = Params()
    person = ", ".join(actor_columns(scope))
    index = _index_sql(params, time_range.start, spec.period)
    match = properties_match(params, spec.property_equals) if spec.property_equals else "TRUE"
    base = f"{tenant_filter(scope, params)} AND actor_key IS NOT NULL"
    sql = f"""
        WITH firsts AS (
          SELECT {person}, min(occurred_at) AS occurred_at, min(occurred_on) AS occurred_on,
                 min(occurred_at) FILTER (WHERE {match}) AS first_match
          FROM {TABLE}
          WHERE {base} AND {_event_condition(params, spec.cohort_event_name)}
            AND occurred_at < {params.bind(time_range.end, "end")}
          GROUP BY ALL
        ),
        members AS (
          SELECT {person}, {index} AS p FROM firsts
          WHERE occurred_at >= {params.bind(time_range.start, "start")}
            AND first_match = occurred_at
        ),
        activity AS (
          SELECT DISTINCT {person}, {index} AS p FROM {TABLE}
          WHERE {base} AND {_event_condition(params, spec.return_event_name)}
            AND occurred_at >= {params.bind(bucket_floor(time_range.start, spec.period), "from")}
            AND occurred_at < {params.bind(horizon, "horizon")}
        )
        SELECT p AS cohort, -1 AS k, count(*) AS n FROM members GROUP BY ALL
        UNION ALL
        SELECT m.p, a.p - m.p, count(*) FROM members m JOIN activity a USING ({person})
        WHERE a.p >= m.p AND a.p < m.p + {int(spec.period_count)} GROUP BY ALL
    """
    return {
        (int(row["cohort"]), int(row["k"])): int(row["n"])
        for row in store.read(sql, params.values).to_pylist()
    }
