"""The churn feature pipeline: tracked events -> one row of numbers per user.

Definitions (the contract between training and serving; `FEATURE_NAMES` is stored with
every model version and serving refuses a snapshot whose names differ):

- Population at a cutoff time `c`: active users, i.e. users (non-empty `user_id`;
  anonymous visitors are not customers we can win back) with at least one tracked
  event in [c - `ACTIVE_DAYS`, c). Someone silent for longer has already left; keeping
  them would make "churn" trivially predictable from recency and hide the users a
  retention campaign can still reach. Features look back `LOOKBACK_DAYS`; only events
  before `c` feed them, so a snapshot never sees its own future.
- Churn label at `c` for horizon H (`CHURN_HORIZON_DAYS`): 1 when the user has no
  tracked event at all in [c, c + H), else 0.
- Ages are in days before `c` (fractional). "Nd" features count events with age < N.

Feature groups (names below, in matrix order):
- recency: days since the last event / last purchase (the lookback length when none)
  and since the first event in the window;
- frequency: events, active days (distinct UTC days) and sessions in 7/30/90 days;
- monetary: purchases (conversion events), revenue, tickets and average order value
  in 90 days;
- sessions: events per session, mean and max session length in minutes (first to last
  event of a session), over 90 days;
- trends: log ratio of the last 30 days to the 30 before, for events, active days,
  sessions and purchases; mean gap between active days, and recency divided by that
  gap (how overdue the next visit is);
- mix: shares of page views, clicks, named tracks, conversions and custom events,
  distinct ticketed events touched, share of mobile events, share of weekend events.

All aggregation runs in one DuckDB query over the tenant's window, so a snapshot of
100k users over a few million events takes about a second. Serving reads a cached
snapshot (see `services.prediction.churn.FeatureSnapshot`), not the store, per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa

from services.storage.event_store import TABLE, EventStore

LOOKBACK_DAYS = 90
ACTIVE_DAYS = 30
CHURN_HORIZON_DAYS = 30

# (name, SQL expression over the per-user aggregates in `_SQL`) in matrix order.
_FEATURES: tuple[tuple[str, str], ...] = (
    ("days_since_last_event", "min_age"),
    ("days_since_last_purchase", f"coalesce(min_purchase_age, {LOOKBACK_DAYS})"),
    ("days_since_first_event", "max_age"),
    ("events_7d", "events_7"),
    ("events_30d", "events_30"),
    ("events_90d", "events_90"),
    ("active_days_7d", "days_7"),
    ("active_days_30d", "days_30"),
    ("active_days_90d", "days_90"),
    ("sessions_7d", "sessions_7"),
    ("sessions_30d", "sessions_30"),
    ("sessions_90d", "sessions_90"),
    ("purchases_90d", "purchases_90"),
    ("revenue_90d", "revenue_90"),
    ("tickets_90d", "tickets_90"),
    ("avg_order_value_90d", "revenue_90 / greatest(purchases_90, 1)"),
    ("events_per_session_90d", "events_90 / greatest(sessions_90, 1)"),
    ("mean_session_minutes_90d", "coalesce(mean_session_minutes, 0)"),
    ("max_session_minutes_90d", "coalesce(max_session_minutes, 0)"),
    ("events_trend_30d", "ln((events_30 + 1) / (events_30_60 + 1))"),
    ("active_days_trend_30d", "ln((days_30 + 1) / (days_30_60 + 1))"),
    ("sessions_trend_30d", "ln((sessions_30 + 1) / (sessions_30_60 + 1))"),
    ("purchases_trend_30d", "ln((purchases_30 + 1) / (purchases_30_60 + 1))"),
    ("mean_gap_days", "(max_age - min_age) / greatest(days_90 - 1, 1)"),
    ("overdue_ratio", "min_age / greatest((max_age - min_age) / greatest(days_90 - 1, 1), 0.5)"),
    ("share_page_view", "page_views / events_90"),
    ("share_click", "clicks / events_90"),
    ("share_track", "tracks / events_90"),
    ("share_conversion", "purchases_90 / events_90"),
    ("share_custom", "customs / events_90"),
    ("distinct_ticketed_events_90d", "ticketed_events"),
    ("share_mobile", "mobile / events_90"),
    ("share_weekend", "weekend / events_90"),
)
FEATURE_NAMES: tuple[str, ...] = tuple(name for name, _ in _FEATURES)

_SQL = f"""
WITH ev AS (
  SELECT user_id, session_id, event_type, source, ticketed_event_id, occurred_on,
         CAST(quantity AS DOUBLE) AS quantity, CAST(revenue AS DOUBLE) AS revenue,
         epoch_us(occurred_at) AS at_us,
         ($cutoff_us - epoch_us(occurred_at)) / 86400e6 AS age
  FROM {TABLE}
  WHERE tenant_id = $tenant AND user_id <> ''
    AND occurred_at >= $start AND occurred_at < $cutoff
),
sessions AS (
  SELECT user_id, session_id, min(age) AS last_age,
         (max(at_us) - min(at_us)) / 60e6 AS minutes
  FROM ev WHERE session_id <> '' GROUP BY user_id, session_id
),
per_session AS (
  SELECT user_id,
         count(*) FILTER (WHERE last_age < 7) AS sessions_7,
         count(*) FILTER (WHERE last_age < 30) AS sessions_30,
         count(*) FILTER (WHERE last_age >= 30 AND last_age < 60) AS sessions_30_60,
         count(*) AS sessions_90,
         avg(minutes) AS mean_session_minutes,
         max(minutes) AS max_session_minutes
  FROM sessions GROUP BY user_id
),
per_user AS (
  SELECT user_id,
         min(age) AS min_age,
         max(age) AS max_age,
         min(age) FILTER (WHERE event_type = 'conversion') AS min_purchase_age,
         count(*) FILTER (WHERE age < 7) AS events_7,
         count(*) FILTER (WHERE age < 30) AS events_30,
         count(*) FILTER (WHERE age >= 30 AND age < 60) AS events_30_60,
         count(*) AS events_90,
         count(DISTINCT occurred_on) FILTER (WHERE age < 7) AS days_7,
         count(DISTINCT occurred_on) FILTER (WHERE age < 30) AS days_30,
         count(DISTINCT occurred_on) FILTER (WHERE age >= 30 AND age < 60) AS days_30_60,
         count(DISTINCT occurred_on) AS days_90,
         count(*) FILTER (WHERE event_type = 'conversion') AS purchases_90,
         count(*) FILTER (WHERE event_type = 'conversion' AND age < 30) AS purchases_30,
         count(*) FILTER (WHERE event_type = 'conversion' AND age >= 30 AND age < 60)
           AS purchases_30_60,
         coalesce(sum(revenue) FILTER (WHERE event_type = 'conversion'), 0) AS revenue_90,
         coalesce(sum(quantity) FILTER (WHERE event_type = 'conversion'), 0) AS tickets_90,
         count(*) FILTER (WHERE event_type = 'page_view') AS page_views,
         count(*) FILTER (WHERE event_type = 'click') AS clicks,
         count(*) FILTER (WHERE event_type = 'track') AS tracks,
         count(*) FILTER (WHERE event_type = 'custom') AS customs,
         count(DISTINCT ticketed_event_id) FILTER (WHERE ticketed_event_id <> '')
           AS ticketed_events,
         count(*) FILTER (WHERE source = 'mobile') AS mobile,
         count(*) FILTER (WHERE isodow(occurred_on) >= 6) AS weekend
  FROM ev GROUP BY user_id
  HAVING min(age) < $active_days
)
SELECT u.user_id,
  {", ".join(f"CAST({expr} AS FLOAT) AS {name}" for name, expr in _FEATURES)}
