"""Erasure reaches the rollup tiers (issue #6): the subject's order ids are replaced by
opaque tokens in every tier, every served metric stays as it was. Real DuckDB stores."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from services.compliance.erasure import erase_with_rollups
from services.events.model import TrackedEvent, TrackedEventType
from services.query import rollups
from services.query.metrics import Granularity, MetricFilters, Scope, TimeRange
from services.query.rollups import RetentionPolicy, RollupMaintainer, RollupStore, Tier
from services.storage.event_store import DuckDBEventStore
from tests.storage.generated_events import random_events

pytestmark = pytest.mark.integration

START = datetime(2024, 2, 26, 22, 0, tzinfo=UTC)
BACKGROUND = random_events(11, 1500, start=START, span=timedelta(days=3), users=30)
TENANT = "acme"


def _order(
    i: int,
    order_id: str,
    at: datetime,
    *,
    user: str = "",
    anonymous: str = "",
    amount: str = "10",
    quantity: int = 1,
) -> TrackedEvent:
    return TrackedEvent(
        tenant_id=TENANT,
        event_id=f"order-{i}",
        event_type=TrackedEventType.CONVERSION,
        event_name="ticket_purchased",
        occurred_at=at,
        received_at=at,
        user_id=user,
        anonymous_id=anonymous,
        order_id=order_id,
        revenue=Decimal(amount),
        currency="EUR",
        quantity=quantity,
        ticketed_event_id="concert-1",
    )


# Alice's orders: one paid over two minutes (the second event only under her anonymous
# id), one a day later, one old enough that raw retention deletes its row; Bob's beside
# them in the same minutes, hours and days.
ALICE_ORDERS = ("alice-o1", "alice-o2", "alice-old")
BOB_ORDERS = ("bob-o1", "bob-o2", "bob-old")
OLD_CUTOFF = START + timedelta(minutes=30)
SUBJECT_EVENTS = [
    _order(1, "alice-o1", START + timedelta(hours=1, minutes=5), user="alice"),
    _order(2, "alice-o1", START + timedelta(hours=1, minutes=7), anonymous="alice", amount="5"),
    _order(3, "alice-o2", START + timedelta(days=1, hours=3), user="alice", quantity=3),
    _order(4, "alice-old", START + timedelta(minutes=10), user="alice"),
    _order(5, "bob-o1", START + timedelta(hours=1, minutes=5), user="bob"),
    _order(6, "bob-o2", START + timedelta(days=1, hours=3, minutes=1), user="bob"),
    _order(7, "bob-old", START + timedelta(minutes=12), user="bob", amount="7.5"),
]

DAYS = TimeRange(datetime(2024, 2, 26, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC))
HOURS = TimeRange(START, datetime(2024, 3, 1, tzinfo=UTC))
CASES = [
    (Tier.DAY, DAYS, [Granularity.DAY, Granularity.WEEK, Granularity.MONTH]),
    (Tier.HOUR, HOURS, [Granularity.HOUR, Granularity.DAY]),
    (Tier.MINUTE, HOURS, [Granularity.MINUTE, Granularity.HOUR, Granularity.DAY]),
]
FILTERS = [
    MetricFilters(),
    MetricFilters(event_type=TrackedEventType.CONVERSION),
    MetricFilters(ticketed_event_id="concert-1"),
]


def served_metrics(store: RollupStore) -> list[object]:
    """Every metric the aggregation service serves from the tiers, for every tier,
    granularity, scope and a few filters (distinct orders across buckets included)."""
    out: list[object] = []
    for tier, window, granularities in CASES:
        for scope in (Scope.tenant(TENANT), Scope.all_tenants()):
            for filters in FILTERS:
                out.append(rollups.geography(store, tier, scope, window, filters))
                out.append(rollups.overall_conversion_rate(store, tier, scope, window, filters))
                for granularity in granularities:
                    args = (scope, window, granularity, filters)
                    out.append(rollups.active_users(store, tier, *args))
                    out.append(rollups.conversions(store, tier, *args))
                    out.append(rollups.revenue(store, tier, *args))
                    out.append(rollups.event_counts(store, tier, *args))
                    out.append(
                        rollups.grouped_event_counts(
                            store,
                            tier,
                            scope,
                            window,
                            granularity,
                            sorted(rollups.ROLLUP_DIMENSIONS),
                            filters,
                        )
                    )
    return out


def tier_order_ids(store: RollupStore, tenant_id: str = TENANT) -> dict[Tier, set[str]]:
    """Every order id in each tier table, read directly."""
    return {
        tier: set(
            store.read(
                f"SELECT DISTINCT unnest(order_ids) FROM {tier.table} WHERE tenant_id = ?",
                [tenant_id],
            )
            .column(0)
            .to_pylist()
        )
        for tier in rollups.TIERS
    }


def mapped_orders(raw: DuckDBEventStore) -> set[str]:
    table = raw.read("SELECT order_id FROM tenant_order_actors WHERE tenant_id = ?", [TENANT])
    return set(table.column(0).to_pylist())


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[DuckDBEventStore, RollupMaintainer]]:
    raw = DuckDBEventStore(tmp_path / "events.duckdb")
    store = RollupStore(tmp_path / "rollups.duckdb")
    maintainer = RollupMaintainer(raw, store, RetentionPolicy())
    yield raw, maintainer
    store.close()
    raw.close()


def test_erasure_replaces_the_subjects_order_ids_in_every_tier_and_keeps_every_metric(
    stores: tuple[DuckDBEventStore, RollupMaintainer],
) -> None:
    raw, maintainer = stores
    events = BACKGROUND + SUBJECT_EVENTS
    # Appended in several batches, flushed as the runtime does (observer, then flush).
    for chunk in range(0, len(events), 400):
        raw.append(events[chunk : chunk + 400])
        maintainer.observe_events(events[chunk : chunk + 400])
    maintainer.flush()
    # Raw retention took the oldest half hour: those orders live on in the rollups only.
    assert raw.delete_occurred_before(TENANT, OLD_CUTOFF) > 0
    assert "alice-old" not in raw.read("SELECT order_id FROM tracked_events").column(0).to_pylist()
    before_ids = tier_order_ids(maintainer.store)
    for tier in rollups.TIERS:
        assert set(ALICE_ORDERS) | set(BOB_ORDERS) <= before_ids[tier]
    assert set(ALICE_ORDERS) <= mapped_orders(raw)
    before = served_metrics(maintainer.store)
    other_tenant = tier_order_ids(maintainer.store, "globex")
    assert any(r.orders for r in rollups.revenue(
        maintainer.store, Tier.DAY, Scope.tenant(TENANT), DAYS, Granularity.MONTH
    ))  # fmt: skip

    rows, actors, rolled = erase_with_rollups(raw, raw, maintainer, TENANT, "alice")

    assert rolled is not None and rolled.order_ids == len(ALICE_ORDERS)
    assert rolled.rows >= 3 * len(ALICE_ORDERS)  # at least one row per order and tier
    assert rows == 3 and actors == 2  # the raw rows still there; u:alice and a:alice
    after_ids = tier_order_ids(maintainer.store)
    tokens: dict[Tier, set[str]] = {}
    for tier in rollups.TIERS:
        assert not set(ALICE_ORDERS) & after_ids[tier], tier
        assert set(BOB_ORDERS) <= after_ids[tier], tier
        tokens[tier] = {o for o in after_ids[tier] if o.startswith("erased:")}
        # Nothing else changed: the other orders are exactly the ones before.
        assert after_ids[tier] - tokens[tier] == before_ids[tier] - set(ALICE_ORDERS)
    # One token per order, the same in every tier (and bucket: the order paid over two
    # minutes is one value in both minute rows, so its hour and day count it once).
    assert len(tokens[Tier.MINUTE]) == len(ALICE_ORDERS)
    assert tokens[Tier.MINUTE] == tokens[Tier.HOUR] == tokens[Tier.DAY]
    minute_rows = maintainer.store.read(
        f"SELECT order_ids FROM {Tier.MINUTE.table} WHERE tenant_id = ?"
        " AND list_has_any(order_ids, ?)",
        [TENANT, sorted(tokens[Tier.MINUTE])],
    )
    assert minute_rows.num_rows == 4  # o1 in two minutes, o2, old
    assert served_metrics(maintainer.store) == before
    assert tier_order_ids(maintainer.store, "globex") == other_tenant
    # The order -> actor links of the subject are gone, Bob's stay.
    assert not set(ALICE_ORDERS) & mapped_orders(raw)
    assert {"bob-o1", "bob-o2", "bob-old"} <= mapped_orders(raw)
    assert raw.subject_order_ids(TENANT, "alice") == []
    # A flush after the erasure (a late event in one of her minutes) does not bring the
    # order id back: the raw rows are gone.
    late = [_order(8, "bob-o3", START + timedelta(hours=1, minutes=5), user="bob")]
    raw.append(late)
    maintainer.observe_events(late)
    maintainer.flush()
    for tier, ids in tier_order_ids(maintainer.store).items():
        assert not set(ALICE_ORDERS) & ids, tier
    # Erasing again finds nothing and changes nothing.
    _, _, again = erase_with_rollups(raw, raw, maintainer, TENANT, "alice")
    assert again is not None and (again.order_ids, again.rows) == (0, 0)


def test_events_not_rolled_up_yet_are_counted_and_anonymised(
    stores: tuple[DuckDBEventStore, RollupMaintainer],
) -> None:
    """The hook flushes dirty minutes before the raw rows go: the subject's unflushed
    order still counts (as a token) instead of vanishing or keeping its id."""
    raw, maintainer = stores
    pending = [SUBJECT_EVENTS[0], SUBJECT_EVENTS[4]]  # alice-o1 and bob-o1, one minute
    raw.append(pending)
    maintainer.observe_events(pending)  # not flushed

    _, _, rolled = erase_with_rollups(raw, raw, maintainer, TENANT, "alice")

    assert rolled is not None and rolled.order_ids == 1
    for tier, ids in tier_order_ids(maintainer.store).items():
        assert "bob-o1" in ids and "alice-o1" not in ids, tier
        assert len([o for o in ids if o.startswith("erased:")]) == 1, tier
    revenue = rollups.revenue(
        maintainer.store, Tier.DAY, Scope.tenant(TENANT), DAYS, Granularity.MONTH
    )
    assert [(r.orders, r.revenue) for r in revenue] == [(2, Decimal("20"))]
