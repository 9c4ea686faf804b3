"""gRPC adapter of the aggregation service: proto → domain → proto.

KPI reads and experiments are answered from the result cache when the same request in
the same scope was answered since the tenant's data last changed, else computed by
`reads.MetricReads` (raw events or a rollup tier); the three streams read the
in-process hubs of `services.live`.

Streams: a request that cannot be served (another tenant's id) fails before the first
message, so through Envoy it is a plain HTTP error. Once messages flow, a failure is
sent in-band first (`error_message` on a last message) and the status follows, because
through Envoy (SSE) the HTTP status is already 200 by then.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

from bilten.analytics.aggregation.v1 import aggregation_service_pb2 as pb
from bilten.analytics.aggregation.v1 import aggregation_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import metric_pb2
from google.protobuf.message import Message

from services.aggregation.reads import MetricReads
from services.live.alerts import AlertSeverity, AlertsHub, LiveAlert
from services.live.mailbox import Subscription
from services.live.metrics_hub import LiveMetrics, LiveMetricsHub, TicketedEventLiveMetrics
from services.platform.errors import (
    AnalyticsError,
    FieldViolation,
    dependency_unavailable,
    invalid_request,
)
from services.platform.grpc_edge import principal
from services.query import convert, metrics
from services.query.result_cache import ResultCache
from services.query.rollups import RollupRangeError
from services.storage.event_store import EventStore

_SEVERITIES = {
    AlertSeverity.INFO: pb.ALERT_SEVERITY_INFO,
    AlertSeverity.WARNING: pb.ALERT_SEVERITY_WARNING,
    AlertSeverity.CRITICAL: pb.ALERT_SEVERITY_CRITICAL,
}
_SHUTTING_DOWN = "the live stream ended because the server is shutting down; reconnect"

T = TypeVar("T")
M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)


def _range_error(error: RollupRangeError) -> AnalyticsError:
    return invalid_request([FieldViolation("time_range", str(error))])


def _moneys(amounts: tuple[metrics.CurrencyAmount, ...]) -> list[Any]:
    return [convert.money(a.currency, a.amount) for a in amounts]


def _live_metrics(update: LiveMetrics, dropped: int) -> pb.StreamLiveMetricsResponse:
    return pb.StreamLiveMetricsResponse(
        update_time=convert.timestamp(update.computed_at),
        active_session_count=update.active_sessions,
        events_last_minute=update.events_last_minute,
        tickets_sold_today=update.tickets_sold_today,
        revenues_today=_moneys(update.revenue_today),
        dropped_update_count=dropped,
    )


def _ticketed_metrics(
    update: TicketedEventLiveMetrics, dropped: int
) -> pb.StreamTicketedEventLiveMetricsResponse:
    return pb.StreamTicketedEventLiveMetricsResponse(
        update_time=convert.timestamp(update.computed_at),
        views_today=update.views_today,
        active_visitor_count=update.active_visitors,
        tickets_sold_today=update.tickets_sold_today,
        revenues_today=_moneys(update.revenue_today),
        dropped_update_count=dropped,
    )


def _alert(alert: LiveAlert, dropped: int) -> pb.StreamAlertsResponse:
    return pb.StreamAlertsResponse(
        alert=pb.Alert(
            alert_id=alert.alert_id,
            tenant_id=alert.tenant_id,
            metric_name=alert.metric_name,
            severity=_SEVERITIES[alert.severity],
            observed_value=alert.observed,
            expected_lower=alert.expected_lower,
            expected_upper=alert.expected_upper,
            raise_time=convert.timestamp(alert.raised_at),
            message=alert.message,
        )
    )


async def _stream(
    subscription: Subscription[T],
    render: Callable[[T, int], M],
    failed: Callable[[str], M],
) -> AsyncIterator[M]:
    """Renders a subscription's items; in-band error message, then the status."""
    async with subscription:
        try:
            async for item in subscription:
                yield render(item, subscription.dropped)
        except Exception as error:
            message = error.message if isinstance(error, AnalyticsError) else "internal error"
            yield failed(message)
            raise
    # The hub closed the subscription: the server is stopping.
    yield failed(_SHUTTING_DOWN)
    raise dependency_unavailable(_SHUTTING_DOWN)


