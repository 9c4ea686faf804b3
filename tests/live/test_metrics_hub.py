"""The live hub's numbers (windows, days, scopes), its two inputs, its seeding, and the
mailbox between it and a subscriber."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.events.model import TrackedEvent, TrackedEventType
from services.live.alerts import AlertSeverity, AlertsHub
from services.live.mailbox import Mailbox
from services.live.metrics_hub import LiveMetricsHub
from services.live.thresholds import LiveMetricName, ThresholdMonitor, ThresholdRule
from services.query.metrics import CurrencyAmount
from services.storage.event_store import DuckDBEventStore, events_to_table

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def event(
    ago: timedelta,
    *,
    tenant: str = "t1",
    session: str = "",
    user: str = "",
    kind: TrackedEventType = TrackedEventType.TRACK,
    ticketed: str = "",
    tickets: int = 0,
    revenue: str = "0",
    currency: str = "",
    at: datetime = NOW,
) -> TrackedEvent:
    return TrackedEvent(
        tenant_id=tenant,
        event_id=f"e{id(ago)}-{session}-{user}-{kind}",
        event_type=kind,
        event_name=str(kind),
        occurred_at=at - ago,
        received_at=at,
        session_id=session,
        user_id=user,
        ticketed_event_id=ticketed,
        quantity=tickets,
        revenue=Decimal(revenue),
        currency=currency,
    )


def sale(ago: timedelta, tickets: int, amount: str, **kwargs: object) -> TrackedEvent:
    return event(
        ago,
        kind=TrackedEventType.CONVERSION,
        tickets=tickets,
        revenue=amount,
        currency="EUR",
        **kwargs,  # type: ignore[arg-type]
    )


SAMPLE = [
    event(timedelta(seconds=10), session="s1", user="u1"),
    event(timedelta(minutes=29, seconds=59), session="s2"),
    event(timedelta(minutes=31), session="s3"),  # too old to be active
    event(timedelta(minutes=-5), session="s4"),  # a client clock ahead: counts as now
    event(timedelta(seconds=59), tenant="t2", session="s1"),
    sale(timedelta(hours=2), 2, "40.50", session="s1", ticketed="c1", user="u1"),
    sale(timedelta(hours=13), 9, "99", session="s9"),  # yesterday (UTC): not today
    event(
        timedelta(minutes=3),
        kind=TrackedEventType.PAGE_VIEW,
        ticketed="c1",
        user="u2",
    ),
    event(timedelta(minutes=40), kind=TrackedEventType.PAGE_VIEW, ticketed="c1", user="u3"),
    sale(timedelta(seconds=30), 1, "10", ticketed="c1", tenant="t2", user="u9"),
]


@pytest.mark.unit
def test_windows_days_and_scopes() -> None:
    hub = LiveMetricsHub(clock=Clock())
    hub.observe_events(SAMPLE)
    t1 = hub.snapshot("t1")
    assert (t1.active_sessions, t1.events_last_minute, t1.tickets_sold_today) == (3, 2, 2)
    assert t1.revenue_today == (CurrencyAmount("EUR", Decimal("40.50")),)
    everyone = hub.snapshot(None)
    assert (everyone.active_sessions, everyone.events_last_minute) == (4, 4)
    assert everyone.tickets_sold_today == 3
    assert everyone.revenue_today == (CurrencyAmount("EUR", Decimal("50.50")),)
    concert = hub.ticketed_snapshot("t1", "c1")
    assert (concert.views_today, concert.active_visitors, concert.tickets_sold_today) == (2, 1, 2)
    assert hub.ticketed_snapshot(None, "c1").active_visitors == 2
    assert hub.snapshot("nobody").active_sessions == 0


@pytest.mark.unit
def test_time_alone_ages_the_windows_and_a_new_day_restarts_the_totals() -> None:
    clock = Clock()
    hub = LiveMetricsHub(clock=clock)
    hub.observe_events(SAMPLE)
    assert hub.snapshot("t1").active_sessions == 3
    clock.now = NOW + timedelta(seconds=61)
    assert hub.snapshot("t1").events_last_minute == 0
    clock.now = NOW + timedelta(minutes=29, seconds=51)
    assert hub.snapshot("t1").active_sessions == 1  # only s4, clamped to NOW, is left
    clock.now = NOW + timedelta(hours=12, minutes=1)  # 00:01 the next day
    hub.observe_events([sale(timedelta(0), 1, "5", at=clock.now)])
    tomorrow = hub.snapshot("t1")
    assert (tomorrow.tickets_sold_today, tomorrow.revenue_today) == (
        1,
        (CurrencyAmount("EUR", Decimal(5)),),
    )
    assert hub.ticketed_snapshot("t1", "c1").views_today == 0


@pytest.mark.unit
def test_arrow_rows_and_tracked_events_give_the_same_numbers() -> None:
    by_events, by_rows = LiveMetricsHub(clock=Clock()), LiveMetricsHub(clock=Clock())
    by_events.observe_events(SAMPLE)
    by_rows.observe_rows(events_to_table(SAMPLE))
    for scope in ("t1", "t2", None):
        assert by_events.snapshot(scope).values() == by_rows.snapshot(scope).values()
    assert by_events.ticketed_snapshot(None, "c1") == by_rows.ticketed_snapshot(None, "c1")


@pytest.mark.integration
def test_seeding_from_the_store_equals_observing_the_events(tmp_path: Path) -> None:
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        store.append(SAMPLE)
        seeded, observed = LiveMetricsHub(clock=Clock()), LiveMetricsHub(clock=Clock())
        seeded.seed(store)
        observed.observe_events(SAMPLE)
        for scope in ("t1", "t2", None):
            assert seeded.snapshot(scope).values() == observed.snapshot(scope).values()
        for scope in ("t1", "t2"):
            assert seeded.ticketed_snapshot(scope, "c1") == observed.ticketed_snapshot(scope, "c1")


@pytest.mark.unit
async def test_subscribers_get_the_current_state_first_then_coalesced_updates() -> None:
    hub = LiveMetricsHub(clock=Clock(), min_interval_seconds=0.05, tick_seconds=0.05)
    hub.start()
    try:
        subscription = hub.subscribe("t1")
        assert (await anext(subscription)).tickets_sold_today == 0
        for _ in range(3):  # a burst within one interval: one update, the sum
            hub.observe_events([sale(timedelta(0), 1, "1")])
        update = await asyncio.wait_for(anext(subscription), 1)
        while update.tickets_sold_today < 3:
            update = await asyncio.wait_for(anext(subscription), 1)
        assert update.tickets_sold_today == 3
        assert subscription.dropped == 0
        subscription.close()
        assert hub.subscriber_count == 0
    finally:
        await hub.stop()


@pytest.mark.unit
async def test_a_full_mailbox_drops_the_oldest_and_counts() -> None:
    mailbox: Mailbox[int] = Mailbox(2)
    for item in range(5):
        mailbox.offer(item)
    assert mailbox.dropped == 3
    assert [await mailbox.get(), await mailbox.get()] == [3, 4]
    mailbox.close()
    with pytest.raises(StopAsyncIteration):
        await mailbox.get()


@pytest.mark.unit
async def test_threshold_rules_fire_once_per_breach_and_re_arm() -> None:
    clock = Clock()
    hub = LiveMetricsHub(clock=clock)
    alerts = AlertsHub(clock=clock)
    rule = ThresholdRule(
        "r1",
        "t1",
        LiveMetricName.REVENUE_TODAY,
        upper=50,
        currency="EUR",
        severity=AlertSeverity.CRITICAL,
    )
    monitor = ThresholdMonitor(hub, alerts, [rule], clock=clock)
    mine, everyone, other = alerts.subscribe("t1"), alerts.subscribe(None), alerts.subscribe("t2")
    hub.observe_events([sale(timedelta(0), 1, "60")])
    (raised,) = await monitor.evaluate()
    assert (raised.metric_name, raised.observed, raised.expected_upper) == (
        "revenue_today[EUR]",
        60,
        50,
    )
    assert await monitor.evaluate() == []  # still above: no repeat
    clock.now = NOW + timedelta(days=1)  # a new day: back to 0, re-armed
    assert await monitor.evaluate() == []
    hub.observe_events([sale(timedelta(0), 1, "70", at=clock.now)])
    assert len(await monitor.evaluate()) == 1
    assert mine._mailbox.dropped == 0 and len([await anext(mine), await anext(mine)]) == 2
    assert (await anext(everyone)).severity is AlertSeverity.CRITICAL
    assert other._mailbox.closed is False and not other._mailbox._items
    # The `bilten_alert_subscribers` gauge: open streams, less the closed ones.
    assert alerts.subscriber_count == 3
    other.close()
    assert alerts.subscriber_count == 2
    with pytest.raises(ValueError, match="currency"):
        ThresholdRule("bad", "t1", LiveMetricName.REVENUE_TODAY, upper=1)
    with pytest.raises(ValueError, match="ticketed_event_id"):
        ThresholdRule("bad", "t1", LiveMetricName.VIEWS_TODAY, upper=1)
