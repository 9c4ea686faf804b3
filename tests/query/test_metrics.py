"""Every metric against an independent plain-Python computation over the same events."""

from __future__ import annotations

import dataclasses
import itertools
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.model import TrackedEvent, TrackedEventType
from services.query import metrics
from services.query.metrics import (
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
)
from services.storage.event_store import DuckDBEventStore
from tests.storage.generated_events import random_event, random_events

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DATA_START = datetime(2024, 2, 26, 22, 0, tzinfo=UTC)
# Starts and ends mid-bucket for every granularity, and crosses a month end.
RANGE = TimeRange(
    DATA_START + timedelta(days=1, hours=3, minutes=7), DATA_START + timedelta(days=38)
)


# --- the oracle: deliberately written differently from the SQL -----------------------


def oracle_bucket(moment: datetime, granularity: Granularity) -> datetime:
    moment = moment.astimezone(UTC)
    if granularity in (Granularity.MINUTE, Granularity.HOUR, Granularity.DAY):
        size = {
            Granularity.MINUTE: timedelta(minutes=1),
            Granularity.HOUR: timedelta(hours=1),
            Granularity.DAY: timedelta(days=1),
        }[granularity]
        return EPOCH + ((moment - EPOCH) // size) * size
    day = moment.date()
    if granularity is Granularity.WEEK:
        monday = day - timedelta(days=day.isocalendar().weekday - 1)
        return datetime(monday.year, monday.month, monday.day, tzinfo=UTC)
    return datetime(day.year, day.month, 1, tzinfo=UTC)


def oracle_buckets(time_range: TimeRange, granularity: Granularity) -> list[datetime]:
    out: list[datetime] = []
    moment = time_range.start
    while moment < time_range.end:
        bucket = oracle_bucket(moment, granularity)
        if not out or out[-1] != bucket:
            out.append(bucket)
        moment += timedelta(minutes=1) if granularity is Granularity.MINUTE else timedelta(hours=1)
    last = oracle_bucket(time_range.end - timedelta(microseconds=1), granularity)
    if out[-1] != last:
        out.append(last)
    return out


def actor(event: TrackedEvent) -> tuple[str, str, str] | None:
    if event.user_id:
        return (event.tenant_id, "user", event.user_id)
    if event.anonymous_id:
        return (event.tenant_id, "anonymous", event.anonymous_id)
    return None


def in_scope(event: TrackedEvent, scope: Scope, start: datetime, end: datetime) -> bool:
    tenant_ok = scope.tenant_id is None or event.tenant_id == scope.tenant_id
    return tenant_ok and start <= event.occurred_at < end


def matches(event: TrackedEvent, filters: MetricFilters, *, event_filters: bool = True) -> bool:
    if (
        filters.ticketed_event_id is not None
        and event.ticketed_event_id != filters.ticketed_event_id
    ):
        return False
    if not event_filters:
        return True
    if filters.event_name is not None and event.event_name != filters.event_name:
        return False
    return filters.event_type is None or event.event_type == filters.event_type


@dataclass
class Oracle:
    events: list[TrackedEvent]

    def selected(
        self, scope: Scope, start: datetime, end: datetime, filters: MetricFilters, **kw: bool
    ) -> Iterator[TrackedEvent]:
        return (
            e for e in self.events if in_scope(e, scope, start, end) and matches(e, filters, **kw)
        )

    def event_counts(
        self, scope: Scope, tr: TimeRange, g: Granularity, f: MetricFilters
    ) -> tuple[EventCountRow, ...]:
        counts = Counter(
            (oracle_bucket(e.occurred_at, g), e.event_name, e.event_type.value)
            for e in self.selected(scope, tr.start, tr.end, f)
        )
        return tuple(
            EventCountRow(bucket, name, TrackedEventType(kind), n)
            for (bucket, name, kind), n in sorted(counts.items())
        )

    def users(self, events: Iterator[TrackedEvent]) -> int:
        return len({a for e in events if (a := actor(e)) is not None})

    def active_users(
        self, scope: Scope, tr: TimeRange, g: Granularity, f: MetricFilters
    ) -> metrics.ActiveUsers:
        per_bucket: dict[datetime, set[tuple[str, str, str]]] = defaultdict(set)
        for e in self.selected(scope, tr.start, tr.end, f):
            if (a := actor(e)) is not None:
                per_bucket[oracle_bucket(e.occurred_at, g)].add(a)
        end = tr.end
        return metrics.ActiveUsers(
            buckets=tuple(
                ActiveUsersRow(b, len(per_bucket.get(b, ()))) for b in oracle_buckets(tr, g)
            ),
            as_of=end,
            dau=self.users(self.selected(scope, end - timedelta(days=1), end, f)),
            wau=self.users(self.selected(scope, end - timedelta(days=7), end, f)),
            mau=self.users(self.selected(scope, end - timedelta(days=30), end, f)),
        )

    def conversions(
        self, scope: Scope, tr: TimeRange, g: Granularity, f: MetricFilters
    ) -> tuple[ConversionRow, ...]:
        count: Counter[datetime] = Counter()
        converting: dict[datetime, set[object]] = defaultdict(set)
        active: dict[datetime, set[object]] = defaultdict(set)
        for e in self.selected(scope, tr.start, tr.end, f, event_filters=False):
            bucket = oracle_bucket(e.occurred_at, g)
            a = actor(e)
            if a is not None:
                active[bucket].add(a)
            if e.event_type is TrackedEventType.CONVERSION and matches(e, f):
                count[bucket] += 1
                if a is not None:
                    converting[bucket].add(a)
        rows = []
        for b in oracle_buckets(tr, g):
            c, n = len(converting.get(b, ())), len(active.get(b, ()))
            rows.append(ConversionRow(b, count[b], c, n, c / n if n else 0.0))
        return tuple(rows)

    def overall_conversion_rate(self, scope: Scope, tr: TimeRange, f: MetricFilters) -> float:
        active = {
            a
            for e in self.selected(scope, tr.start, tr.end, f, event_filters=False)
            if (a := actor(e)) is not None
        }
        converting = {
            a
            for e in self.selected(scope, tr.start, tr.end, f)
            if e.event_type is TrackedEventType.CONVERSION and (a := actor(e)) is not None
        }
        return len(converting) / len(active) if active else 0.0

    def money_events(
        self, scope: Scope, start: datetime, end: datetime, f: MetricFilters
    ) -> Iterator[TrackedEvent]:
        return (
            e
            for e in self.selected(scope, start, end, f)
            if e.event_type is TrackedEventType.CONVERSION and e.currency
        )

    def revenue(
        self, scope: Scope, tr: TimeRange, g: Granularity, f: MetricFilters
    ) -> tuple[RevenueRow, ...]:
        groups: dict[tuple[datetime, str], list[TrackedEvent]] = defaultdict(list)
        for e in self.money_events(scope, tr.start, tr.end, f):
            groups[(oracle_bucket(e.occurred_at, g), e.currency)].append(e)
        rows = []
        for (bucket, currency), evs in sorted(groups.items()):
            orders = len({(e.tenant_id, e.order_id) for e in evs if e.order_id}) + sum(
                1 for e in evs if not e.order_id
            )
            rows.append(
                RevenueRow(
                    bucket,
                    currency,
                    sum((e.revenue for e in evs), Decimal(0)),
                    orders,
                    sum(e.quantity for e in evs),
                )
            )
        return tuple(rows)

    def geography(self, scope: Scope, tr: TimeRange, f: MetricFilters) -> tuple[GeoRow, ...]:
        events: Counter[str] = Counter()
        users: dict[str, set[object]] = defaultdict(set)
        money: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for e in self.selected(scope, tr.start, tr.end, f):
            country = e.enrichment.country_code
            events[country] += 1
            if (a := actor(e)) is not None:
                users[country].add(a)
        for e in self.money_events(scope, tr.start, tr.end, f):
            money[e.enrichment.country_code][e.currency] += e.revenue
        ordered = sorted(events, key=lambda c: (-events[c], c))
        return tuple(
            GeoRow(
                c,
                events[c],
                len(users[c]),
                tuple(CurrencyAmount(cur, amt) for cur, amt in sorted(money[c].items())),
            )
            for c in ordered
        )


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DuckDBEventStore, Oracle]]:
    events = random_events(7, 4000, start=DATA_START)
    store = DuckDBEventStore(tmp_path_factory.mktemp("metrics") / "events.duckdb")
    # Several appends, so actor keys are assigned across batches.
    for offset in range(0, len(events), 700):
        store.append(events[offset : offset + 700])
    yield store, Oracle(events)
    store.close()