class AggregationServicer(pb_grpc.AggregationServiceServicer):
    def __init__(
        self,
        store: EventStore,
        *,
        reads: MetricReads | None = None,
        cache: ResultCache | None = None,
        live: LiveMetricsHub | None = None,
        alerts: AlertsHub | None = None,
    ) -> None:
        # Without the mesh's parts (tests, tools): raw reads, no cache, idle streams.
        self._reads = reads or MetricReads(store)
        self._cache = cache or ResultCache(0, 0)
        self._live = live or LiveMetricsHub()
        self._alerts = alerts or AlertsHub()

    async def _answer(
        self, scope: metrics.Scope, request: M, build: Callable[[], Awaitable[R]]
    ) -> R:
        """The cached answer to this exact request in this scope, else `build()`'s.

        The finished response is cached (never mutated after, and serialising does not
        mutate), so a repeat costs a lookup: no thread hop, no SQL, no conversion.
        """
        key = (type(request).__name__, request.SerializeToString(deterministic=True))
        found = self._cache.lookup(scope.tenant_id, key)
        if found.hit:
            response: R = found.value
            return response
        built = await build()
        self._cache.store(scope.tenant_id, key, found.generation, built)
        return built

    async def GetActiveUsers(
        self, request: pb.GetActiveUsersRequest, context: Any
    ) -> pb.GetActiveUsersResponse:
        scope = convert.scope(principal(), request.tenant_id)
        return await self._answer(scope, request, lambda: self._get_active_users(scope, request))

    async def _get_active_users(
        self, scope: metrics.Scope, request: pb.GetActiveUsersRequest
    ) -> pb.GetActiveUsersResponse:
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        try:
            active = await self._reads.active_users(scope, window, granularity)
        except RollupRangeError as error:
            raise _range_error(error) from error
        return pb.GetActiveUsersResponse(
            series=metric_pb2.MetricSeries(
                metric_name="active_users",
                metric_type=metric_pb2.METRIC_TYPE_GAUGE,
                unit="1",
                calculation_method="count(distinct coalesce(user_id, anonymous_id))",
                points=[
                    metric_pb2.MetricPoint(
                        bucket_start_time=convert.timestamp(r.bucket_start), value=r.active_users
                    )
                    for r in active.buckets
                ],
            ),
            daily_active_users=active.dau,
            weekly_active_users=active.wau,
            monthly_active_users=active.mau,
        )

    async def GetConversions(
        self, request: pb.GetConversionsRequest, context: Any
    ) -> pb.GetConversionsResponse:
        scope = convert.scope(principal(), request.tenant_id)
        return await self._answer(scope, request, lambda: self._get_conversions(scope, request))

    async def _get_conversions(
        self, scope: metrics.Scope, request: pb.GetConversionsRequest
    ) -> pb.GetConversionsResponse:
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        filters = convert.filters(ticketed_event_id=request.ticketed_event_id)
        try:
            result = await self._reads.conversions(scope, window, granularity, filters)
        except RollupRangeError as error:
            raise _range_error(error) from error
        return pb.GetConversionsResponse(
            buckets=[
                pb.ConversionBucket(
                    bucket_start_time=convert.timestamp(r.bucket_start),
                    conversion_count=r.conversions,
                    converting_user_count=r.converting_users,
                    active_user_count=r.active_users,
                    conversion_rate=r.conversion_rate,
                )
                for r in result.rows
            ],
            total_conversion_count=sum(r.conversions for r in result.rows),
            overall_conversion_rate=result.overall_rate,
        )

    async def GetRevenue(
        self, request: pb.GetRevenueRequest, context: Any
    ) -> pb.GetRevenueResponse:
        scope = convert.scope(principal(), request.tenant_id)
        return await self._answer(scope, request, lambda: self._get_revenue(scope, request))

    async def _get_revenue(
        self, scope: metrics.Scope, request: pb.GetRevenueRequest
    ) -> pb.GetRevenueResponse:
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        filters = convert.filters(ticketed_event_id=request.ticketed_event_id)
        try:
            rows = await self._reads.revenue(scope, window, granularity, filters)
        except RollupRangeError as error:
            raise _range_error(error) from error
        totals: dict[str, Decimal] = defaultdict(Decimal)
        response = pb.GetRevenueResponse()
        for row in rows:
            totals[row.currency] += row.revenue
            response.buckets.append(
                pb.RevenueBucket(
                    bucket_start_time=convert.timestamp(row.bucket_start),
                    revenue=convert.money(row.currency, row.revenue),
                    order_count=row.orders,
                    ticket_count=row.tickets,
                )
            )
        response.totals.extend(convert.money(c, a) for c, a in sorted(totals.items()))
        return response

    async def GetGeoDistribution(
        self, request: pb.GetGeoDistributionRequest, context: Any
    ) -> pb.GetGeoDistributionResponse:
        scope = convert.scope(principal(), request.tenant_id)
        return await self._answer(
            scope, request, lambda: self._get_geo_distribution(scope, request)
        )

    async def _get_geo_distribution(
        self, scope: metrics.Scope, request: pb.GetGeoDistributionRequest
    ) -> pb.GetGeoDistributionResponse:
        window = convert.time_range(request.time_range)
        filters = convert.filters(ticketed_event_id=request.ticketed_event_id)
        try:
            rows = await self._reads.geography(scope, window, filters)
        except RollupRangeError as error:
            raise _range_error(error) from error
        return pb.GetGeoDistributionResponse(
            countries=[
                pb.CountryActivity(
                    country_code=r.country_code,
                    event_count=r.events,
                    user_count=r.users,
                    revenues=_moneys(r.revenue),
                )
                for r in rows
            ]
        )

    async def GetExperimentResults(
        self, request: pb.GetExperimentResultsRequest, context: Any
    ) -> pb.GetExperimentResultsResponse:
        scope = convert.scope(principal(), request.tenant_id)
        return await self._answer(
            scope, request, lambda: self._get_experiment_results(scope, request)
        )

    async def _get_experiment_results(
        self, scope: metrics.Scope, request: pb.GetExperimentResultsRequest
    ) -> pb.GetExperimentResultsResponse:
        window = convert.time_range(request.time_range)
        results = await self._reads.experiment(
            scope,
            window,
            request.experiment_id,
            request.conversion_event_name,
            request.confidence_level,
        )
        return pb.GetExperimentResultsResponse(
            variants=[
                pb.VariantResult(
                    variant=v.variant,
                    exposed_user_count=v.exposed_users,
                    converted_user_count=v.converted_users,
                    conversion_rate=v.conversion_rate,
                    uplift=v.uplift,
                    uplift_lower_bound=v.uplift_lower,
                    uplift_upper_bound=v.uplift_upper,
                    p_value=v.p_value,
                )
                for v in results.variants
            ],
            test_name=results.test_name,
        )

    async def StreamLiveMetrics(
        self, request: pb.StreamLiveMetricsRequest, context: Any
    ) -> AsyncIterator[pb.StreamLiveMetricsResponse]:
        scope = convert.scope(principal(), request.tenant_id)
        async for message in _stream(
            self._live.subscribe(scope.tenant_id),
            _live_metrics,
            lambda error: pb.StreamLiveMetricsResponse(error_message=error),
        ):
            yield message

    async def StreamTicketedEventLiveMetrics(
        self, request: pb.StreamTicketedEventLiveMetricsRequest, context: Any
    ) -> AsyncIterator[pb.StreamTicketedEventLiveMetricsResponse]:
        scope = convert.scope(principal(), request.tenant_id)
        async for message in _stream(
            self._live.subscribe_ticketed(scope.tenant_id, request.ticketed_event_id),
            _ticketed_metrics,
            lambda error: pb.StreamTicketedEventLiveMetricsResponse(error_message=error),
        ):
            yield message

    async def StreamAlerts(
        self, request: pb.StreamAlertsRequest, context: Any
    ) -> AsyncIterator[pb.StreamAlertsResponse]:
        scope = convert.scope(principal(), request.tenant_id)
        async for message in _stream(
            self._alerts.subscribe(scope.tenant_id),
            _alert,
            lambda error: pb.StreamAlertsResponse(error_message=error),
        ):
            yield message
