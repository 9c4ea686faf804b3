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

How: DuckDB reads (person, time) of the events in the scanned span, unsorted; the
rows become packed positions (`services.query.timelines`) sorted with `np.sort`, and the
sessions fall out of vectorised passes over the sorted times (a gap over the timeout or a
new person opens one). Buckets are integer arithmetic on the start; sums are exact
integers. About 10x faster than the same logic as DuckDB window functions, which need
two sorts of all rows (docs/benchmarks-analytics.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

from services.query.metrics import EPOCH, Granularity, Scope, TimeRange, bucket_starts
from services.query.scoped_sql import Params, actor_columns, tenant_filter
from services.query.timelines import PersonTimeline
from services.storage.event_store import TABLE, EventStore

DEFAULT_TIMEOUT = timedelta(minutes=30)
MAX_TIMEOUT = timedelta(days=1)
_MICROSECOND = timedelta(microseconds=1)
_DAY_US = 86_400_000_000
_STEP_US = {
    Granularity.MINUTE: 60_000_000,
    Granularity.HOUR: 3_600_000_000,
    Granularity.DAY: _DAY_US,
}


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


def _bucket_index(
    starts_us: npt.NDArray[np.int64], first: datetime, granularity: Granularity
) -> npt.NDArray[np.int64]:
    """The bucket of each start (epoch us), counted from the bucket starting at `first`
    (UTC; ISO weeks; calendar months)."""
    first_us = (first - EPOCH) // _MICROSECOND
    if granularity in _STEP_US:
        step = _STEP_US[granularity]
        return starts_us // step - first_us // step
    days = starts_us // _DAY_US
    if granularity is Granularity.WEEK:
        mondays = days - (days + 3) % 7  # 1970-01-01 was a Thursday
        first_day = first_us // _DAY_US
        return (mondays - (first_day - (first_day + 3) % 7)) // 7
    months = days.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
    return months - ((first.year - 1970) * 12 + first.month - 1)


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
    scan_start = time_range.start - timeout
    rows = store.read(
        f"SELECT {', '.join(actor_columns(scope))}, epoch_us(occurred_at) AS t FROM {TABLE}"
        f" WHERE {tenant_filter(scope, params)} AND actor_key IS NOT NULL"
        f" AND occurred_at >= {params.bind(scan_start, 'scan_start')}"
        f" AND occurred_at < {params.bind(time_range.end, 'end')}",
        params.values,
    )
    empty = SessionStats(tuple(SessionBucket(s, 0, 0.0, 0.0) for s in starts), 0, 0.0, 0.0)
    if rows.num_rows == 0:
        return empty
    timeline = PersonTimeline(rows, scope, (scan_start - EPOCH) // _MICROSECOND)
    positions = timeline.all_positions()
    t = timeline.time(positions)
    person = timeline.person(positions)
    opens = np.ones(len(t), dtype=bool)
    opens[1:] = (person[1:] != person[:-1]) | (np.diff(t) > timeout // _MICROSECOND)
    first = np.flatnonzero(opens)
    last = np.append(first[1:], len(t)) - 1
    counted = t[first] >= (time_range.start - EPOCH) // _MICROSECOND
    first, last = first[counted], last[counted]
    if len(first) == 0:
        return empty
    durations = t[last] - t[first]
    bucket = _bucket_index(t[first], starts[0], granularity)
    sessions = np.bincount(bucket, minlength=len(starts))
    total_us = np.zeros(len(starts), dtype=np.int64)
    np.add.at(total_us, bucket, durations)  # exact integers, unlike bincount's weights
    bounces = np.bincount(bucket[last == first], minlength=len(starts))
    buckets = tuple(
        SessionBucket(
            start,
            int(sessions[i]),
            (int(total_us[i]) / int(sessions[i])) / 1_000_000 if sessions[i] else 0.0,
            int(bounces[i]) / int(sessions[i]) if sessions[i] else 0.0,
        )
        for i, start in enumerate(starts)
    )
    count = len(durations)
    return SessionStats(
        buckets,
        count,
        (int(durations.sum()) / count) / 1_000_000,
        float(np.median(durations)) / 1_000_000,
    )