SCOPES = [Scope.tenant("acme"), Scope.all_tenants()]
FILTERS = [
    MetricFilters(),
    MetricFilters(event_name="ticket_purchased"),
    MetricFilters(event_type=TrackedEventType.CONVERSION, ticketed_event_id="concert-1"),
    MetricFilters(ticketed_event_id="concert-2"),
]


def _check_all(
    store: DuckDBEventStore,
    oracle: Oracle,
    scope: Scope,
    time_range: TimeRange,
    granularity: Granularity,
    filters: MetricFilters,
) -> None:
    args = (store, scope, time_range, granularity, filters)
    oargs = (scope, time_range, granularity, filters)
    assert metrics.event_counts(*args) == oracle.event_counts(*oargs)
    assert metrics.active_users(*args) == oracle.active_users(*oargs)
    assert metrics.conversions(*args) == oracle.conversions(*oargs)
    assert metrics.revenue(*args) == oracle.revenue(*oargs)
    assert metrics.geography(store, scope, time_range, filters) == oracle.geography(
        scope, time_range, filters
    )
    assert metrics.overall_conversion_rate(store, scope, time_range, filters) == (
        oracle.overall_conversion_rate(scope, time_range, filters)
    )


# --- tests ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("granularity", list(Granularity))
@pytest.mark.parametrize("scope", SCOPES, ids=["tenant", "all-tenants"])
def test_every_metric_matches_the_oracle(
    loaded: tuple[DuckDBEventStore, Oracle], scope: Scope, granularity: Granularity
) -> None:
    store, oracle = loaded
    for filters in FILTERS:
        time_range = RANGE
        if granularity is Granularity.MINUTE:  # keep the dense series small
            time_range = TimeRange(RANGE.start, RANGE.start + timedelta(hours=30))
        _check_all(store, oracle, scope, time_range, granularity, filters)


