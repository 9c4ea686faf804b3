"""Funnels against a brute-force oracle: every sequence of every person, enumerated."""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.model import TrackedEvent, TrackedEventType
from services.query import funnels, timelines
from services.query.funnels import (
    FunnelBreakdown,
    FunnelOrder,
    FunnelResult,
    FunnelSpec,
    FunnelStep,
    FunnelStepResult,
)
from services.query.metrics import Scope, TimeRange
from services.storage.event_store import DuckDBEventStore
from tests.query.analytics_events import START, clustered_events
from tests.query.oracle_common import by_person, prop, us

RANGE = TimeRange(START + timedelta(days=2, hours=5), START + timedelta(days=30))


# --- the oracle ----------------------------------------------------------------------


def _matches(event: TrackedEvent, step: FunnelStep) -> bool:
    return event.event_name == step.event_name and all(
        prop(event, key) == value for key, value in step.property_equals
    )


def _sequences(evs: list[TrackedEvent], spec: FunnelSpec, tr: TimeRange) -> list[int | None]:
    """ORDERED / STRICT: shortest duration to each step over every valid sequence."""
    window = us(START, START + spec.window)
    best: list[int | None] = [None] * len(spec.steps)

    def record(k: int, duration: int) -> None:
        current = best[k]
        best[k] = duration if current is None else min(current, duration)

    def extend(first: TrackedEvent, previous: TrackedEvent, k: int) -> None:
        for event in evs:
            if event.occurred_at <= previous.occurred_at:
                continue
            if us(first.occurred_at, event.occurred_at) > window:
                break
            if not _matches(event, spec.steps[k]):
                continue
            if spec.order is FunnelOrder.STRICT and any(
                previous.occurred_at < other.occurred_at < event.occurred_at for other in evs
            ):
                continue
            if any(
                x.event_name in spec.exclusion_event_names
                and first.occurred_at < x.occurred_at < event.occurred_at
                for x in evs
            ):
                continue
            record(k, us(first.occurred_at, event.occurred_at))
            if k + 1 < len(spec.steps):
                extend(first, event, k + 1)

    for first in evs:
        if _matches(first, spec.steps[0]) and tr.start <= first.occurred_at < tr.end:
            record(0, 0)
            extend(first, first, 1)
    return best


def _any_order(evs: list[TrackedEvent], spec: FunnelSpec, tr: TimeRange) -> list[int | None]:
    window = us(START, START + spec.window)
    best: list[int | None] = [None] * len(spec.steps)
    for first in evs:
        if not (
            tr.start <= first.occurred_at < tr.end and any(_matches(first, s) for s in spec.steps)
        ):
            continue
        spoilers = [
            x.occurred_at
            for x in evs
            if x.event_name in spec.exclusion_event_names and x.occurred_at > first.occurred_at
        ]
        spoiler = min(spoilers) if spoilers else None
        done: set[int] = set()
        for event in evs:
            if event.occurred_at < first.occurred_at:
                continue
            if us(first.occurred_at, event.occurred_at) > window:
                break
            if spoiler is not None and event.occurred_at > spoiler:
                break
            before = len(done)
            done |= {k for k, step in enumerate(spec.steps) if _matches(event, step)}
            for level in range(before, len(done)):
                duration = us(first.occurred_at, event.occurred_at)
                current = best[level]
                best[level] = duration if current is None else min(current, duration)
    return best


def _entry_value(evs: list[TrackedEvent], spec: FunnelSpec, tr: TimeRange) -> str:
    assert spec.breakdown_property
    entries = [
        e
        for e in evs
        if tr.start <= e.occurred_at < tr.end
        and (
            any(_matches(e, s) for s in spec.steps)
            if spec.order is FunnelOrder.ANY
            else _matches(e, spec.steps[0])
        )
    ]
    first = min(entries, key=lambda e: (e.occurred_at, prop(e, spec.breakdown_property) or ""))
    return prop(first, spec.breakdown_property) or ""


