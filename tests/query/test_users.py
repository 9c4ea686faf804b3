"""One user's analytics against a plain-Python oracle over the same events."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.model import TrackedEvent, TrackedEventType
from services.query import users
from services.query.metrics import CurrencyAmount, Scope
from services.query.users import UserAnalytics, UserNotFoundError
from services.storage.event_store import DuckDBEventStore
from tests.query.analytics_events import clustered_events
from tests.query.oracle_common import prop, us

CHECKOUT = {"checkout_started", "cart_opened", "buy_clicked"}


def _ranked(values: list[str]) -> tuple[str, ...]:
    counts = Counter(v for v in values if v)
    return tuple(sorted(counts, key=lambda v: (-counts[v], v)))


def _is_view(e: TrackedEvent) -> bool:
    return bool(e.ticketed_event_id) and (
        e.event_type is TrackedEventType.PAGE_VIEW or e.event_name == "ticket_viewed"
    )


def _is_purchase(e: TrackedEvent) -> bool:
    return e.event_name == "ticket_purchased" or (
        e.event_type is TrackedEventType.CONVERSION and e.quantity > 0
    )


def oracle(
    events: list[TrackedEvent],
    tenant: str,
    user_id: str,
    timeout: timedelta = timedelta(minutes=30),
) -> UserAnalytics | None:
    mine = sorted(
        (e for e in events if e.tenant_id == tenant and e.user_id == user_id),
        key=lambda e: e.occurred_at,
    )
    if not mine:
        return None
    sessions: list[list[TrackedEvent]] = [[mine[0]]]
    for event in mine[1:]:
        if event.occurred_at - sessions[-1][-1].occurred_at > timeout:
            sessions.append([event])
        else:
            sessions[-1].append(event)
    durations = [us(s[0].occurred_at, s[-1].occurred_at) for s in sessions]
    paid = [e for e in mine if e.event_type is TrackedEventType.CONVERSION and e.currency]
    totals: dict[str, Decimal] = {}
    orders: dict[str, set[str]] = {}
    for e in paid:
        totals[e.currency] = totals.get(e.currency, Decimal(0)) + e.revenue
        orders.setdefault(e.currency, set()).add(e.order_id or f"no-order-{e.event_id}")
    stage = 1
    for e in mine:
        if _is_purchase(e):
            stage = max(stage, 4)
        elif e.event_name in CHECKOUT:
            stage = max(stage, 3)
        elif _is_view(e):
            stage = max(stage, 2)
    categories = [c for e in mine if (c := prop(e, "category")) is not None]
    return UserAnalytics(
        user_id=user_id,
        total_sessions=len(sessions),
        average_session_duration_seconds=(sum(durations) / len(durations)) / 1_000_000,
        last_session_start=sessions[-1][0].occurred_at,
        device_types=_ranked([e.enrichment.device_type for e in mine]),
        browsers=_ranked([e.enrichment.browser_family for e in mine]),
        page_views=sum(1 for e in mine if e.event_type is TrackedEventType.PAGE_VIEW),
        ticketed_events_viewed=len({e.ticketed_event_id for e in mine if _is_view(e)}),
        tickets_purchased=sum(
            e.quantity for e in mine if e.event_type is TrackedEventType.CONVERSION
        ),
        total_spent=tuple(CurrencyAmount(c, totals[c]) for c in sorted(totals)),
        average_order_values=tuple(
            CurrencyAmount(
                c, (totals[c] / len(orders[c])).quantize(Decimal("0.000001"), ROUND_HALF_EVEN)
            )
            for c in sorted(totals)
        ),
        preferred_categories=_ranked(categories)[: users.MAX_CATEGORIES],
        hour_of_day_activity=dict(Counter(e.occurred_at.hour for e in mine)),
        day_of_week_activity=dict(Counter(e.occurred_at.isoweekday() for e in mine)),
        funnel_position=users.FUNNEL_STAGES[stage - 1],
    )


def _same(got: UserAnalytics, want: UserAnalytics | None) -> None:
    assert want is not None
    # Money: equal amounts, whatever the decimal scale DuckDB returns them in.
    assert got == want


@pytest.fixture(scope="module")
def loaded(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DuckDBEventStore, list[TrackedEvent]]]:
    events = clustered_events(13, 40, max_visits=8)
    store = DuckDBEventStore(tmp_path_factory.mktemp("users") / "events.duckdb")
    store.append(events)
    yield store, events
    store.close()


@pytest.mark.integration
def test_every_user_matches_the_oracle(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
) -> None:
    store, events = loaded
    checked = 0
    for tenant in ("acme", "globex"):
        ids = sorted({e.user_id for e in events if e.tenant_id == tenant and e.user_id})
        for user_id in ids:
            for timeout in (timedelta(minutes=30), timedelta(minutes=2)):
                got = users.user_analytics(store, Scope.tenant(tenant), user_id, timeout)
                _same(got, oracle(events, tenant, user_id, timeout))
                checked += 1
    assert checked > 40
    positions = {
        users.user_analytics(store, Scope.tenant("acme"), u).funnel_position
        for u in {e.user_id for e in events if e.tenant_id == "acme" and e.user_id}
    }
    assert positions >= {"checkout", "purchase"}


@pytest.mark.integration
def test_unknown_users_and_anonymous_ids_are_not_found(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
) -> None:
    store, events = loaded
    anonymous_only = next(
        e.anonymous_id
        for e in events
        if e.anonymous_id
        and not any(x.user_id == e.anonymous_id and x.tenant_id == e.tenant_id for x in events)
    )
    for user_id in ("nobody", anonymous_only, "p1' OR '1'='1"):
        with pytest.raises(UserNotFoundError):
            users.user_analytics(store, Scope.tenant("acme"), user_id)
    with pytest.raises(UserNotFoundError):
        users.user_analytics(store, Scope.tenant("other-tenant"), "p1")
    with pytest.raises(ValueError, match="tenant"):
        users.user_analytics(store, Scope.all_tenants(), "p1")


@pytest.mark.integration
def test_a_hand_made_user(tmp_path: Path) -> None:
    t0 = datetime(2024, 5, 5, 23, 30, tzinfo=UTC)  # a Sunday

    def event(name: str, at: datetime, **fields: object) -> TrackedEvent:
        kind = TrackedEventType.CONVERSION if name == "ticket_purchased" else TrackedEventType.TRACK
        return TrackedEvent(
            tenant_id="t",
            event_id=uuid.uuid4().hex,
            event_type=fields.pop("event_type", kind),  # type: ignore[arg-type]
            event_name=name,
            occurred_at=at,
            received_at=at,
            user_id="u",
            **fields,  # type: ignore[arg-type]
        )

    with DuckDBEventStore(tmp_path / "u.duckdb") as store:
        store.append(
            [
                event(
                    "page_view", t0, event_type=TrackedEventType.PAGE_VIEW, ticketed_event_id="c1"
                ),
                event("ticket_viewed", t0 + timedelta(minutes=10), ticketed_event_id="c2"),
                event(
                    "ticket_purchased",
                    t0 + timedelta(minutes=40),
                    quantity=2,
                    revenue=Decimal("10.00"),
                    currency="EUR",
                    order_id="o1",
                ),
                event(
                    "ticket_purchased",
                    t0 + timedelta(hours=5),
                    quantity=1,
                    revenue=Decimal("5.00"),
                    currency="EUR",
                ),
            ]
        )
        got = users.user_analytics(store, Scope.tenant("t"), "u")
        assert (got.total_sessions, got.average_session_duration_seconds) == (2, 1200.0)
        assert got.last_session_start == t0 + timedelta(hours=5)
        assert (got.page_views, got.ticketed_events_viewed, got.tickets_purchased) == (1, 2, 3)
        assert got.total_spent == (CurrencyAmount("EUR", Decimal("15")),)
        assert got.average_order_values == (CurrencyAmount("EUR", Decimal("7.5")),)
        assert got.hour_of_day_activity == {23: 2, 0: 1, 4: 1}
        assert got.day_of_week_activity == {7: 2, 1: 2}
        assert got.funnel_position == "purchase"


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DuckDBEventStore]:
    store = DuckDBEventStore(tmp_path_factory.mktemp("user-property") / "events.duckdb")
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
    people=st.integers(1, 4),
    timeout_minutes=st.integers(1, 600),
)
def test_property_users_match_the_oracle(
    shared_store: DuckDBEventStore, seed: int, people: int, timeout_minutes: int
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    events = clustered_events(seed, people, tenants=(tenant,), max_visits=10, nobody=1)
    shared_store.append(events)
    timeout = timedelta(minutes=timeout_minutes)
    for user_id in sorted({e.user_id for e in events if e.user_id}):
        got = users.user_analytics(shared_store, Scope.tenant(tenant), user_id, timeout)
        _same(got, oracle(events, tenant, user_id, timeout))


class _ReadOnly:
    """A store that only answers SQL: no in-memory actor map to look keys up in."""

    def __init__(self, store: DuckDBEventStore) -> None:
        self._store = store

    def read(self, sql: str, params: object = ()) -> object:
        return self._store.read(sql, params)  # type: ignore[arg-type]


@pytest.mark.integration
def test_the_actor_table_gives_the_same_answers(
    loaded: tuple[DuckDBEventStore, list[TrackedEvent]],
) -> None:
    store, events = loaded
    plain = _ReadOnly(store)
    for user_id in sorted({e.user_id for e in events if e.tenant_id == "acme" and e.user_id})[:8]:
        assert users.user_analytics(plain, Scope.tenant("acme"), user_id) == (  # type: ignore[arg-type]
            users.user_analytics(store, Scope.tenant("acme"), user_id)
        )
    with pytest.raises(UserNotFoundError):
        users.user_analytics(plain, Scope.tenant("acme"), "nobody")  # type: ignore[arg-type]