# Starts exactly on a bucket boundary (every granularity but month / but week), where
# active users take the bare-key path: rows before the start must still be left out.
ALIGNED = [
    TimeRange(datetime(2024, 3, 4, tzinfo=UTC), datetime(2024, 3, 25, 12, tzinfo=UTC)),
    TimeRange(datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC)),
]


@pytest.mark.integration
@pytest.mark.parametrize("granularity", [g for g in Granularity if g is not Granularity.MINUTE])
@pytest.mark.parametrize("time_range", ALIGNED, ids=["monday", "first-of-month"])
def test_active_users_on_aligned_ranges_match_the_oracle(
    loaded: tuple[DuckDBEventStore, Oracle], time_range: TimeRange, granularity: Granularity
) -> None:
    store, oracle = loaded
    for scope, filters in itertools.product(SCOPES, FILTERS[:2]):
        assert metrics.active_users(store, scope, time_range, granularity, filters) == (
            oracle.active_users(scope, time_range, granularity, filters)
        )


@pytest.mark.integration
def test_hash_fallback_gives_the_same_exact_counts(
    loaded: tuple[DuckDBEventStore, Oracle], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, oracle = loaded
    monkeypatch.setattr(metrics, "BITMAP_BUDGET_BYTES", 0)
    for scope, filters in itertools.product(SCOPES, FILTERS[:2]):
        _check_all(store, oracle, scope, RANGE, Granularity.DAY, filters)


@pytest.mark.integration
def test_result_shapes_are_what_a_dashboard_needs(
    loaded: tuple[DuckDBEventStore, Oracle],
) -> None:
    store, _ = loaded
    users = metrics.active_users(store, Scope.tenant("acme"), RANGE, Granularity.WEEK)
    starts = [row.bucket_start for row in users.buckets]
    assert all(s.weekday() == 0 and s.tzinfo is UTC for s in starts)  # ISO weeks, UTC
    assert starts[0] <= RANGE.start < starts[0] + timedelta(weeks=1)
    assert users.dau <= users.wau <= users.mau
    assert users.mau > 0
    months = metrics.active_users(store, Scope.tenant("acme"), RANGE, Granularity.MONTH)
    assert [r.bucket_start.date() for r in months.buckets] == [
        date(2024, 2, 1),
        date(2024, 3, 1),
        date(2024, 4, 1),
    ]
    for row in metrics.conversions(store, Scope.tenant("acme"), RANGE, Granularity.DAY):
        assert row.converting_users <= row.active_users
        assert 0.0 <= row.conversion_rate <= 1.0


@pytest.mark.integration
def test_tenant_scope_never_sees_another_tenants_rows(tmp_path: Path) -> None:
    mine = random_events(11, 600, tenants=("acme",), start=DATA_START)
    # Same user ids, names and times in another tenant: nothing may leak or merge.
    theirs = [
        dataclasses.replace(e, tenant_id="intruder", event_id=f"x{i}", event_name="intruder_only")
        for i, e in enumerate(random_events(11, 600, tenants=("acme",), start=DATA_START))
    ]
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        store.append(mine)
        store.append(theirs)
        acme = Scope.tenant("acme")
        alone = Oracle(mine)
        for granularity in (Granularity.DAY, Granularity.WEEK):
            _check_all(store, alone, acme, RANGE, granularity, MetricFilters())
        names = {r.event_name for r in metrics.event_counts(store, acme, RANGE, Granularity.DAY)}
        assert "intruder_only" not in names
        assert metrics.event_counts(store, Scope.tenant("nobody"), RANGE, Granularity.DAY) == ()
        # Across tenants the shared ids are different people: twice the users.
        both = metrics.active_users(store, Scope.all_tenants(), RANGE, Granularity.DAY)
        assert both.mau == 2 * alone.active_users(acme, RANGE, Granularity.DAY, MetricFilters()).mau
        assert store.count("acme") == len(mine) and store.count("intruder") == len(theirs)


@pytest.mark.integration
def test_filter_values_are_parameters_not_sql(loaded: tuple[DuckDBEventStore, Oracle]) -> None:
    store, _ = loaded
    hostile = MetricFilters(event_name="x' OR '1'='1", ticketed_event_id="'; DROP TABLE t; --")
    assert metrics.event_counts(store, Scope.all_tenants(), RANGE, Granularity.DAY, hostile) == ()
    assert (
        metrics.event_counts(store, Scope.tenant("acme' OR 'a'='a"), RANGE, Granularity.DAY) == ()
    )


@pytest.mark.integration
def test_empty_store_gives_zeros(tmp_path: Path) -> None:
    with DuckDBEventStore(tmp_path / "empty.duckdb") as store:
        users = metrics.active_users(store, Scope.tenant("t"), RANGE, Granularity.WEEK)
        assert (users.dau, users.wau, users.mau) == (0, 0, 0)
        assert all(row.active_users == 0 for row in users.buckets)
        everyone = metrics.active_users(store, Scope.all_tenants(), RANGE, Granularity.DAY)
        assert everyone.mau == 0
        assert metrics.revenue(store, Scope.all_tenants(), RANGE, Granularity.DAY) == ()
        assert metrics.geography(store, Scope.tenant("t"), RANGE) == ()
        assert metrics.overall_conversion_rate(store, Scope.all_tenants(), RANGE) == 0.0
        assert metrics.overall_conversion_rate(store, Scope.tenant("t"), RANGE) == 0.0


@st.composite
def event_batches(draw: st.DrawFn, tenant_id: str, start: datetime) -> list[TrackedEvent]:
    """Hypothesis: a small batch of one tenant's events within 10 days of `start`."""
    seed = draw(st.integers(min_value=0, max_value=2**32))
    count = draw(st.integers(min_value=0, max_value=120))
    users = draw(st.integers(min_value=1, max_value=30))
    rng = random.Random(seed)
    return [
        random_event(
            rng,
            tenant_id=tenant_id,
            event_id=f"h{seed}-{i}",
            start=start,
            span=timedelta(days=10),
            users=users,
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    store = DuckDBEventStore(tmp_path_factory.mktemp("property") / "events.duckdb")
    yield store
    store.close()


@pytest.mark.integration
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.data(),
    granularity=st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.WEEK]),
    start_offset_minutes=st.integers(min_value=0, max_value=5 * 24 * 60),
    length_minutes=st.integers(min_value=1, max_value=9 * 24 * 60),
)
def test_property_counts_and_active_users_match_the_oracle(
    shared_store: DuckDBEventStore,
    data: st.DataObject,
    granularity: Granularity,
    start_offset_minutes: int,
    length_minutes: int,
) -> None:
    # Each example writes a fresh tenant into one store: earlier examples' rows are
    # other tenants' data that must never leak into this one's numbers.
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    start = datetime(2024, 3, 30, 20, 0, tzinfo=UTC)
    events = data.draw(event_batches(tenant, start))
    shared_store.append(events)
    time_range = TimeRange(
        start + timedelta(minutes=start_offset_minutes),
        start + timedelta(minutes=start_offset_minutes + length_minutes),
    )
    scope = Scope.tenant(tenant)
    oracle = Oracle(events)
    none = MetricFilters()
    assert metrics.event_counts(shared_store, scope, time_range, granularity) == (
        oracle.event_counts(scope, time_range, granularity, none)
    )
    assert metrics.active_users(shared_store, scope, time_range, granularity) == (
        oracle.active_users(scope, time_range, granularity, none)
    )
    assert shared_store.count(tenant) == len(events)


