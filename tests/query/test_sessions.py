"""Sessions against a plain-Python oracle over the same events."""

from __future__ import annotations

import statistics
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.model import TrackedEvent, TrackedEventType
from services.query import sessions, timelines
from services.query.metrics import Granularity, Scope, TimeRange
from services.query.sessions import SessionBucket, SessionStats
from services.storage.event_store import DuckDBEventStore
from tests.query.analytics_events import START, clustered_events
from tests.query.oracle_common import by_person, us
from tests.query.test_metrics import oracle_bucket, oracle_buckets


def oracle(
    events: list[TrackedEvent],
    scope: Scope,
    tr: TimeRange,
    granularity: Granularity,
    timeout: timedelta = sessions.DEFAULT_TIMEOUT,
) -> SessionStats:
    found: list[tuple[datetime, int, int]] = []  # (start, duration us, events)
    for evs in by_person(events, scope).values():
        seen = [e for e in evs if tr.start - timeout <= e.occurred_at < tr.end]
        current: list[TrackedEvent] = []
        for event in [*seen, None]:
            ends = event is None or (
                bool(current) and event.occurred_at - current[-1].occurred_at > timeout
            )
            if current and ends:
                first, last = current[0].occurred_at, current[-1].occurred_at
                if first >= tr.start:
                    found.append((first, us(first, last), len(current)))
                current = []
            if event is not None:
                current.append(event)
    grouped: dict[datetime, list[tuple[datetime, int, int]]] = defaultdict(list)
    for session in found:
        grouped[oracle_bucket(session[0], granularity)].append(session)
    buckets = []
    for start in oracle_buckets(tr, granularity):
        group = grouped.get(start, [])
        n = len(group)
        buckets.append(
            SessionBucket(
                start,
                n,
                (sum(d for _, d, _ in group) / n) / 1_000_000 if n else 0.0,
                sum(1 for *_, k in group if k == 1) / n if n else 0.0,
            )
        )
    durations = [d for _, d, _ in found]
    return SessionStats(
        tuple(buckets),
        len(found),
        (sum(durations) / len(durations)) / 1_000_000 if durations else 0.0,
        statistics.median(durations) / 1_000_000 if durations else 0.0,
    )


def _same(got: SessionStats, want: SessionStats) -> None:
    assert got.buckets == want.buckets
    assert (got.session_count, got.average_duration_seconds) == (
        want.session_count,
        want.average_duration_seconds,
    )
    # DuckDB interpolates the median in floating point.
    assert got.median_duration_seconds == pytest.approx(want.median_duration_seconds, rel=1e-12)


@pytest.fixture(scope="module")
def loaded(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DuckDBEventStore, list[TrackedEvent]]]:
    events = clustered_events(9, 80)
    store = DuckDBEventStore(tmp_path_factory.mktemp("sessions") / "events.duckdb")
    for offset in range(0, len(events), 600):
        store.append(events[offset : offset + 600])
    yield store, events
    store.close()


RANGE = TimeRange(START + timedelta(days=3, hours=2, minutes=11), START + timedelta(days=31))


