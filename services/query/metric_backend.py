"""Where the metric reads of the query and aggregation services are answered.

`MetricBackend` is the store-less shape of the `services.query.metrics` functions (event
counts, active users, conversions, overall conversion rate, revenue, geography): the
embedded store (`EmbeddedMetrics`, the default) or Apache Pinot
(`services.pinot.backend.PinotMetrics`), chosen once per process by `for_settings` from
`BILTEN_QUERY_BACKEND` where the mesh composes the services. Servicers and `MetricReads`
only hold a `MetricBackend`; they never look at the setting.

Only these reads move to Pinot. Funnels, cohorts, sessions, users, ticketed events,
experiments, custom SQL and reports keep reading the embedded store, which the stream
processor fills from the same Kafka topic in the same process (docs/streaming.md says
why: Pinot 0.11 has no `funnelMaxStep`, no usable multi-stage engine for joins and no
window functions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from services.query import metrics

if TYPE_CHECKING:
    from services.platform.settings import PlatformSettings
    from services.storage.event_store import EventStore


class MetricBackend(Protocol):
    """Blocking reads (the callers run them in a worker thread)."""

    def event_counts(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = ...,
    ) -> tuple[metrics.EventCountRow, ...]: ...

    def active_users(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = ...,
    ) -> metrics.ActiveUsers: ...

    def conversions(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = ...,
    ) -> tuple[metrics.ConversionRow, ...]: ...

    def overall_conversion_rate(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        filters: metrics.MetricFilters = ...,
    ) -> float: ...

    def revenue(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = ...,
    ) -> tuple[metrics.RevenueRow, ...]: ...

    def geography(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        filters: metrics.MetricFilters = ...,
    ) -> tuple[metrics.GeoRow, ...]: ...


class EmbeddedMetrics:
    """The metrics functions bound to one event store."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def event_counts(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> tuple[metrics.EventCountRow, ...]:
        return metrics.event_counts(self.store, scope, time_range, granularity, filters)

    def active_users(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> metrics.ActiveUsers:
        return metrics.active_users(self.store, scope, time_range, granularity, filters)

    def conversions(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> tuple[metrics.ConversionRow, ...]:
        return metrics.conversions(self.store, scope, time_range, granularity, filters)

    def overall_conversion_rate(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> float:
        return metrics.overall_conversion_rate(self.store, scope, time_range, filters)

    def revenue(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> tuple[metrics.RevenueRow, ...]:
        return metrics.revenue(self.store, scope, time_range, granularity, filters)

    def geography(
        self,
        scope: metrics.Scope,
        time_range: metrics.TimeRange,
        filters: metrics.MetricFilters = metrics.NO_FILTERS,
    ) -> tuple[metrics.GeoRow, ...]:
        return metrics.geography(self.store, scope, time_range, filters)


def for_settings(settings: PlatformSettings, store: EventStore) -> MetricBackend:
    """The backend `settings.query_backend` names (the settings already refused
    `pinot` without the Kafka event log)."""
    if settings.query_backend == "pinot":
        # Imported here: pinotdb and httpx are only needed by processes that use Pinot.
        from services.pinot.backend import PinotMetrics

        return PinotMetrics(
            settings.pinot_broker_url, settings.pinot_table, settings.pinot_query_timeout_ms
        )
    return EmbeddedMetrics(store)