@pytest.mark.unit
def test_bucket_floor_is_utc_and_iso() -> None:
    moment = datetime(2024, 3, 3, 23, 59, 59, 999_999, tzinfo=UTC)  # a Sunday
    assert metrics.bucket_floor(moment, Granularity.WEEK) == datetime(2024, 2, 26, tzinfo=UTC)
    assert metrics.bucket_floor(moment, Granularity.MONTH) == datetime(2024, 3, 1, tzinfo=UTC)
    local = datetime.fromisoformat("2024-03-04T01:30:00+02:00")  # Sunday 23:30 UTC
    assert metrics.bucket_floor(local, Granularity.DAY) == datetime(2024, 3, 3, tzinfo=UTC)
    december = TimeRange(datetime(2023, 12, 20, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC))
    assert metrics.bucket_starts(december, Granularity.MONTH) == [
        datetime(2023, 12, 1, tzinfo=UTC),
        datetime(2024, 1, 1, tzinfo=UTC),
    ]


@pytest.mark.unit
def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        TimeRange(datetime(2024, 1, 1), datetime(2024, 1, 2))
    with pytest.raises(ValueError, match="before"):
        TimeRange(RANGE.end, RANGE.start)
    with pytest.raises(ValueError, match="empty"):
        Scope.tenant("")
    year = TimeRange(RANGE.start, RANGE.start + timedelta(days=400))
    with pytest.raises(ValueError, match="coarser"):
        metrics.bucket_starts(year, Granularity.MINUTE)
