"""Seeded random tracked events for store and metric tests.

The mix is chosen to hit the edges the metrics define: events with a user id, with
only an anonymous id, with neither; ids equal across the two spaces; times on bucket
and range boundaries and around UTC midnight; conversions with and without currency
and order id; several tenants sharing user ids.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.events.model import Enrichment, EventSource, TrackedEvent, TrackedEventType

NAMES = {
    TrackedEventType.TRACK: ("ticket_viewed", "cart_opened"),
    TrackedEventType.PAGE_VIEW: ("page_view",),
    TrackedEventType.CLICK: ("buy_clicked",),
    TrackedEventType.CONVERSION: ("ticket_purchased", "signup"),
    TrackedEventType.CUSTOM: ("custom_thing",),
}
COUNTRIES = ("DE", "FR", "US", "")
CURRENCIES = ("EUR", "USD")
TICKETED_EVENTS = ("", "concert-1", "concert-2")


def random_event(
    rng: random.Random,
    *,
    tenant_id: str,
    event_id: str,
    start: datetime,
    span: timedelta,
    users: int,
) -> TrackedEvent:
    """One event with `occurred_at` in [start, start + span) (sometimes on its edges)."""
    roll = rng.random()
    if roll < 0.05:
        occurred_at = start
    elif roll < 0.08:
        occurred_at = start + span  # just outside a range ending at start + span
    else:
        occurred_at = start + timedelta(
            microseconds=rng.randrange(int(span / timedelta(microseconds=1)))
        )
    event_type = rng.choice(list(TrackedEventType))
    who = rng.random()
    person = f"p{rng.randrange(users)}"
    user_id = person if who < 0.6 else ""
    # Same text as some user id on purpose: the two id spaces must stay apart.
    anonymous_id = person if 0.4 < who < 0.9 else ""
    revenue = Decimal(0)
    currency = ""
    quantity = 0
    order_id = ""
    if event_type is TrackedEventType.CONVERSION:
        if rng.random() < 0.8:
            currency = rng.choice(CURRENCIES)
            revenue = Decimal(rng.randrange(0, 50_000)) / 100
        quantity = rng.randrange(0, 5)
        if rng.random() < 0.7:
            order_id = f"o{rng.randrange(max(1, users // 2))}"
    return TrackedEvent(
        tenant_id=tenant_id,
        event_id=event_id,
        event_type=event_type,
        event_name=rng.choice(NAMES[event_type]),
        occurred_at=occurred_at,
        received_at=occurred_at + timedelta(seconds=rng.randrange(0, 30)),
        source=rng.choice(list(EventSource)),
        session_id=f"s{rng.randrange(users * 2)}",
        user_id=user_id,
        anonymous_id=anonymous_id,
        page_url="https://bilten.example/e/1" if rng.random() < 0.5 else "",
        ticketed_event_id=rng.choice(TICKETED_EVENTS),
        order_id=order_id,
        revenue=revenue,
        currency=currency,
        quantity=quantity,
        properties_json='{"seat": "A1", "n": 2}' if rng.random() < 0.3 else "{}",
        schema_id=rng.randrange(0, 3),
        enrichment=Enrichment(
            ip_hash=f"{rng.getrandbits(64):016x}",
            country_code=rng.choice(COUNTRIES),
            browser_family="Firefox",
            browser_version="128",
            os_family="Linux",
            device_type="desktop",
        ),
    )


def random_events(
    seed: int,
    count: int,
    *,
    tenants: tuple[str, ...] = ("acme", "globex"),
    start: datetime = datetime(2024, 2, 26, 22, 0, tzinfo=UTC),  # a Monday, near midnight
    span: timedelta = timedelta(days=40),
    users: int = 60,
) -> list[TrackedEvent]:
    rng = random.Random(seed)
    return [
        random_event(
            rng,
            tenant_id=rng.choice(tenants),
            event_id=f"{seed}-{i}",
            start=start,
            span=span,
            users=users,
        )
        for i in range(count)
    ]