@pytest.mark.integration
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "lexsorted"])
@pytest.mark.parametrize(
    "granularity", [Granularity.HOUR, Granularity.DAY, Granularity.WEEK, Granularity.MONTH]
)
@pytest.mark.parametrize(
    "scope", [Scope.tenant("acme"), Scope.all_tenants()], ids=["tenant", "all"]
)
def test_sessions_match_the_oracle(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
    scope: Scope,
    granularity: Granularity,
    packed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not packed:  # no bits to pack positions into: the rows are sorted instead
        monkeypatch.setattr(timelines, "PACKED_BITS", 0)
    store, events = loaded
    for timeout in (sessions.DEFAULT_TIMEOUT, timedelta(minutes=5), timedelta(hours=6)):
        got = sessions.session_analytics(store, scope, RANGE, granularity, timeout)
        _same(got, oracle(events, scope, RANGE, granularity, timeout))
    assert got.session_count > 0


@pytest.mark.integration
def test_minute_buckets_and_the_fixture_shape(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
) -> None:
    store, events = loaded
    tr = TimeRange(START + timedelta(days=5), START + timedelta(days=5, hours=20))
    scope = Scope.tenant("acme")
    _same(
        sessions.session_analytics(store, scope, tr, Granularity.MINUTE),
        oracle(events, scope, tr, Granularity.MINUTE),
    )
    whole = sessions.session_analytics(store, scope, RANGE, Granularity.WEEK)
    assert 0 < whole.median_duration_seconds < whole.average_duration_seconds * 10
    assert any(0 < b.bounce_rate < 1 for b in whole.buckets)


def _event(at: datetime, user: str = "u") -> TrackedEvent:
    return TrackedEvent(
        tenant_id="t",
        event_id=f"{user}-{at.isoformat()}-{uuid.uuid4().hex[:4]}",
        event_type=TrackedEventType.PAGE_VIEW,
        event_name="page_view",
        occurred_at=at,
        received_at=at,
        user_id=user,
    )


@pytest.mark.integration
def test_edges_of_the_definition(tmp_path: Path) -> None:
    t0 = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
    half_hour = timedelta(minutes=30)
    with DuckDBEventStore(tmp_path / "s.duckdb") as store:
        store.append(
            [
                # a: a gap of exactly the timeout continues; one more microsecond splits.
                _event(t0, "a"),
                _event(t0 + half_hour, "a"),
                _event(t0 + 2 * half_hour + timedelta(microseconds=1), "a"),
                # b: began 20 minutes before the range: not counted.
                _event(t0 - timedelta(minutes=20), "b"),
                _event(t0 + timedelta(minutes=5), "b"),
                # c: two simultaneous events: one session of 0 s, not a bounce.
                _event(t0 + timedelta(minutes=1), "c"),
                _event(t0 + timedelta(minutes=1), "c"),
            ]
        )
        tr = TimeRange(t0, t0 + timedelta(hours=3))
        stats = sessions.session_analytics(store, Scope.tenant("t"), tr, Granularity.HOUR)
        assert stats.session_count == 3
        assert [(b.sessions, b.bounce_rate) for b in stats.buckets] == [
            (2, 0.0),
            (1, 1.0),
            (0, 0.0),
        ]
        assert stats.buckets[0].average_duration_seconds == 900.0  # (1800 + 0) / 2
        assert stats.median_duration_seconds == 0.0
        # Cut at the range end: a's first session ends inside a range of 31 minutes.
        short = TimeRange(t0, t0 + timedelta(minutes=29))
        cut = sessions.session_analytics(store, Scope.tenant("t"), short, Granularity.HOUR)
        assert (cut.session_count, cut.average_duration_seconds) == (2, 0.0)


@pytest.mark.unit
def test_timeouts_are_bounded() -> None:
    with pytest.raises(ValueError, match="timeout"):
        sessions.check_timeout(timedelta(0))
    with pytest.raises(ValueError, match="timeout"):
        sessions.check_timeout(timedelta(days=2))


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    store = DuckDBEventStore(tmp_path_factory.mktemp("session-property") / "events.duckdb")
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
    people=st.integers(1, 10),
    timeout_minutes=st.integers(1, 24 * 60),
    granularity=st.sampled_from([Granularity.HOUR, Granularity.DAY, Granularity.WEEK]),
    start_minutes=st.integers(0, 5 * 24 * 60),
    length_minutes=st.integers(1, 6 * 24 * 60),
)
def test_property_sessions_match_the_oracle(
    shared_store: DuckDBEventStore,
    seed: int,
    people: int,
    timeout_minutes: int,
    granularity: Granularity,
    start_minutes: int,
    length_minutes: int,
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    events = clustered_events(seed, people, tenants=(tenant,), span=timedelta(days=8), nobody=1)
    shared_store.append(events)
    tr = TimeRange(
        START + timedelta(minutes=start_minutes),
        START + timedelta(minutes=start_minutes + length_minutes),
    )
    timeout = timedelta(minutes=timeout_minutes)
    scope = Scope.tenant(tenant)
    _same(
        sessions.session_analytics(shared_store, scope, tr, granularity, timeout),
        oracle(events, scope, tr, granularity, timeout),
    )
