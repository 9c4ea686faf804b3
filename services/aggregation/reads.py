"""The aggregation service's reads: raw events or a rollup tier, chosen per range.

For each KPI read, `rollups.plan` picks raw events (ranges inside the raw window) or a
rollup tier (older ranges), transparently, under the retention of the read's scope: the
tenant's own policy when compliance stored one, else the platform default (across all
tenants, the strictest of them; `rollups.TenantRetention`); a rollup read first flushes
the rollups of events not rolled up yet (the read barrier), so what was acknowledged is
seen. The computation runs in a worker thread (DuckDB releases the GIL). The servicer
caches the finished answers (`services.query.result_cache`), so a repeat costs no
thread hop.

Experiment results always read raw events: exposures are identified by properties,
which the rollups do not keep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from services.aggregation import experiments
from services.query import metrics, rollups
from services.query.metric_backend import EmbeddedMetrics, MetricBackend
from services.storage.event_store import EventStore

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Conversions:
    rows: tuple[metrics.ConversionRow, ...]
    overall_rate: float


class MetricReads:
    def __init__(
        self,
        events: EventStore,
        maintainer: rollups.RollupMaintainer | None = None,
        policy: rollups.RetentionPolicy | rollups.TenantRetention | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """`policy`: one retention for every tenant, or the default plus the tenants'
        own (`TenantRetention`); None is the product default."""
        self._events = events
        self._maintainer = maintainer
        if isinstance(policy, rollups.TenantRetention):
            self._retention = policy
        else:
            self._retention = rollups.TenantRetention(policy or rollups.RetentionPolicy())
        self._clock = clock
        # Raw-window reads; Pinot when the mesh says so (`read_raw_from`).
        self._raw: MetricBackend = EmbeddedMetrics(events)

    def use_rollups(self, maintainer: rollups.RollupMaintainer) -> None:
        """From now on, ranges older than the raw window read the maintainer's tiers."""
        self._maintainer = maintainer

    def read_raw_from(self, backend: MetricBackend) -> None:
        """Ranges inside the raw window are answered by `backend` (Pinot with
        query_backend=pinot: its table keeps the raw window); rollup tiers and
        experiments keep reading the embedded stores."""
        self._raw = backend

    async def _run(self, compute: Callable[[], T]) -> T:
        return await asyncio.to_thread(compute)

    def _plan(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity | None,
        trailing_days: int = 0,
    ) -> rollups.ReadPlan:
        """Where to read (raw without a maintainer); flushes rollups before a tier read."""
        if self._maintainer is None:
            return rollups.ReadPlan(None, window)
        policy = self._retention.policy_for(scope.tenant_id)
        plan = rollups.plan(window, granularity, self._clock(), policy, trailing_days)
        if plan.tier is not None:
            self._maintainer.catch_up(scope.tenant_id)
        return plan

    @property
    def _rollups(self) -> rollups.RollupStore:
        assert self._maintainer is not None
        return self._maintainer.store

    def grouped_event_counts_now(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity,
        dimensions: Sequence[str] = (),
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> tuple[metrics.GroupedEventCount, ...]:
        """Event counts by dimensions, in the caller's thread (the query servicer's
        GetMetrics already runs in a worker). A dimension the tiers lack (`source`) is
        only available inside the raw window: `RollupDimensionError` past it."""
        plan = self._plan(scope, window, granularity)
        if plan.tier is None:
            if set(dimensions) <= {"event_name", "event_type"}:
                # What every backend answers (Pinot included).
                rows = self._raw.event_counts(scope, window, granularity, filters)
                return metrics.regroup_event_counts(rows, dimensions)
            # Country, ticketed event, source: the embedded store, which holds the raw
            # window in every shape (the stream processor fills it next to Pinot).
            return metrics.grouped_event_counts(
                self._events, scope, window, granularity, dimensions, filters
            )
        missing = sorted(set(dimensions) - rollups.ROLLUP_DIMENSIONS)
        if missing:
            raw_days = self._retention.policy_for(scope.tenant_id).raw_days
            raise rollups.RollupDimensionError(
                f"grouping by {', '.join(missing)} needs raw events, which are kept"
                f" {raw_days} days; older events are kept as rollups, which do not have"
                f" {'it' if len(missing) == 1 else 'them'}: start the range within the last"
                f" {raw_days} days or group by event name, event type, country or"
                " ticketed event"
            )
        return rollups.grouped_event_counts(
            self._rollups, plan.tier, scope, plan.time_range, granularity, dimensions, filters
        )

    async def grouped_event_counts(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity,
        dimensions: Sequence[str] = (),
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> tuple[metrics.GroupedEventCount, ...]:
        return await self._run(
            lambda: self.grouped_event_counts_now(scope, window, granularity, dimensions, filters)
        )

    async def active_users(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> metrics.ActiveUsers:
        def compute() -> metrics.ActiveUsers:
            plan = self._plan(scope, window, granularity, rollups.TRAILING_DAYS)
            if plan.tier is None:
                return self._raw.active_users(scope, window, granularity, filters)
            return rollups.active_users(
                self._rollups, plan.tier, scope, plan.time_range, granularity, filters
            )

        return await self._run(compute)

    async def conversions(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> Conversions:
        def compute() -> Conversions:
            plan = self._plan(scope, window, granularity)
            if plan.tier is None:
                return Conversions(
                    self._raw.conversions(scope, window, granularity, filters),
                    # Over distinct users of the whole range, not a mean of bucket rates.
                    self._raw.overall_conversion_rate(scope, window, filters),
                )
            return Conversions(
                rollups.conversions(
                    self._rollups, plan.tier, scope, plan.time_range, granularity, filters
                ),
                rollups.overall_conversion_rate(
                    self._rollups, plan.tier, scope, plan.time_range, filters
                ),
            )

        return await self._run(compute)

    async def revenue(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> tuple[metrics.RevenueRow, ...]:
        def compute() -> tuple[metrics.RevenueRow, ...]:
            plan = self._plan(scope, window, granularity)
            if plan.tier is None:
                return self._raw.revenue(scope, window, granularity, filters)
            return rollups.revenue(
                self._rollups, plan.tier, scope, plan.time_range, granularity, filters
            )

        return await self._run(compute)

    async def geography(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> tuple[metrics.GeoRow, ...]:
        def compute() -> tuple[metrics.GeoRow, ...]:
            plan = self._plan(scope, window, None)
            if plan.tier is None:
                return self._raw.geography(scope, window, filters)
            return rollups.geography(self._rollups, plan.tier, scope, plan.time_range, filters)

        return await self._run(compute)

    async def experiment(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        experiment_id: str,
        conversion_event_name: str,
        confidence: float,
    ) -> experiments.ExperimentResults:
        def compute() -> experiments.ExperimentResults:
            counts = experiments.variant_counts(
                self._events, scope, window, experiment_id, conversion_event_name
            )
            return experiments.analyze(counts, confidence)

        return await self._run(compute)
