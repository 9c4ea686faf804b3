"""Seeded events for the analyses' tests: people who come back, convert, tie.

`tests.storage.generated_events` spreads events uniformly, so funnels and sessions would
almost never see a person do two things within minutes. Here each person has a few
bursts of activity (visits): several events minutes apart, visits days apart, with the
edges the analyses define: events at the same microsecond, gaps of exactly the session
timeout, repeated steps, both id spaces, events without a person, several tenants with
the same ids, properties that are missing, null, numbers or strings.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.events.model import Enrichment, EventSource, TrackedEvent, TrackedEventType

START = datetime(2024, 2, 26, 22, 0, tzinfo=UTC)  # a Monday, near midnight
# name -> type; the names the standard purchase funnel and the tests use.
EVENT_TYPES = {
    "page_view": TrackedEventType.PAGE_VIEW,
    "ticket_viewed": TrackedEventType.TRACK,
    "cart_opened": TrackedEventType.TRACK,
    "checkout_started": TrackedEventType.TRACK,
    "buy_clicked": TrackedEventType.CLICK,
    "ticket_purchased": TrackedEventType.CONVERSION,
    "signup": TrackedEventType.CONVERSION,
    "promo_seen": TrackedEventType.CUSTOM,
}
NAMES = tuple(EVENT_TYPES)
CATEGORIES = ("music", "theatre", "sports")
SOURCES = ("google", "newsletter", "")
REFERRERS = (
    "",
    "https://www.google.com/search?q=x",
    "https://T.CO/abc",
    "http://user@blog.example.com:8080/p?q=1",
    "https://news.example.org",
    "android-app://com.example",
    "not a url",
)
CAMPAIGNS = ("", "spring", "retarget")
DEVICES = ("desktop", "mobile", "tablet", "")
BROWSERS = ("Chrome", "Safari", "Firefox", "")
TICKETED = ("", "concert-1", "concert-2")


def _properties(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.2:
        return "{}"
    props: dict[str, object] = {"category": rng.choice(CATEGORIES)}
    if rng.random() < 0.6:
        props["utm_source"] = rng.choice(SOURCES)
    if rng.random() < 0.1:
        props["utm_source"] = None  # JSON null: no value
    if rng.random() < 0.1:
        props["category"] = 7  # a number: compared in its JSON spelling
    return json.dumps(props)


def person_events(
    rng: random.Random,
    *,
    tenant_id: str,
    person: int,
    start: datetime,
    span: timedelta,
    visits: int,
    names: tuple[str, ...] = NAMES,
    prefix: str = "e",
) -> list[TrackedEvent]:
    """One person's visits; ids `{prefix}{person}-{n}`."""
    who = rng.random()
    user_id = f"p{person}" if who < 0.7 else ""
    anonymous_id = f"p{person}" if who >= 0.5 or not user_id else ""
    out: list[TrackedEvent] = []
    for _ in range(visits):
        moment = start + timedelta(
            microseconds=rng.randrange(int(span / timedelta(microseconds=1)))
        )
        for _ in range(rng.randrange(1, 7)):
            gap = rng.random()
            if gap < 0.15:
                step = timedelta(0)  # simultaneous with the previous event
            elif gap < 0.2:
                step = timedelta(minutes=30)  # exactly the default session timeout
            elif gap < 0.9:
                step = timedelta(seconds=rng.randrange(1, 900))
            else:
                step = timedelta(hours=rng.randrange(1, 30))
            moment += step
            name = rng.choice(names)
            event_type = EVENT_TYPES.get(name, TrackedEventType.CUSTOM)
            paid = event_type is TrackedEventType.CONVERSION and rng.random() < 0.8
            out.append(
                TrackedEvent(
                    tenant_id=tenant_id,
                    event_id=f"{prefix}{person}-{len(out)}",
                    event_type=event_type,
                    event_name=name,
                    occurred_at=moment,
                    received_at=moment,
                    source=EventSource.WEB,
                    session_id=f"s{rng.randrange(5)}",
                    user_id=user_id,
                    anonymous_id=anonymous_id,
                    page_url="https://bilten.example/e/1",
                    referrer=rng.choice(REFERRERS),
                    ticketed_event_id=rng.choice(TICKETED),
                    campaign_id=rng.choice(CAMPAIGNS),
                    order_id=f"o{person}-{rng.randrange(3)}" if paid and rng.random() < 0.7 else "",
                    revenue=Decimal(rng.randrange(0, 20_000)) / 100 if paid else Decimal(0),
                    currency=rng.choice(("EUR", "USD")) if paid else "",
                    quantity=rng.randrange(0, 4)
                    if event_type is TrackedEventType.CONVERSION
                    else 0,
                    properties_json=_properties(rng),
                    enrichment=Enrichment(
                        country_code=rng.choice(("DE", "FR", "")),
                        browser_family=rng.choice(BROWSERS),
                        os_family="Linux",
                        device_type=rng.choice(DEVICES),
                    ),
                )
            )
    return out


def clustered_events(
    seed: int,
    people: int,
    *,
    tenants: tuple[str, ...] = ("acme", "globex"),
    start: datetime = START,
    span: timedelta = timedelta(days=40),
    max_visits: int = 5,
    names: tuple[str, ...] = NAMES,
    nobody: int = 5,
) -> list[TrackedEvent]:
    """Events of `people` people per tenant (the same ids in every tenant), plus
    `nobody` events per tenant without any id."""
    rng = random.Random(seed)
    out: list[TrackedEvent] = []
    for tenant_id in tenants:
        for person in range(people):
            out.extend(
                person_events(
                    rng,
                    tenant_id=tenant_id,
                    person=person,
                    start=start,
                    span=span,
                    visits=rng.randrange(1, max_visits + 1),
                    names=names,
                    prefix=f"{seed}-",
                )
            )
        for i in range(nobody):
            moment = start + timedelta(seconds=rng.randrange(int(span.total_seconds())))
            out.append(
                TrackedEvent(
                    tenant_id=tenant_id,
                    event_id=f"{seed}-nobody-{i}",
                    event_type=TrackedEventType.PAGE_VIEW,
                    event_name=rng.choice(names),
                    occurred_at=moment,
                    received_at=moment,
                )
            )
    rng.shuffle(out)  # the store must not depend on arrival order
    return out