def _summary(per_person: list[list[int | None]], spec: FunnelSpec) -> tuple[FunnelStepResult, ...]:
    entered = len(per_person)
    out = []
    previous = entered
    for k, step in enumerate(spec.steps):
        times = [p[k] for p in per_person if p[k] is not None]
        users = len(times)
        if k == 0:
            from_previous = 1.0 if users else 0.0
            drop = 0.0
        else:
            from_previous = users / previous if previous else 0.0
            drop = 1.0 - from_previous if previous else 0.0
        out.append(
            FunnelStepResult(
                k,
                step.event_name,
                users,
                users / entered if entered else 0.0,
                from_previous,
                drop,
                statistics.median(times) / 1_000_000 if times else 0.0,
            )
        )
        previous = users
    return tuple(out)


def oracle(
    events: list[TrackedEvent], scope: Scope, tr: TimeRange, spec: FunnelSpec
) -> FunnelResult:
    rows = []
    for evs in by_person(events, scope).values():
        best = (
            _any_order(evs, spec, tr)
            if spec.order is FunnelOrder.ANY
            else _sequences(evs, spec, tr)
        )
        if best[0] is not None:
            # Reaching a step implies reaching every earlier one.
            assert all(b is not None for b in best[: sum(b is not None for b in best)])
            value = _entry_value(evs, spec, tr) if spec.breakdown_property else ""
            rows.append((value, best))
    breakdowns = [FunnelBreakdown(None, _summary([b for _, b in rows], spec))]
    if spec.breakdown_property and rows:
        sizes: dict[str, int] = {}
        for value, _ in rows:
            sizes[value] = sizes.get(value, 0) + 1
        chosen = sorted(sizes, key=lambda v: (-sizes[v], v))[: funnels.MAX_BREAKDOWN_VALUES]
        for value in chosen:
            breakdowns.append(
                FunnelBreakdown(value, _summary([b for v, b in rows if v == value], spec))
            )
    return FunnelResult(tuple(breakdowns))


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DuckDBEventStore, list]]:
    events = clustered_events(3, 70)
    store = DuckDBEventStore(tmp_path_factory.mktemp("funnels") / "events.duckdb")
    for offset in range(0, len(events), 500):
        store.append(events[offset : offset + 500])
    yield store, events
    store.close()


STEPS = (
    FunnelStep("page_view"),
    FunnelStep("ticket_viewed"),
    FunnelStep("buy_clicked"),
    FunnelStep("ticket_purchased"),
)
SPECS = {
    "3-steps": FunnelSpec(STEPS[1:]),
    "4-steps-1h": FunnelSpec(STEPS, window=timedelta(hours=1)),
    "exclusion": FunnelSpec(STEPS[:3], exclusion_event_names=("cart_opened", "promo_seen")),
    "property-filter": FunnelSpec(
        (FunnelStep("page_view", (("category", "music"),)), FunnelStep("ticket_viewed"))
    ),
    "repeated-step": FunnelSpec(
        (FunnelStep("page_view"), FunnelStep("ticket_viewed"), FunnelStep("page_view"))
    ),
    "breakdown": FunnelSpec(STEPS[:3], window=timedelta(days=2), breakdown_property="utm_source"),
    "number-property": FunnelSpec(STEPS[:2], breakdown_property="category"),
    "short-window": FunnelSpec(STEPS[:2], window=timedelta(minutes=5)),
}


