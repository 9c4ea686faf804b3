"""Ticketed-event analytics against a plain-Python oracle, and against the metrics."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.model import TrackedEvent, TrackedEventType
from services.query import metrics, ticketed_events
from services.query.metrics import CurrencyAmount, Granularity, MetricFilters, Scope, TimeRange
from services.query.ticketed_events import (
    CountedValue,
    TicketedEventAnalytics,
    TicketedEventBucket,
    TicketedEventNotFoundError,
)
from services.storage.event_store import DuckDBEventStore
from tests.query.analytics_events import START, clustered_events
from tests.query.oracle_common import Person, in_scope, person
from tests.query.test_metrics import oracle_bucket, oracle_buckets


def _host(referrer: str) -> str:
    parts = urlsplit(referrer)
    if not parts.scheme or not parts.netloc:
        return ""
    host = parts.hostname or ""
    return host[4:] if host.startswith("www.") else host


def _top(events: list[TrackedEvent], value_of: object) -> tuple[CountedValue, ...]:
    counts: dict[str, int] = defaultdict(int)
    people: dict[str, set[Person]] = defaultdict(set)
    for e in events:
        value = value_of(e)  # type: ignore[operator]
        if value:
            counts[value] += 1
            if (p := person(e)) is not None:
                people[value].add(p)
    ranked = sorted(counts, key=lambda v: (-counts[v], v))[: ticketed_events.TOP_N]
    return tuple(CountedValue(v, counts[v], len(people[v])) for v in ranked)


def _is_view(e: TrackedEvent) -> bool:
    return e.event_type is TrackedEventType.PAGE_VIEW or e.event_name == "ticket_viewed"


def oracle(
    events: list[TrackedEvent], scope: Scope, concert: str, tr: TimeRange, g: Granularity
) -> TicketedEventAnalytics | None:
    if not any(e.ticketed_event_id == concert and in_scope(e, scope) for e in events):
        return None
    mine = [
        e
        for e in events
        if e.ticketed_event_id == concert
        and in_scope(e, scope)
        and tr.start <= e.occurred_at < tr.end
    ]
    sales = [e for e in mine if e.event_type is TrackedEventType.CONVERSION]
    visitors = {p for e in mine if (p := person(e)) is not None}
    buyers = {p for e in sales if (p := person(e)) is not None}
    money: dict[str, Decimal] = defaultdict(Decimal)
    for e in sales:
        if e.currency:
            money[e.currency] += e.revenue
    recent_from = max(tr.start, tr.end - timedelta(hours=24))
    recent = sum(e.quantity for e in sales if e.occurred_at >= recent_from)
    by_bucket: dict[object, list[TrackedEvent]] = defaultdict(list)
    for e in mine:
        by_bucket[oracle_bucket(e.occurred_at, g)].append(e)
    buckets = []
    for start in oracle_buckets(tr, g):
        inside = by_bucket.get(start, [])
        bucket_money: dict[str, Decimal] = defaultdict(Decimal)
        for e in inside:
            if e.event_type is TrackedEventType.CONVERSION and e.currency:
                bucket_money[e.currency] += e.revenue
        buckets.append(
            TicketedEventBucket(
                start,
                sum(1 for e in inside if _is_view(e)),
                len({p for e in inside if (p := person(e)) is not None}),
                sum(e.quantity for e in inside if e.event_type is TrackedEventType.CONVERSION),
                tuple(CurrencyAmount(c, a) for c, a in sorted(bucket_money.items())),
            )
        )
    return TicketedEventAnalytics(
        ticketed_event_id=concert,
        views=sum(1 for e in mine if _is_view(e)),
        visitors=len(visitors),
        buyers=len(buyers),
        conversion_rate=len(buyers) / len(visitors) if visitors else 0.0,
        tickets_sold=sum(e.quantity for e in sales),
        revenue=tuple(CurrencyAmount(c, a) for c, a in sorted(money.items())),
        sales_velocity_tickets_per_hour=recent / ((tr.end - recent_from) / timedelta(hours=1)),
        buckets=tuple(buckets),
        top_referrers=_top(mine, lambda e: _host(e.referrer)),
        top_campaigns=_top(mine, lambda e: e.campaign_id),
        top_countries=_top(mine, lambda e: e.enrichment.country_code),
    )


@pytest.fixture(scope="module")
def loaded(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DuckDBEventStore, list[TrackedEvent]]]:
    events = clustered_events(17, 90)
    store = DuckDBEventStore(tmp_path_factory.mktemp("ticketed") / "events.duckdb")
    for offset in range(0, len(events), 700):
        store.append(events[offset : offset + 700])
    yield store, events
    store.close()


RANGE = TimeRange(START + timedelta(days=2, minutes=17), START + timedelta(days=33, hours=5))


@pytest.mark.integration
@pytest.mark.parametrize("granularity", [Granularity.HOUR, Granularity.DAY, Granularity.MONTH])
@pytest.mark.parametrize(
    "scope", [Scope.tenant("acme"), Scope.all_tenants()], ids=["tenant", "all"]
)
def test_ticketed_events_match_the_oracle(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]], scope: Scope, granularity: Granularity
) -> None:
    store, events = loaded
    for concert in ("concert-1", "concert-2"):
        got = ticketed_events.ticketed_event_analytics(store, scope, concert, RANGE, granularity)
        assert got == oracle(events, scope, concert, RANGE, granularity)
        assert got.conversion_rate == metrics.overall_conversion_rate(
            store, scope, RANGE, MetricFilters(ticketed_event_id=concert)
        )
        assert got.views and got.buyers and got.top_referrers and got.revenue


@pytest.mark.integration
def test_unknown_and_quiet_ticketed_events(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
) -> None:
    store, _ = loaded
    acme = Scope.tenant("acme")
    with pytest.raises(TicketedEventNotFoundError):
        ticketed_events.ticketed_event_analytics(store, acme, "nope", RANGE, Granularity.DAY)
    with pytest.raises(TicketedEventNotFoundError):
        ticketed_events.ticketed_event_analytics(
            store, Scope.tenant("intruder"), "concert-1", RANGE, Granularity.DAY
        )
    later = TimeRange(START + timedelta(days=400), START + timedelta(days=401))
    quiet = ticketed_events.ticketed_event_analytics(
        store, acme, "concert-1", later, Granularity.HOUR
    )
    assert (quiet.views, quiet.visitors, quiet.sales_velocity_tickets_per_hour) == (0, 0, 0.0)
    assert len(quiet.buckets) == 24 and not quiet.top_countries


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    store = DuckDBEventStore(tmp_path_factory.mktemp("ticketed-property") / "events.duckdb")
    yield store
    store.close()


@pytest.mark.integration
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32),
    people=st.integers(1, 20),
    granularity=st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.WEEK]),
    start_hours=st.integers(0, 20 * 24),
    length_hours=st.integers(1, 20 * 24),
)
def test_property_ticketed_events_match_the_oracle(
    shared_store: DuckDBEventStore,
    seed: int,
    people: int,
    granularity: Granularity,
    start_hours: int,
    length_hours: int,
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    events = clustered_events(seed, people, tenants=(tenant,), span=timedelta(days=25), nobody=2)
    shared_store.append(events)
    tr = TimeRange(
        START + timedelta(hours=start_hours), START + timedelta(hours=start_hours + length_hours)
    )
    scope = Scope.tenant(tenant)
    want = oracle(events, scope, "concert-1", tr, granularity)
    if want is None:
        with pytest.raises(TicketedEventNotFoundError):
            ticketed_events.ticketed_event_analytics(
                shared_store, scope, "concert-1", tr, granularity
            )
    else:
        got = ticketed_events.ticketed_event_analytics(
            shared_store, scope, "concert-1", tr, granularity
        )
        assert got == want
