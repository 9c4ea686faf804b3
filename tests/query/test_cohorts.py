"""Cohorts and retention against a plain-Python oracle over the same events."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.model import TrackedEvent, TrackedEventType
from services.query import cohorts
from services.query.cohorts import CohortRow, CohortSpec
from services.query.metrics import Granularity, Scope, TimeRange
from services.storage.event_store import DuckDBEventStore
from tests.query.analytics_events import START, clustered_events
from tests.query.oracle_common import by_person, prop

AS_OF = datetime(2024, 4, 20, 10, 0, tzinfo=UTC)


# --- the oracle ----------------------------------------------------------------------


def _period(day: date, period: Granularity) -> tuple[int, int, int]:
    """A period as (year, month, day) of its first day."""
    if period is Granularity.DAY:
        return (day.year, day.month, day.day)
    if period is Granularity.WEEK:
        monday = day - timedelta(days=day.weekday())
        return (monday.year, monday.month, monday.day)
    return (day.year, day.month, 1)


def _periods(first: date, count: int, period: Granularity) -> list[tuple[int, int, int]]:
    """`count` consecutive periods from the one holding `first`."""
    out: list[tuple[int, int, int]] = []
    day = first
    while len(out) < count:
        key = _period(day, period)
        if not out or out[-1] != key:
            out.append(key)
        day += timedelta(days=1)
    return out


def oracle(
    events: list[TrackedEvent], scope: Scope, tr: TimeRange, spec: CohortSpec
) -> tuple[CohortRow, ...]:
    as_of = spec.as_of
    assert as_of is not None
    last = _period((tr.end - timedelta(microseconds=1)).date(), spec.period)
    cohort_periods = [_period(tr.start.date(), spec.period)]
    day = tr.start.date()
    while cohort_periods[-1] != last:
        day += timedelta(days=1)
        if _period(day, spec.period) != cohort_periods[-1]:
            cohort_periods.append(_period(day, spec.period))
    matrix = _periods(tr.start.date(), len(cohort_periods) + spec.period_count, spec.period)
    position = {p: i for i, p in enumerate(matrix)}
    sizes = [0] * len(cohort_periods)
    retained = [[0] * spec.period_count for _ in cohort_periods]
    for evs in by_person(events, scope).values():
        marks = [e for e in evs if spec.cohort_event_name in (None, e.event_name)]
        if not marks:
            continue
        first_time = min(e.occurred_at for e in marks)
        if not tr.start <= first_time < tr.end:
            continue
        firsts = [e for e in marks if e.occurred_at == first_time]
        if not any(all(prop(e, k) == v for k, v in spec.property_equals) for e in firsts):
            continue
        cohort = position[_period(first_time.date(), spec.period)]
        sizes[cohort] += 1
        active = {
            position.get(_period(e.occurred_at.date(), spec.period))
            for e in evs
            if spec.return_event_name in (None, e.event_name)
        }
        for offset in range(spec.period_count):
            if cohort + offset in active:
                retained[cohort][offset] += 1
    rows = []
    for i, key in enumerate(cohort_periods):
        starts = [datetime(*matrix[i + k], tzinfo=UTC) for k in range(spec.period_count)]
        counts = tuple(n for n, s in zip(retained[i], starts, strict=True) if s < as_of)
        rows.append(
            CohortRow(
                datetime(*key, tzinfo=UTC),
                sizes[i],
                counts,
                tuple(n / sizes[i] if sizes[i] else 0.0 for n in counts),
            )
        )
    return tuple(rows)


# --- fixtures and tests --------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DuckDBEventStore, list[TrackedEvent]]]:
    events = clustered_events(5, 120, span=timedelta(days=70), max_visits=6)
    store = DuckDBEventStore(tmp_path_factory.mktemp("cohorts") / "events.duckdb")
    for offset in range(0, len(events), 800):
        store.append(events[offset : offset + 800])
    yield store, events
    store.close()


RANGE = TimeRange(START + timedelta(days=9, hours=7), START + timedelta(days=45))
SPECS = {
    "first-seen-weeks": CohortSpec(),
    "purchase-days": CohortSpec(
        cohort_event_name="ticket_purchased", period=Granularity.DAY, period_count=10
    ),
    "signup-returns-months": CohortSpec(
        cohort_event_name="signup", return_event_name="ticket_viewed", period=Granularity.MONTH
    ),
    "first-seen-google": CohortSpec(property_equals=(("utm_source", "google"),)),
    "music-buyers": CohortSpec(
        cohort_event_name="ticket_purchased",
        return_event_name="ticket_purchased",
        property_equals=(("category", "music"),),
        period_count=4,
    ),
    "number-property": CohortSpec(property_equals=(("category", "7"),), period_count=3),
}


@pytest.mark.integration
@pytest.mark.parametrize("hashed", [False, True], ids=["bitmaps", "hash-join"])
@pytest.mark.parametrize(
    "scope", [Scope.tenant("acme"), Scope.all_tenants()], ids=["tenant", "all"]
)
def test_cohorts_match_the_oracle(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
    scope: Scope,
    hashed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, events = loaded
    if hashed:
        monkeypatch.setattr(cohorts, "BITMAP_BUDGET_BYTES", 0)
    for name, spec in SPECS.items():
        spec = replace(spec, as_of=AS_OF)
        assert cohorts.compute_cohorts(store, scope, RANGE, spec) == oracle(
            events, scope, RANGE, spec
        ), name


@pytest.mark.integration
def test_the_fixture_has_real_retention(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
) -> None:
    store, _ = loaded
    spec = CohortSpec(as_of=datetime(2024, 5, 29, tzinfo=UTC))
    rows = cohorts.compute_cohorts(store, Scope.tenant("acme"), RANGE, spec)
    assert [r.cohort_start.weekday() for r in rows] == [0] * len(rows)
    assert rows[0].cohort_start <= RANGE.start < rows[1].cohort_start
    assert all(r.size > 0 for r in rows[1:-1])
    full = rows[1]
    assert full.retained_counts[0] == full.size  # any event: the cohort's own period
    assert 0 < full.retained_counts[1] < full.size
    # Rows stop at the last period begun by as_of: a triangle, not zeros.
    lengths = [len(r.retained_counts) for r in rows]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == 12 > lengths[-1]


def _event(name: str, at: datetime, user: str, props: str = "{}") -> TrackedEvent:
    return TrackedEvent(
        tenant_id="t",
        event_id=f"{name}-{user}-{at.isoformat()}",
        event_type=TrackedEventType.TRACK,
        event_name=name,
        occurred_at=at,
        received_at=at,
        user_id=user,
        properties_json=props,
    )


@pytest.mark.integration
def test_first_occurrence_before_the_range_is_no_cohort(tmp_path: Path) -> None:
    monday = datetime(2024, 3, 4, tzinfo=UTC)
    with DuckDBEventStore(tmp_path / "c.duckdb") as store:
        store.append(
            [
                # Seen on Monday, before a range starting on Wednesday: no cohort.
                _event("visit", monday, "early"),
                _event("visit", monday + timedelta(days=3), "early"),
                # First seen Wednesday: the (partial) first week's cohort.
                _event("visit", monday + timedelta(days=2), "new"),
                _event("visit", monday + timedelta(days=8), "new"),
                # Two first events at the same instant; one matches the filter.
                _event("visit", monday + timedelta(days=9), "tie", '{"src": "a"}'),
                _event("visit", monday + timedelta(days=9), "tie", '{"src": "b"}'),
            ]
        )
        tr = TimeRange(monday + timedelta(days=2), monday + timedelta(days=14))
        spec = CohortSpec(period_count=3, as_of=monday + timedelta(days=60))
        rows = cohorts.compute_cohorts(store, Scope.tenant("t"), tr, spec)
        assert [(r.cohort_start, r.size, r.retained_counts) for r in rows] == [
            (monday, 1, (1, 1, 0)),
            (monday + timedelta(days=7), 1, (1, 0, 0)),
        ]
        only_b = replace(spec, property_equals=(("src", "b"),))
        assert [r.size for r in cohorts.compute_cohorts(store, Scope.tenant("t"), tr, only_b)] == [
            0,
            1,
        ]
        assert rows[0].retention_rates == (1.0, 1.0, 0.0)


@pytest.mark.unit
def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="days, weeks or months"):
        CohortSpec(period=Granularity.HOUR)
    with pytest.raises(ValueError, match="period_count"):
        CohortSpec(period_count=53)


@pytest.mark.integration
def test_too_many_cohorts_are_refused(tmp_path: Path) -> None:
    with DuckDBEventStore(tmp_path / "c.duckdb") as store:
        decade = TimeRange(START, START + timedelta(days=3650))
        with pytest.raises(ValueError, match="cohorts"):
            cohorts.compute_cohorts(
                store, Scope.tenant("t"), decade, CohortSpec(period=Granularity.DAY)
            )


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    store = DuckDBEventStore(tmp_path_factory.mktemp("cohort-property") / "events.duckdb")
    yield store
    store.close()


@pytest.mark.integration
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32),
    people=st.integers(1, 15),
    period=st.sampled_from([Granularity.DAY, Granularity.WEEK, Granularity.MONTH]),
    period_count=st.integers(1, 8),
    cohort_event=st.sampled_from([None, "page_view", "ticket_purchased"]),
    return_event=st.sampled_from([None, "page_view", "ticket_viewed"]),
    filtered=st.booleans(),
    start_hours=st.integers(0, 30 * 24),
    length_hours=st.integers(1, 30 * 24),
    as_of_days=st.integers(0, 80),
)
def test_property_cohorts_match_the_oracle(
    shared_store: DuckDBEventStore,
    seed: int,
    people: int,
    period: Granularity,
    period_count: int,
    cohort_event: str | None,
    return_event: str | None,
    filtered: bool,
    start_hours: int,
    length_hours: int,
    as_of_days: int,
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    events = clustered_events(seed, people, tenants=(tenant,), span=timedelta(days=50), nobody=1)
    shared_store.append(events)
    spec = CohortSpec(
        cohort_event_name=cohort_event,
        return_event_name=return_event,
        period=period,
        period_count=period_count,
        property_equals=(("category", "music"),) if filtered else (),
        as_of=START + timedelta(days=as_of_days),
    )
    tr = TimeRange(
        START + timedelta(hours=start_hours), START + timedelta(hours=start_hours + length_hours)
    )
    scope = Scope.tenant(tenant)
    assert cohorts.compute_cohorts(shared_store, scope, tr, spec) == oracle(events, scope, tr, spec)
