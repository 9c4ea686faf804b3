"""Per-tenant retention in the rollups: the read planner and pruning follow each tenant's
own policy (stored by compliance), falling back to the platform default."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.aggregation.reads import MetricReads
from services.aggregation.runtime import tenant_retention
from services.query import metrics, rollups
from services.query.metrics import Granularity, Scope, TimeRange
from services.query.rollups import (
    RetentionPolicy,
    RollupMaintainer,
    RollupRangeError,
    RollupStore,
    TenantRetention,
    Tier,
)
from services.storage.event_store import DuckDBEventStore
from services.storage.metadata_store import RetentionDays
from tests.storage.generated_events import random_events
from tests.storage.metadata_backends import MetadataBackend, metadata_backend

__all__ = ["metadata_backend"]  # the fixture, imported for pytest

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
TODAY = datetime(2026, 6, 15, tzinfo=UTC)
EVENTS = random_events(
    11,
    4000,
    tenants=("short", "std"),
    start=NOW - timedelta(days=12),
    span=timedelta(days=12),
    users=50,
)
DEFAULT = RetentionPolicy()  # raw 7 days
SHORT = RetentionPolicy(raw_days=2, minute_days=4, hour_days=8, day_days=365)
RETENTION = TenantRetention(
    DEFAULT, lambda t: SHORT if t == "short" else None, lambda: {"short": SHORT}
)
# Four whole days ending today: older than the short tenant's raw window (2 days),
# inside the default one (7 days).
WINDOW = TimeRange(TODAY - timedelta(days=4), TODAY)


@dataclass
class Stores:
    raw: DuckDBEventStore
    maintainer: RollupMaintainer

    def reads(self) -> MetricReads:
        return MetricReads(self.raw, self.maintainer, policy=RETENTION, clock=lambda: NOW)


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    raw = DuckDBEventStore(tmp_path / "events.duckdb")
    raw.append(EVENTS)
    store = RollupStore(tmp_path / "rollups.duckdb")
    maintainer = RollupMaintainer(raw, store, RETENTION, clock=lambda: NOW)
    maintainer.rebuild()
    yield Stores(raw, maintainer)
    store.close()
    raw.close()


async def _answers(reads: MetricReads, scope: Scope) -> tuple[object, ...]:
    return (
        await reads.active_users(scope, WINDOW, Granularity.DAY),
        await reads.conversions(scope, WINDOW, Granularity.DAY),
        await reads.revenue(scope, WINDOW, Granularity.DAY),
        await reads.geography(scope, WINDOW),
    )


def _raw_answers(raw: DuckDBEventStore, scope: Scope) -> tuple[object, ...]:
    return (
        metrics.active_users(raw, scope, WINDOW, Granularity.DAY),
        (
            metrics.conversions(raw, scope, WINDOW, Granularity.DAY),
            metrics.overall_conversion_rate(raw, scope, WINDOW),
        ),
        metrics.revenue(raw, scope, WINDOW, Granularity.DAY),
        metrics.geography(raw, scope, WINDOW),
    )


def _comparable(answers: tuple[object, ...]) -> tuple[object, ...]:
    users, conversions, revenue, geography = answers
    if isinstance(conversions, tuple):
        return answers
    return (users, (conversions.rows, conversions.overall_rate), revenue, geography)  # type: ignore[attr-defined]


def test_the_planner_uses_the_tenants_own_raw_window() -> None:
    short = rollups.plan(WINDOW, Granularity.DAY, NOW, RETENTION.policy_for("short"))
    std = rollups.plan(WINDOW, Granularity.DAY, NOW, RETENTION.policy_for("std"))
    nobody = rollups.plan(WINDOW, Granularity.DAY, NOW, RETENTION.policy_for("no-policy"))
    assert short.tier is Tier.DAY
    assert std.tier is None and nobody.tier is None
    # Across tenants the strictest policy decides: every tenant must still hold it.
    assert RETENTION.policy_for(None) == SHORT
    assert rollups.plan(WINDOW, Granularity.DAY, NOW, RETENTION.policy_for(None)).tier is Tier.DAY
    # The short tenant's tiers are shorter too: minute buckets 5 days back are gone for
    # it (minute tier 4 days), while the default tenant still reads them raw.
    five_days_back = TimeRange(NOW - timedelta(days=5), NOW - timedelta(days=5, hours=-1))
    with pytest.raises(RollupRangeError, match="older than 2 days"):
        rollups.plan(five_days_back, Granularity.MINUTE, NOW, RETENTION.policy_for("short"))
    assert (
        rollups.plan(five_days_back, Granularity.MINUTE, NOW, RETENTION.policy_for("std")).tier
        is None
    )


async def test_a_shorter_raw_window_reads_rollups_equal_to_raw_and_survives_raw_deletion(
    stores: Stores,
) -> None:
    reads = stores.reads()
    short, std, every = Scope.tenant("short"), Scope.tenant("std"), Scope.all_tenants()
    before = {s: _raw_answers(stores.raw, s) for s in (short, std, every)}
    for scope in (short, std, every):
        # Where raw still exists, the rollup answer (short, all tenants) and the raw
        # answer (std) are identical to the raw computation.
        assert _comparable(await _answers(reads, scope)) == before[scope]
    assert before[short][2], "the window must hold revenue for the test to mean anything"

    # The retention job deletes raw past each tenant's raw window... here past 2 days
    # for both tenants, so the answers show which source each read used.
    for tenant_id in ("short", "std"):
        stores.raw.delete_occurred_before(tenant_id, NOW - timedelta(days=2))
    after_short = _comparable(await _answers(reads, short))
    after_std = _comparable(await _answers(reads, std))
    # The short tenant is answered from rollups: unchanged.
    assert after_short == before[short]
    assert _comparable(await _answers(reads, every)) == before[every]
    # The default tenant's range is inside its raw window: read raw, so (active users
    # aside, whose 30-day trailing window always reaches the tiers) it follows raw.
    assert after_std[1:] == _raw_answers(stores.raw, std)[1:]
    assert after_std[1:] != before[std][1:]


def test_prune_keeps_each_tier_as_long_as_each_tenants_policy(tmp_path: Path) -> None:
    default = RetentionPolicy(raw_days=1, minute_days=3, hour_days=6, day_days=365)
    own = {
        "short": RetentionPolicy(raw_days=1, minute_days=2, hour_days=4, day_days=365),
        "long": RetentionPolicy(raw_days=1, minute_days=8, hour_days=9, day_days=365),
    }
    retention = TenantRetention(default, own.get, lambda: own)
    with DuckDBEventStore(tmp_path / "events.duckdb") as raw:
        raw.append(
            random_events(
                5,
                6000,
                tenants=("short", "long", "std"),
                start=NOW - timedelta(days=12),
                span=timedelta(days=12),
                users=40,
            )
        )
        store = RollupStore(tmp_path / "rollups.duckdb")
        maintainer = RollupMaintainer(raw, store, retention, clock=lambda: NOW)
        maintainer.rebuild()
        maintainer.prune()
        for tier in (Tier.MINUTE, Tier.HOUR):
            oldest = {
                row["tenant_id"]: row["b"]
                for row in store.read(
                    f"SELECT tenant_id, min(bucket_us) AS b FROM {tier.table} GROUP BY ALL"
                ).to_pylist()
            }
            for tenant_id in ("short", "long", "std"):
                policy = own.get(tenant_id, default)
                horizon = rollups.floor_to(NOW - policy.keeps(tier) - timedelta(days=1), Tier.DAY)
                # Nothing older than the tenant's own horizon, and everything after it
                # kept (the data is dense: every day has events of every tenant).
                assert (
                    horizon <= rollups._from_us(oldest[tenant_id]) < horizon + timedelta(hours=2)
                ), (tier, tenant_id)
        store.close()


def test_a_rebuild_keeps_rollups_whose_raw_the_tenants_retention_deleted(
    tmp_path: Path,
) -> None:
    with DuckDBEventStore(tmp_path / "events.duckdb") as raw:
        raw.append(EVENTS)
        store = RollupStore(tmp_path / "rollups.duckdb")
        maintainer = RollupMaintainer(raw, store, RETENTION, clock=lambda: NOW)
        maintainer.rebuild()
        args = (Scope.tenant("short"), WINDOW, Granularity.DAY)
        before = rollups.revenue(store, Tier.DAY, *args)
        std_before = rollups.revenue(store, Tier.DAY, Scope.tenant("std"), WINDOW, Granularity.DAY)
        raw.delete_occurred_before("short", NOW - timedelta(days=2))
        # After a crash: rebuild the default raw window, the short tenant only its own.
        maintainer.rebuild(NOW - timedelta(days=8), {"short": NOW - timedelta(days=2)})
        assert rollups.revenue(store, Tier.DAY, *args) == before
        assert (
            rollups.revenue(store, Tier.DAY, Scope.tenant("std"), WINDOW, Granularity.DAY)
            == std_before
            == metrics.revenue(raw, Scope.tenant("std"), WINDOW, Granularity.DAY)
        )
        # Without the tenant's own start the same rebuild would have wiped those days.
        maintainer.rebuild(NOW - timedelta(days=8))
        assert rollups.revenue(store, Tier.DAY, *args) != before
        store.close()


def test_tenant_policies_come_from_the_metadata_store(metadata_backend: MetadataBackend) -> None:
    with closing(metadata_backend.open()) as records:
        retention = tenant_retention(DEFAULT, records)
        assert retention.policy_for("acme") == DEFAULT
        records.put_retention("acme", RetentionDays(3, 10, 100, 1000), NOW)
        # Read at each use: a policy stored through compliance applies at once.
        assert retention.policy_for("acme") == RetentionPolicy(3, 10, 100, 1000)
        assert retention.policy_for("globex") == DEFAULT
        assert retention.listing() == {"acme": RetentionPolicy(3, 10, 100, 1000)}
        assert retention.policy_for(None) == RetentionPolicy(3, 10, 100, 1000)
        # A row breaking the tier order is ignored, not fatal to reads.
        records.put_retention("odd", RetentionDays(0, 10, 100, 1000), NOW)
        assert retention.policy_for("odd") == DEFAULT
        assert set(retention.listing()) == {"acme"}