FROM per_user u LEFT JOIN per_session s USING (user_id)
ORDER BY u.user_id
"""

_ACTIVE_SQL = f"""
SELECT DISTINCT user_id FROM {TABLE}
WHERE tenant_id = $tenant AND user_id <> '' AND occurred_at >= $start AND occurred_at < $end
"""

_SPAN_SQL = f"""
SELECT min(occurred_at) AS first, max(occurred_at) AS last, count(DISTINCT user_id) AS users
FROM {TABLE} WHERE tenant_id = $tenant AND user_id <> ''
"""


@dataclass(frozen=True, slots=True)
class FeatureFrame:
    """Features of the population at `cutoff`: `matrix[i]` belongs to `user_ids[i]`."""

    cutoff: datetime
    user_ids: np.ndarray  # object array of str, sorted
    matrix: np.ndarray  # float32, (users, len(FEATURE_NAMES))
    feature_names: tuple[str, ...] = FEATURE_NAMES

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True, slots=True)
class DataSpan:
    """Where a tenant's identified-user history starts and ends."""

    first: datetime | None
    last: datetime | None
    users: int


def data_span(store: EventStore, tenant_id: str) -> DataSpan:
    row = store.read(_SPAN_SQL, {"tenant": tenant_id}).to_pylist()[0]
    return DataSpan(row["first"], row["last"], int(row["users"] or 0))


def build_features(
    store: EventStore, tenant_id: str, cutoff: datetime, lookback_days: int = LOOKBACK_DAYS
) -> FeatureFrame:
    """The feature matrix of every user active in [cutoff - ACTIVE_DAYS, cutoff)."""
    params = {
        "tenant": tenant_id,
        "cutoff": cutoff,
        "cutoff_us": int(cutoff.timestamp() * 1_000_000),
        "start": cutoff - timedelta(days=lookback_days),
        "active_days": ACTIVE_DAYS,
    }
    table = store.read(_SQL, params)
    return frame_from_table(cutoff, table)


def frame_from_table(cutoff: datetime, table: pa.Table) -> FeatureFrame:
    users = np.array(table.column("user_id").to_pylist(), dtype=object)
    if table.num_rows == 0:
        matrix = np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    else:
        matrix = np.column_stack(
            [table.column(name).to_numpy(zero_copy_only=False) for name in FEATURE_NAMES]
        ).astype(np.float32)
    return FeatureFrame(cutoff, users, np.ascontiguousarray(matrix))


def churn_labels(
    store: EventStore, tenant_id: str, frame: FeatureFrame, horizon_days: int = CHURN_HORIZON_DAYS
) -> np.ndarray:
    """1 for users of `frame` with no event in [cutoff, cutoff + horizon), else 0."""
    active = store.read(
        _ACTIVE_SQL,
        {
            "tenant": tenant_id,
            "start": frame.cutoff,
            "end": frame.cutoff + timedelta(days=horizon_days),
        },
    )
    returned = set(active.column("user_id").to_pylist())
    return np.fromiter((u not in returned for u in frame.user_ids), dtype=np.int8, count=len(frame))
