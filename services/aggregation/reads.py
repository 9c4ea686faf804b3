"""The aggregation service's reads: raw events or a rollup tier, chosen per range.

For each KPI read, `rollups.plan` picks raw events (ranges inside the raw window) or a
rollup tier (older ranges), transparently; a rollup read first flushes the rollups of
events not rolled up yet (the read barrier), so what was acknowledged is seen. The
computation runs in a worker thread (DuckDB releases the GIL). The servicer caches the
finished answers (`services.query.result_cache`), so a repeat costs no thread hop.

Experiment results always read raw events: exposures are identified by properties,
which the rollups do not keep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from services.aggregation import experiments
from services.query import metrics, rollups
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
        policy: rollups.RetentionPolicy | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._events = events
        self._maintainer = maintainer
        self._policy = policy or rollups.RetentionPolicy()
        self._clock = clock

    def use_rollups(self, maintainer: rollups.RollupMaintainer) -> None:
        """From now on, ranges older than the raw window read the maintainer's tiers."""
        self._maintainer = maintainer

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
        plan = rollups.plan(window, granularity, self._clock(), self._policy, trailing_days)
        if plan.tier is not None:
            self._maintainer.catch_up(scope.tenant_id)
        return plan

    @property
    def _rollups(self) -> rollups.RollupStore:
        assert self._maintainer is not None
        return self._maintainer.store

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
                return metrics.active_users(self._events, scope, window, granularity, filters)
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
                    metrics.conversions(self._events, scope, window, granularity, filters),
                    # Over distinct users of the whole range, not a mean of bucket rates.
                    metrics.overall_conversion_rate(self._events, scope, window, filters),
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
                return metrics.revenue(self._events, scope, window, granularity, filters)
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
                return metrics.geography(self._events, scope, window, filters)
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