# --- tests ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "lexsorted"])
@pytest.mark.parametrize("order", list(FunnelOrder))
@pytest.mark.parametrize(
    "scope", [Scope.tenant("acme"), Scope.all_tenants()], ids=["tenant", "all"]
)
def test_funnels_match_the_oracle(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
    order: FunnelOrder,
    scope: Scope,
    packed: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, events = loaded
    if not packed:  # no bits to pack positions into: the rows are sorted instead
        monkeypatch.setattr(timelines, "PACKED_BITS", 0)
    for name, spec in SPECS.items():
        spec = replace(spec, order=order)
        got = funnels.compute_funnel(store, scope, RANGE, spec)
        assert got == oracle(events, scope, RANGE, spec), name
    assert got.breakdowns[0].steps[0].users > 0


@pytest.mark.integration
def test_the_funnel_converts_somebody(loaded: tuple[DuckDBEventStore, list[TrackedEvent]]) -> None:
    """The fixture is only a good check when people get through, with time between."""
    store, _ = loaded
    result = funnels.compute_funnel(store, Scope.tenant("acme"), RANGE, SPECS["3-steps"])
    first, *_, last = result.breakdowns[0].steps
    assert first.users > last.users > 0
    assert last.median_seconds_from_start > 0
    assert 0 < last.conversion_rate_from_start < 1


def _event(
    name: str, at: datetime, *, user: str = "u", tenant: str = "t", props: str = "{}"
) -> TrackedEvent:
    return TrackedEvent(
        tenant_id=tenant,
        event_id=f"{name}-{at.isoformat()}-{user}-{uuid.uuid4().hex[:6]}",
        event_type=TrackedEventType.TRACK,
        event_name=name,
        occurred_at=at,
        received_at=at,
        user_id=user,
        properties_json=props,
    )


T0 = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
ABC = (FunnelStep("a"), FunnelStep("b"), FunnelStep("c"))


def _users(store: DuckDBEventStore, spec: FunnelSpec, tr: TimeRange | None = None) -> list[int]:
    tr = tr or TimeRange(T0 - timedelta(hours=1), T0 + timedelta(hours=1))
    result = funnels.compute_funnel(store, Scope.tenant("t"), tr, spec)
    return [s.users for s in result.breakdowns[0].steps]


@pytest.mark.integration
def test_edge_cases_of_the_definition(tmp_path: Path) -> None:
    s = timedelta(seconds=1)
    with DuckDBEventStore(tmp_path / "e.duckdb") as store:
        store.append(
            [
                # u1: a and b simultaneous: b is not after a.
                _event("a", T0, user="u1"),
                _event("b", T0, user="u1"),
                # u2: a, x, b, c: ORDERED yes, STRICT no (x in between), x excluded.
                _event("a", T0, user="u2"),
                _event("x", T0 + s, user="u2"),
                _event("b", T0 + 2 * s, user="u2"),
                _event("c", T0 + 3 * s, user="u2"),
                # u3: c exactly at the window's end counts.
                _event("a", T0, user="u3"),
                _event("b", T0 + 10 * s, user="u3"),
                _event("c", T0 + 60 * s, user="u3"),
                # u4: entry inside the range, the last step after the range end.
                _event("a", T0 + timedelta(minutes=59), user="u4"),
                _event("b", T0 + timedelta(minutes=61), user="u4"),
                _event("c", T0 + timedelta(minutes=62), user="u4"),
                # u5: b and c before any a: nothing after step 1.
                _event("b", T0 - 2 * s, user="u5"),
                _event("c", T0 - s, user="u5"),
                _event("a", T0, user="u5"),
                # u6: entry before the range: not an entrant.
                _event("a", T0 - timedelta(hours=2), user="u6"),
                _event("b", T0, user="u6"),
                # u7: an exclusion simultaneous with the entry does not spoil.
                _event("x", T0, user="u7"),
                _event("a", T0, user="u7"),
                _event("b", T0 + s, user="u7"),
            ]
        )
        minute = timedelta(minutes=1)
        assert _users(store, FunnelSpec(ABC, window=minute)) == [6, 3, 2]
        assert _users(store, FunnelSpec(ABC, window=minute, order=FunnelOrder.STRICT)) == [6, 2, 1]
        excluded = FunnelSpec(ABC, window=minute, exclusion_event_names=("x",))
        assert _users(store, excluded) == [6, 2, 1]
        # One microsecond less and u3's c is out of the window.
        assert _users(store, FunnelSpec(ABC, window=minute - timedelta(microseconds=1))) == [
            6,
            3,
            1,
        ]
        longer = FunnelSpec(ABC, window=timedelta(minutes=5))
        assert _users(store, longer) == [6, 4, 3]
        # In any order, an attempt starts at any step inside the range: u5's b and c
        # before its a count, u6 enters with its b, u4's b (after the range) does not.
        wider = TimeRange(T0 - timedelta(minutes=1), T0 + timedelta(hours=1))
        anywhere = FunnelSpec(ABC, window=minute, order=FunnelOrder.ANY)
        assert _users(store, anywhere, wider) == [7, 5, 3]
        medians = funnels.compute_funnel(
            store, Scope.tenant("t"), wider, FunnelSpec(ABC, window=minute)
        )
        assert [s.median_seconds_from_start for s in medians.breakdowns[0].steps] == [0, 2, 31.5]


@pytest.mark.integration
def test_breakdown_takes_the_first_entry_and_ranks_values(tmp_path: Path) -> None:
    s = timedelta(seconds=1)
    with DuckDBEventStore(tmp_path / "b.duckdb") as store:
        store.append(
            [
                _event("a", T0, user="u1", props='{"src": "x"}'),
                _event("a", T0 + s, user="u1", props='{"src": "y"}'),
                _event("b", T0 + 2 * s, user="u1"),
                _event("a", T0, user="u2", props='{"src": "y"}'),
                _event("a", T0, user="u3", props='{"src": "y"}'),
                _event("b", T0 + s, user="u3"),
                _event("a", T0, user="u4", props='{"src": null}'),
            ]
        )
        spec = FunnelSpec(ABC[:2], breakdown_property="src")
        result = funnels.compute_funnel(
            store, Scope.tenant("t"), TimeRange(T0, T0 + timedelta(hours=1)), spec
        )
        assert [(b.breakdown_value, [s.users for s in b.steps]) for b in result.breakdowns] == [
            (None, [4, 2]),
            ("y", [2, 1]),
            ("", [1, 0]),
            ("x", [1, 1]),
        ]
        overall = result.breakdowns[0].steps[1]
        assert (overall.conversion_rate_from_previous, overall.drop_off_rate) == (0.5, 0.5)


@pytest.mark.integration
def test_other_tenants_never_join_a_funnel(tmp_path: Path) -> None:
    with DuckDBEventStore(tmp_path / "i.duckdb") as store:
        store.append([_event("a", T0, user="u1", tenant="mine")])
        store.append([_event("b", T0 + timedelta(seconds=1), user="u1", tenant="theirs")])
        spec = FunnelSpec(ABC[:2])
        tr = TimeRange(T0, T0 + timedelta(hours=1))
        mine = funnels.compute_funnel(store, Scope.tenant("mine"), tr, spec)
        assert [s.users for s in mine.breakdowns[0].steps] == [1, 0]
        both = funnels.compute_funnel(store, Scope.all_tenants(), tr, spec)
        assert [s.users for s in both.breakdowns[0].steps] == [1, 0]
        assert funnels.compute_funnel(store, Scope.tenant("nobody"), tr, spec) == FunnelResult(
            (FunnelBreakdown(None, _empty(spec)),)
        )


def _empty(spec: FunnelSpec) -> tuple[FunnelStepResult, ...]:
    return tuple(
        FunnelStepResult(k, s.event_name, 0, 0.0, 0.0, 0.0, 0.0) for k, s in enumerate(spec.steps)
    )


@pytest.mark.unit
def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="steps"):
        FunnelSpec(ABC[:1])
    with pytest.raises(ValueError, match="window"):
        FunnelSpec(ABC, window=timedelta(0))
    with pytest.raises(ValueError, match="exclusion"):
        FunnelSpec(ABC, exclusion_event_names=("b",))


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    store = DuckDBEventStore(tmp_path_factory.mktemp("funnel-property") / "events.duckdb")
    yield store
    store.close()


