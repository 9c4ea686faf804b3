"""Sessions: a person's events split after a period of inactivity. Plain functions, no
gRPC; docs/analytics.md is the user-facing definition.

Definitions (people are actors as in `services.query.metrics`):
- A person's events in time order form one session until a gap *longer* than the
  timeout (30 minutes by default; a gap of exactly the timeout continues the session).
  The SDK's `session_id` is not used: senders disagree on it, inactivity does not.
- A session starts at its first event and lasts until its last (a session of
  simultaneous events lasts 0 s). A bounce is a session of exactly one event.
- `session_analytics` counts the sessions that *start* inside [start, end), bucketed
  by their start. Events in the timeout before the range only tell whether the first
  events in it continue an earlier session (which is then not counted); a session still
  going at the range end is cut there (its later events are not read), so a range
  ending now reports sessions in progress as they are so far.
- Averages are means over sessions (0.0 for no sessions); the median is the middle
  duration (the mean of the two middle ones for an even count).

How: one DuckDB window pass marks each event that opens a session (gap before it over
the timeout, or first) and each that closes one (gap after it over the timeout, or
last), with its position; a second window over those boundary rows only pairs each
opening with the next closing. Durations and event counts fall out of the pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.query.metrics import EPOCH, Granularity, Scope, TimeRange, bucket_starts
from services.query.scoped_sql import (
    Params,
    actor_columns,
    bucket_key_sql,
    bucket_start,
    tenant_filter,
)
from services.storage.event_store import TABLE, EventStore

DEFAULT_TIMEOUT = timedelta(minutes=30)
MAX_TIMEOUT = timedelta(days=1)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class SessionBucket:
    bucket_start: datetime
    sessions: int
    average_duration_seconds: float
    bounce_rate: float  # one-event sessions / sessions, 0.0 when none


@dataclass(frozen=True, slots=True)
class SessionStats:
    buckets: tuple[SessionBucket, ...]  # every bucket of the range, zeros included
    session_count: int
    average_duration_seconds: float
    median_duration_seconds: float


def check_timeout(timeout: timedelta) -> None:
    if not timedelta(0) < timeout <= MAX_TIMEOUT:
        raise ValueError(f"the session timeout must be in (0, {MAX_TIMEOUT}]")


def sessions_sql(source: str, person: list[str], timeout_param: str) -> str:
    """SQL of one row per session of the rows of `source` (a subquery with the `person`
    columns and `t`, epoch microseconds): `start_us`, `duration_us`, `events`.

    `timeout_param` is the placeholder of the timeout in microseconds.
    """
    key = ", ".join(person)
    return f"""
        SELECT {key}, t AS start_us,
               (CASE WHEN closes THEN t ELSE next_t END) - t AS duration_us,
               (CASE WHEN closes THEN n ELSE next_n END) - n + 1 AS events
        FROM (
          SELECT *, lead(t) OVER bounds AS next_t, lead(n) OVER bounds AS next_n
          FROM (
            SELECT {key}, t,
                   coalesce(t - lag(t) OVER events > {timeout_param}, TRUE) AS opens,
                   coalesce(lead(t) OVER events - t > {timeout_param}, TRUE) AS closes,
                   row_number() OVER events AS n
            FROM ({source})
            WINDOW events AS (PARTITION BY {key} ORDER BY t)
          )
          WHERE opens OR closes
          WINDOW bounds AS (PARTITION BY {key} ORDER BY n)
        )
        WHERE opens
    """


def session_analytics(
    store: EventStore,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> SessionStats:
    """Sessions starting in the range: per bucket and overall (see the module docstring)."""
    check_timeout(timeout)
    starts = bucket_starts(time_range, granularity)
    params = Params()
    person = actor_columns(scope)
    source = (
        f"SELECT {', '.join(person)}, epoch_us(occurred_at) AS t FROM {TABLE}"
        f" WHERE {tenant_filter(scope, params)} AND actor_key IS NOT NULL"
        f" AND occurred_at >= {params.bind(time_range.start - timeout, 'scan_start')}"
        f" AND occurred_at < {params.bind(time_range.end, 'end')}"
    )
    timeout_us = params.bind(timeout // _MICROSECOND, "timeout")
    range_start = params.bind((time_range.start - EPOCH) // _MICROSECOND, "start")
    day = "CAST(make_timestamp(start_us) AS DATE)"  # a TIMESTAMP without zone: no ICU
    sql = f"""
        SELECT {bucket_key_sql(granularity, "start_us", day)} AS bucket, count(*) AS sessions,
               CAST(sum(duration_us) AS BIGINT) AS total_us,
               count(*) FILTER (WHERE events = 1) AS bounces,
               quantile_cont(duration_us, 0.5) AS median_us,
               GROUPING(bucket) AS overall
        FROM ({sessions_sql(source, person, timeout_us)})
        WHERE start_us >= {range_start}
        GROUP BY GROUPING SETS ((bucket), ())
    """
    per_bucket: dict[datetime, SessionBucket] = {}
    total = SessionStats((), 0, 0.0, 0.0)
    for row in store.read(sql, params.values).to_pylist():
        sessions = int(row["sessions"])
        mean = (int(row["total_us"] or 0) / sessions) / 1_000_000 if sessions else 0.0
        if row["overall"]:
            median = float(row["median_us"] or 0.0) / 1_000_000
            total = SessionStats((), sessions, mean, median)
            continue
        start = bucket_start(row["bucket"], granularity)
        per_bucket[start] = SessionBucket(start, sessions, mean, int(row["bounces"]) / sessions)
    buckets = tuple(per_bucket.get(s, SessionBucket(s, 0, 0.0, 0.0)) for s in starts)
    return SessionStats(
        buckets, total.session_count, total.average_duration_seconds, total.median_duration_seconds
    )
