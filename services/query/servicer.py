"""gRPC adapter of the query service: proto → metrics → proto.

Built here: `GetMetrics`. The other analyses are issue #5 and answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime
from typing import Any

from bilten.analytics.query.v1 import query_service_pb2 as pb
from bilten.analytics.query.v1 import query_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import metric_pb2

from services.platform.errors import FieldViolation, invalid_request
from services.platform.grpc_edge import principal
from services.platform.unbuilt import answer_unbuilt
from services.query import convert, metrics
from services.storage.event_store import EventStore

_COUNT = metric_pb2.METRIC_TYPE_COUNTER
_GAUGE = metric_pb2.METRIC_TYPE_GAUGE
_GROUPABLE = {pb.DIMENSION_EVENT_NAME: "event_name", pb.DIMENSION_EVENT_TYPE: "event_type"}


def _point(bucket: datetime, value: float, **dimensions: str) -> metric_pb2.MetricPoint:
    return metric_pb2.MetricPoint(
        bucket_start_time=convert.timestamp(bucket), dimensions=dimensions, value=value
    )


@answer_unbuilt(pb.DESCRIPTOR.services_by_name["QueryService"], "issue #5, analytics")
class QueryServicer(pb_grpc.QueryServiceServicer):
    def __init__(self, store: EventStore) -> None:
        self._store = store

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Any
    ) -> pb.GetMetricsResponse:
        scope = convert.scope(principal(), request.tenant_id)
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        filters = convert.filters(
            request.filter.event_name, request.filter.event_type, request.filter.ticketed_event_id
        )
        group_by = [_GROUPABLE.get(d) for d in request.group_by]
        if None in group_by:
            raise invalid_request(
                [
                    FieldViolation(
                        "group_by",
                        "v1 groups by DIMENSION_EVENT_NAME and DIMENSION_EVENT_TYPE; "
                        "other dimensions come with issue #5",
                    )
                ]
            )
        return await asyncio.to_thread(
            self._compute, list(request.metrics), scope, window, granularity, filters, group_by
        )

    def _compute(
        self,
        kinds: list[int],
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters,
        group_by: list[str | None],
    ) -> pb.GetMetricsResponse:
        response = pb.GetMetricsResponse()
        for kind in kinds:
            if kind == pb.METRIC_KIND_EVENT_COUNT:
                sums: dict[tuple[datetime, tuple[tuple[str, str], ...]], int] = defaultdict(int)
                for row in metrics.event_counts(self._store, scope, window, granularity, filters):
                    values = {
                        "event_name": row.event_name,
                        "event_type": convert.EVENT_TYPE_NAMES[row.event_type],
                    }
                    key = tuple((d, values[d]) for d in group_by if d is not None)
                    sums[(row.bucket_start, key)] += row.events
                series = metric_pb2.MetricSeries(
                    metric_name="event_count",
                    metric_type=_COUNT,
                    unit="1",
                    calculation_method="count(*)",
                )
                for (bucket, key), value in sorted(sums.items()):
                    series.points.append(_point(bucket, value, **dict(key)))
            elif kind == pb.METRIC_KIND_ACTIVE_USERS:
                active = metrics.active_users(self._store, scope, window, granularity, filters)
                series = metric_pb2.MetricSeries(
                    metric_name="active_users",
                    metric_type=_GAUGE,
                    unit="1",
                    calculation_method="count(distinct coalesce(user_id, anonymous_id))",
                    points=[_point(r.bucket_start, r.active_users) for r in active.buckets],
                )
            elif kind == pb.METRIC_KIND_CONVERSIONS:
                rows = metrics.conversions(self._store, scope, window, granularity, filters)
                series = metric_pb2.MetricSeries(
                    metric_name="conversions",
                    metric_type=_COUNT,
                    unit="1",
                    calculation_method="count(*) where event_type = conversion",
                    points=[_point(r.bucket_start, r.conversions) for r in rows],
                )
            else:
                revenue_rows = metrics.revenue(self._store, scope, window, granularity, filters)
                series = metric_pb2.MetricSeries(
                    metric_name="revenue",
                    metric_type=_COUNT,
                    unit="currency (see the currency dimension)",
                    calculation_method="sum(revenue) of conversion events, per currency",
                    points=[
                        _point(r.bucket_start, float(r.revenue), currency=r.currency)
                        for r in revenue_rows
                    ],
                )
            response.series.append(series)
        return response
