"""Analytics of one ticketed event (the concert): views, visitors, buyers, tickets and
revenue over time, sales velocity, referrers, campaigns, countries. Plain functions, no
gRPC; docs/analytics.md is the user-facing definition.

Definitions, over the events that carry the `ticketed_event_id` and lie in [start, end):
- views: views of it (`users.VIEW_SQL`: page views and `ticket_viewed` events);
- visitors: distinct people (actors, as in metrics) with any of its events;
- buyers, tickets, revenue: as `services.query.metrics` defines conversions: distinct
  people with a conversion event, the sum of `quantity` of its conversions, revenue per
  currency of conversions with a currency. So the conversion rate, buyers / visitors,
  equals `metrics.overall_conversion_rate` filtered on the ticketed event;
- sales velocity: tickets sold in the last 24 hours of the range per hour (the whole
  range when it is shorter, divided by its length in hours);
- series per bucket (zeros included): `views`, `visitors` (distinct in the bucket),
  `tickets_sold`; `revenue` per bucket and currency where there was some;
- top referrers, campaigns and countries: the `TOP_N` values with the most events (ties
  by value), each with its events and distinct people; empty values are left out. A
  referrer counts by host: the URL's host, lower-cased, without user info, port and a
  leading `www.`; referrers that are not `scheme://host…` URLs are left out.
- unknown: `TicketedEventNotFoundError` when the tenant has no event of it at any time;
  a known ticketed event with nothing in the range gives zeros.

How: the ticketed event's rows in the range are read once into a materialised CTE; every
figure is an aggregate over it in the same statement (one snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from services.query.metrics import (
    CurrencyAmount,
    Granularity,
    Scope,
    TimeRange,
    bucket_starts,
)
from services.query.scoped_sql import (
    Params,
    bucket_key_sql,
    bucket_start,
    person_expression,
    tenant_filter,
)
from services.query.users import VIEW_SQL
from services.storage.event_store import TABLE, EventStore

TOP_N = 10
VELOCITY_WINDOW = timedelta(hours=24)
# scheme://[user@]host[:port]...: the host, as referrers are grouped by it.
REFERRER_HOST_PATTERN = r"^[A-Za-z][A-Za-z0-9+.\-]*://(?:[^/?#@]*@)?([^/?#:]+)"


class TicketedEventNotFoundError(LookupError):
    """The tenant has no event of this ticketed event."""


@dataclass(frozen=True, slots=True)
class CountedValue:
    value: str
    events: int
    users: int


@dataclass(frozen=True, slots=True)
class TicketedEventBucket:
    bucket_start: datetime
    views: int
    visitors: int
    tickets_sold: int
    revenue: tuple[CurrencyAmount, ...]  # by currency; only currencies with revenue


@dataclass(frozen=True, slots=True)
class TicketedEventAnalytics:
    ticketed_event_id: str
    views: int
    visitors: int
    buyers: int
    conversion_rate: float  # buyers / visitors, 0.0 without visitors
    tickets_sold: int
    revenue: tuple[CurrencyAmount, ...]  # by currency
    sales_velocity_tickets_per_hour: float
    buckets: tuple[TicketedEventBucket, ...]
    top_referrers: tuple[CountedValue, ...]
    top_campaigns: tuple[CountedValue, ...]
    top_countries: tuple[CountedValue, ...]


def _top(column: str) -> str:
    return f"""(SELECT list({{'value': value, 'events': events, 'users': users}}
                       ORDER BY events DESC, value) FROM (
                  SELECT {column} AS value, count(*) AS events,
                         count(DISTINCT person) AS users
                  FROM mine WHERE {column} <> '' GROUP BY ALL
                  ORDER BY events DESC, value LIMIT {TOP_N}))"""


def ticketed_event_analytics(
    store: EventStore,
    scope: Scope,
    ticketed_event_id: str,
    time_range: TimeRange,
    granularity: Granularity,
) -> TicketedEventAnalytics:
    """Raises `TicketedEventNotFoundError` when the tenant has no data for it."""
    starts = bucket_starts(time_range, granularity)
    params = Params()
    event = params.bind(ticketed_event_id, "ticketed_event")
    velocity_start = max(time_range.start, time_range.end - VELOCITY_WINDOW)
    velocity_hours = (time_range.end - velocity_start) / timedelta(hours=1)
    host = (
        f"regexp_replace(lower(regexp_extract(referrer,"
        f" {params.bind(REFERRER_HOST_PATTERN, 'pattern')}, 1)), '^www\\.', '')"
    )
    bucket = bucket_key_sql(granularity, "epoch_us(occurred_at)", "occurred_on")
    sql = f"""
        WITH mine AS MATERIALIZED (
          SELECT {bucket} AS bucket, {person_expression(scope)} AS person, occurred_at,
                 event_type, event_name, ticketed_event_id, quantity, revenue, currency,
                 campaign_id, country_code, {host} AS referrer_host,
                 event_type = 'conversion' AS converted
          FROM {TABLE}
          WHERE {tenant_filter(scope, params)} AND ticketed_event_id = {event}
            AND occurred_at >= {params.bind(time_range.start, "start")}
            AND occurred_at < {params.bind(time_range.end, "end")}
        )
        SELECT
          EXISTS (SELECT 1 FROM {TABLE} WHERE {tenant_filter(scope, params)}
                  AND ticketed_event_id = {event}) AS known,
          (SELECT count(*) FROM mine WHERE {VIEW_SQL}) AS views,
          (SELECT count(DISTINCT person) FROM mine) AS visitors,
          (SELECT count(DISTINCT person) FROM mine WHERE converted) AS buyers,
          (SELECT CAST(coalesce(sum(quantity), 0) AS BIGINT) FROM mine WHERE converted)
            AS tickets,
          (SELECT CAST(coalesce(sum(quantity), 0) AS BIGINT) FROM mine WHERE converted
             AND occurred_at >= {params.bind(velocity_start, "velocity_start")})
            AS recent_tickets,
          (SELECT list({{'currency': currency, 'amount': amount}} ORDER BY currency)
           FROM (SELECT currency, sum(revenue) AS amount FROM mine
                 WHERE converted AND currency <> '' GROUP BY ALL)) AS revenue,
          (SELECT list({{'bucket': bucket, 'views': views, 'visitors': visitors,
                         'tickets': tickets}})
           FROM (SELECT bucket, count(*) FILTER (WHERE {VIEW_SQL}) AS views,
                        count(DISTINCT person) AS visitors,
                        CAST(coalesce(sum(quantity) FILTER (WHERE converted), 0) AS BIGINT)
                          AS tickets
                 FROM mine GROUP BY ALL)) AS buckets,
          (SELECT list({{'bucket': bucket, 'currency': currency, 'amount': amount}})
           FROM (SELECT bucket, currency, sum(revenue) AS amount FROM mine
                 WHERE converted AND currency <> '' GROUP BY ALL)) AS bucket_revenue,
          {_top("referrer_host")} AS referrers,
          {_top("campaign_id")} AS campaigns,
          {_top("country_code")} AS countries
    """
    (row,) = store.read(sql, params.values).to_pylist()
    if not row["known"]:
        raise TicketedEventNotFoundError(ticketed_event_id)
    money: dict[datetime, list[CurrencyAmount]] = {}
    for item in sorted(
        row["bucket_revenue"] or (), key=lambda x: (str(x["bucket"]), x["currency"])
    ):
        money.setdefault(bucket_start(item["bucket"], granularity), []).append(
            CurrencyAmount(item["currency"], Decimal(item["amount"]))
        )
    counts = {bucket_start(b["bucket"], granularity): b for b in row["buckets"] or ()}
    visitors = int(row["visitors"])
    buyers = int(row["buyers"])

    def counted(items: list[dict[str, Any]] | None) -> tuple[CountedValue, ...]:
        return tuple(
            CountedValue(str(i["value"]), int(i["events"]), int(i["users"])) for i in items or ()
        )

    return TicketedEventAnalytics(
        ticketed_event_id=ticketed_event_id,
        views=int(row["views"]),
        visitors=visitors,
        buyers=buyers,
        conversion_rate=buyers / visitors if visitors else 0.0,
        tickets_sold=int(row["tickets"]),
        revenue=tuple(
            CurrencyAmount(m["currency"], Decimal(m["amount"])) for m in row["revenue"] or ()
        ),
        sales_velocity_tickets_per_hour=int(row["recent_tickets"]) / velocity_hours,
        buckets=tuple(
            TicketedEventBucket(
                start,
                int(counts[start]["views"]) if start in counts else 0,
                int(counts[start]["visitors"]) if start in counts else 0,
                int(counts[start]["tickets"]) if start in counts else 0,
                tuple(money.get(start, ())),
            )
            for start in starts
        ),
        top_referrers=counted(row["referrers"]),
        top_campaigns=counted(row["campaigns"]),
        top_countries=counted(row["countries"]),
    )
