"""gRPC adapter of the aggregation service: proto → metrics → proto.

Built here: active users, conversions, revenue, geography. Experiments and the live
streams are issue #5 and answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from decimal import Decimal
from typing import Any

from bilten.analytics.aggregation.v1 import aggregation_service_pb2 as pb
from bilten.analytics.aggregation.v1 import aggregation_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import metric_pb2

from services.platform.grpc_edge import principal
from services.platform.unbuilt import answer_unbuilt
from services.query import convert, metrics
from services.storage.event_store import EventStore


@answer_unbuilt(pb.DESCRIPTOR.services_by_name["AggregationService"], "issue #5, analytics")
class AggregationServicer(pb_grpc.AggregationServiceServicer):
    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def GetActiveUsers(
        self, request: pb.GetActiveUsersRequest, context: Any
    ) -> pb.GetActiveUsersResponse:
        scope = convert.scope(principal(), request.tenant_id)
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        active = await asyncio.to_thread(
            metrics.active_users, self._store, scope, window, granularity
        )
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
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        filters = convert.filters(ticketed_event_id=request.ticketed_event_id)
        rows = await asyncio.to_thread(
            metrics.conversions, self._store, scope, window, granularity, filters
        )
        # The overall rate is over distinct users of the whole range, not a mean of
        # the bucket rates.
        totals = await asyncio.to_thread(self._overall_rate, scope, window, filters)
        return pb.GetConversionsResponse(
            buckets=[
                pb.ConversionBucket(
                    bucket_start_time=convert.timestamp(r.bucket_start),
                    conversion_count=r.conversions,
                    converting_user_count=r.converting_users,
                    active_user_count=r.active_users,
                    conversion_rate=r.conversion_rate,
                )
                for r in rows
            ],
            total_conversion_count=sum(r.conversions for r in rows),
            overall_conversion_rate=totals,
        )

    def _overall_rate(
        self, scope: metrics.Scope, window: metrics.TimeRange, filters: metrics.MetricFilters
    ) -> float:
        return metrics.overall_conversion_rate(self._store, scope, window, filters)

    async def GetRevenue(
        self, request: pb.GetRevenueRequest, context: Any
    ) -> pb.GetRevenueResponse:
        scope = convert.scope(principal(), request.tenant_id)
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        filters = convert.filters(ticketed_event_id=request.ticketed_event_id)
        rows = await asyncio.to_thread(
            metrics.revenue, self._store, scope, window, granularity, filters
        )
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
        window = convert.time_range(request.time_range)
        filters = convert.filters(ticketed_event_id=request.ticketed_event_id)
        rows = await asyncio.to_thread(metrics.geography, self._store, scope, window, filters)
        return pb.GetGeoDistributionResponse(
            countries=[
                pb.CountryActivity(
                    country_code=r.country_code,
                    event_count=r.events,
                    user_count=r.users,
                    revenues=[convert.money(a.currency, a.amount) for a in r.revenue],
                )
                for r in rows
            ]
        )