NAMES = ("a", "b", "c", "x")


@pytest.mark.integration
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32),
    people=st.integers(1, 12),
    steps=st.lists(st.sampled_from(("a", "b", "c")), min_size=2, max_size=4),
    order=st.sampled_from(list(FunnelOrder)),
    window_minutes=st.integers(1, 3000),
    exclusion=st.booleans(),
    breakdown=st.booleans(),
    offset_hours=st.integers(0, 48),
)
def test_property_funnels_match_the_oracle(
    shared_store: DuckDBEventStore,
    seed: int,
    people: int,
    steps: list[str],
    order: FunnelOrder,
    window_minutes: int,
    exclusion: bool,
    breakdown: bool,
    offset_hours: int,
) -> None:
    # Each example is a fresh tenant in one store: earlier examples are other tenants.
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    events = clustered_events(
        seed, people, tenants=(tenant,), span=timedelta(days=4), names=NAMES, nobody=1
    )
    shared_store.append(events)
    spec = FunnelSpec(
        tuple(FunnelStep(s) for s in steps),
        window=timedelta(minutes=window_minutes),
        order=order,
        exclusion_event_names=("x",) if exclusion else (),
        breakdown_property="category" if breakdown else None,
    )
    tr = TimeRange(START + timedelta(hours=offset_hours), START + timedelta(days=3))
    scope = Scope.tenant(tenant)
    assert funnels.compute_funnel(shared_store, scope, tr, spec) == oracle(events, scope, tr, spec)
