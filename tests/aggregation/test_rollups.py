"""Rollup tiers against the raw events: identical metrics, incremental upkeep, recovery,
retention and the read planner."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.events.model import TrackedEventType
from services.query import metrics, rollups
from services.query.metrics import Granularity, MetricFilters, Scope, TimeRange
from services.query.rollups import (
    RetentionPolicy,
    RollupMaintainer,
    RollupRangeError,
    RollupStore,
    Tier,
)
from services.storage.event_store import DuckDBEventStore
from tests.storage.generated_events import random_events

pytestmark = pytest.mark.integration

START = datetime(2024, 2, 26, 22, 0, tzinfo=UTC)  # a Monday, near midnight
SPAN = timedelta(days=9)
# Long enough that a 30-day trailing window and day rollups both see many buckets,
# short enough to stay in CI's budget.
EVENTS = random_events(7, 6000, start=START, span=SPAN, users=80)


@pytest.fixture(scope="module")
def stores(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[DuckDBEventStore, RollupStore]]:
    root = tmp_path_factory.mktemp("rollups")
    events = DuckDBEventStore(root / "events.duckdb")
    events.append(EVENTS)
    store = RollupStore(root / "rollups.duckdb")
    RollupMaintainer(events, store, RetentionPolicy()).rebuild()
    yield events, store
    store.close()
    events.close()


# Ranges aligned to each tier (the identity holds on aligned ranges by construction of
# the tiers; unaligned ranges are widened by the planner, tested below).
DAY_RANGE = TimeRange(datetime(2024, 2, 27, tzinfo=UTC), datetime(2024, 3, 6, tzinfo=UTC))
HOUR_RANGE = TimeRange(datetime(2024, 2, 27, 5, tzinfo=UTC), datetime(2024, 3, 4, 17, tzinfo=UTC))
MINUTE_RANGE = TimeRange(
    datetime(2024, 2, 28, 3, 17, tzinfo=UTC), datetime(2024, 3, 2, 11, 43, tzinfo=UTC)
)
CASES = [
    (Tier.DAY, DAY_RANGE, [Granularity.DAY, Granularity.MONTH]),
    (Tier.HOUR, HOUR_RANGE, [Granularity.HOUR, Granularity.WEEK]),
    (Tier.MINUTE, MINUTE_RANGE, [Granularity.MINUTE, Granularity.DAY]),
]
SCOPES = [Scope.tenant("acme"), Scope.all_tenants()]
FILTERS = [
    MetricFilters(),
    MetricFilters(ticketed_event_id="concert-1"),
    MetricFilters(event_name="ticket_purchased", ticketed_event_id="concert-2"),
    MetricFilters(event_type=TrackedEventType.CONVERSION),
]


@pytest.mark.parametrize(
    ("tier", "window", "granularities"), CASES, ids=lambda c: getattr(c, "name", "")
)
def test_every_served_metric_is_identical_from_the_tier_and_from_raw(
    stores: tuple[DuckDBEventStore, RollupStore],
    tier: Tier,
    window: TimeRange,
    granularities: list[Granularity],
) -> None:
    raw, store = stores
    checked = 0
    for scope in SCOPES:
        for filters in FILTERS:
            assert rollups.geography(store, tier, scope, window, filters) == metrics.geography(
                raw, scope, window, filters
            )
            assert rollups.overall_conversion_rate(
                store, tier, scope, window, filters
            ) == metrics.overall_conversion_rate(raw, scope, window, filters)
            for granularity in granularities:
                args = (scope, window, granularity, filters)
                expected_users = metrics.active_users(raw, *args)
                assert rollups.active_users(store, tier, *args) == expected_users
                assert rollups.conversions(store, tier, *args) == metrics.conversions(raw, *args)
                assert rollups.revenue(store, tier, *args) == metrics.revenue(raw, *args)
                assert rollups.event_counts(store, tier, *args) == metrics.event_counts(raw, *args)
                checked += 1
    # The data must exercise the metrics, or the identity proves nothing.
    totals = metrics.active_users(raw, Scope.all_tenants(), window, Granularity.DAY)
    assert totals.mau > 100 and checked == len(SCOPES) * len(FILTERS) * len(granularities)
    assert any(
        r.orders < r.tickets for r in metrics.revenue(raw, SCOPES[0], window, Granularity.DAY)
    )


def _tier_rows(store: RollupStore) -> dict[str, list[dict[str, object]]]:
    return {
        tier.name: store.read(f"SELECT * FROM {tier.table} ORDER BY ALL").to_pylist()
        for tier in rollups.TIERS
    }


def test_incremental_upkeep_equals_a_rebuild_and_a_flush_is_idempotent(tmp_path: Path) -> None:
    with DuckDBEventStore(tmp_path / "events.duckdb") as raw:
        store = RollupStore(tmp_path / "rollups.duckdb")
        maintainer = RollupMaintainer(raw, store, RetentionPolicy())
        # Batches out of time order, like late events: each touches old minutes again.
        for batch in (EVENTS[3000:], EVENTS[:1000], EVENTS[1000:3000]):
            for chunk in range(0, len(batch), 700):
                part = batch[chunk : chunk + 700]
                raw.append(part)
                maintainer.observe_events(part)
            assert maintainer.pending("acme")
            maintainer.flush()
            assert not maintainer.pending()
        assert maintainer.flushed_minutes > 5000
        # A rebuild over the same raw store (actor keys are the store's own numbers).
        rebuilt = RollupStore(tmp_path / "rebuilt.duckdb")
        RollupMaintainer(raw, rebuilt, RetentionPolicy()).rebuild()
        assert _tier_rows(store) == _tier_rows(rebuilt)
        maintainer.observe_events(EVENTS[:50])  # nothing new, minutes marked again
        maintainer.flush()
        assert _tier_rows(store) == _tier_rows(rebuilt)
        store.close()
        rebuilt.close()


def test_a_crash_before_the_flush_is_repaired_from_the_raw_window(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    recent = random_events(3, 800, start=now - timedelta(days=2), span=timedelta(days=2))
    with DuckDBEventStore(tmp_path / "events.duckdb") as raw:
        store = RollupStore(tmp_path / "rollups.duckdb")
        assert store.created and store.needs_rebuild
        maintainer = RollupMaintainer(raw, store, RetentionPolicy())
        maintainer.rebuild()
        raw.append(recent[:400])
        maintainer.observe_events(recent[:400])
        maintainer.flush()
        raw.append(recent[400:])
        maintainer.observe_events(recent[400:])  # acknowledged, then the process dies
        store._conn.close()  # no clean close: the dirty minutes are gone with it
        reopened = RollupStore(tmp_path / "rollups.duckdb")
        assert reopened.needs_rebuild and not reopened.created
        RollupMaintainer(raw, reopened, RetentionPolicy()).rebuild(now - timedelta(days=8))
        window = TimeRange(
            rollups.floor_to(now - timedelta(days=3), Tier.DAY),
            rollups.ceil_to(now + timedelta(days=1), Tier.DAY),
        )
        for scope in SCOPES:
            args = (scope, window, Granularity.DAY)
            assert rollups.revenue(reopened, Tier.DAY, *args) == metrics.revenue(raw, *args)
            assert rollups.active_users(reopened, Tier.HOUR, *args) == metrics.active_users(
                raw, *args
            )
        reopened.close()
        assert not RollupStore(tmp_path / "rollups.duckdb").needs_rebuild


def test_prune_drops_buckets_past_each_tier_retention(tmp_path: Path) -> None:
    with DuckDBEventStore(tmp_path / "events.duckdb") as raw:
        raw.append(EVENTS)
        store = RollupStore(tmp_path / "rollups.duckdb")
        policy = RetentionPolicy(raw_days=1, minute_days=2, hour_days=5, day_days=7)
        # "Now" is 9 days after the data starts: minutes of the first 6-7 days expire.
        maintainer = RollupMaintainer(raw, store, policy, clock=lambda: START + SPAN)
        maintainer.rebuild()
        maintainer.prune()
        oldest = {
            tier: store.read(f"SELECT min(bucket_us) AS b FROM {tier.table}").column("b")[0].as_py()
            for tier in rollups.TIERS
        }
        for tier in rollups.TIERS:
            horizon = rollups.floor_to(
                START + SPAN - policy.keeps(tier) - timedelta(days=1), Tier.DAY
            )
            assert oldest[tier] >= rollups._us(horizon)
        assert oldest[Tier.MINUTE] > oldest[Tier.HOUR] > oldest[Tier.DAY]
        store.close()


class TestPlan:
    NOW = datetime(2026, 6, 15, 12, 34, 56, tzinfo=UTC)
    POLICY = RetentionPolicy()

    def plan(
        self, start: datetime, end: datetime, granularity: Granularity | None, trailing: int = 0
    ) -> rollups.ReadPlan:
        return rollups.plan(TimeRange(start, end), granularity, self.NOW, self.POLICY, trailing)

    def test_ranges_inside_the_raw_window_read_raw(self) -> None:
        start = self.NOW - timedelta(days=6, hours=23)
        got = self.plan(start, self.NOW, Granularity.MINUTE)
        assert got == rollups.ReadPlan(None, TimeRange(start, self.NOW))

    def test_older_ranges_read_the_coarsest_tier_they_are_aligned_to(self) -> None:
        day = datetime(2026, 5, 1, tzinfo=UTC)
        assert self.plan(day, day + timedelta(days=3), Granularity.DAY).tier is Tier.DAY
        assert self.plan(day, day + timedelta(hours=5), Granularity.HOUR).tier is Tier.HOUR
        # 45 days back the minutes are gone: the hour tier, widened to whole hours.
        assert self.plan(day, day + timedelta(minutes=5), None) == rollups.ReadPlan(
            Tier.HOUR, TimeRange(day, day + timedelta(hours=1))
        )
        recent = datetime(2026, 5, 20, tzinfo=UTC)
        assert self.plan(recent, recent + timedelta(minutes=5), None).tier is Tier.MINUTE

    def test_unaligned_edges_widen_to_the_finest_tier_that_still_holds_them(self) -> None:
        start = datetime(2026, 5, 20, 10, 30, 15, tzinfo=UTC)
        got = self.plan(start, self.NOW, Granularity.DAY)
        assert got.tier is Tier.MINUTE
        assert got.time_range == TimeRange(
            datetime(2026, 5, 20, 10, 30, tzinfo=UTC), datetime(2026, 6, 15, 12, 35, tzinfo=UTC)
        )
        older = datetime(2025, 12, 1, 10, 30, 15, tzinfo=UTC)
        assert self.plan(older, self.NOW, Granularity.WEEK).tier is Tier.HOUR

    def test_active_users_trailing_window_reaches_the_minute_tier(self) -> None:
        got = self.plan(self.NOW - timedelta(days=1), self.NOW, Granularity.HOUR, trailing=30)
        assert got.tier is Tier.MINUTE

    def test_a_granularity_finer_than_the_kept_tier_is_refused(self) -> None:
        with pytest.raises(RollupRangeError, match="minute buckets 30 days"):
            self.plan(datetime(2026, 3, 1, tzinfo=UTC), self.NOW, Granularity.MINUTE)
        with pytest.raises(RollupRangeError):
            self.plan(datetime(2020, 1, 1, tzinfo=UTC), self.NOW, Granularity.DAY)
        assert (
            self.plan(datetime(2022, 1, 1, tzinfo=UTC), self.NOW, Granularity.MONTH).tier
            is Tier.DAY
        )


def test_rollup_reads_refuse_unaligned_ranges(stores: tuple[DuckDBEventStore, RollupStore]) -> None:
    _, store = stores
    with pytest.raises(ValueError, match="aligned"):
        rollups.revenue(store, Tier.HOUR, SCOPES[0], MINUTE_RANGE, Granularity.DAY)
    with pytest.raises(ValueError, match="cannot be built"):
        rollups.revenue(store, Tier.DAY, SCOPES[0], DAY_RANGE, Granularity.HOUR)
    assert dataclasses.is_dataclass(rollups.ReadPlan)
