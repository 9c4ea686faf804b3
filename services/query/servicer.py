"""gRPC adapter of the query service: proto → domain (metrics, funnels, cohorts,
sessions, users, ticketed events, custom SQL, reports) → proto.

Thin by design: the tenant comes from the credential (`convert.scope`), request shapes
are validated at the edge, conversions live in `convert`, every decision in the domain
modules, which run in worker threads (DuckDB releases the GIL while it works).

Scheduled reports need a SQLite file (`reports_path`). Their `ReportScheduler` is a
background task with an owner's lifecycle: `start_background()` starts it on the running
loop (the mesh does, in `Mesh.start`) and `aclose()` stops it and closes the file (the
mesh registers it as a closer, so `Mesh.stop` ends the task before the stores close).
The constructor starts nothing: a servicer built and dropped must not leave a task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bilten.analytics.query.v1 import query_service_pb2 as pb
from bilten.analytics.query.v1 import query_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import metric_pb2

from services.platform.errors import (
    AnalyticsError,
    FieldViolation,
    StatusCode,
    invalid_request,
    not_found,
)
from services.platform.grpc_edge import principal
from services.query import (
    cohorts,
    convert,
    funnels,
    metrics,
    reports,
    rollups,
    sessions,
    sql_sandbox,
    ticketed_events,
    users,
)
from services.query.metric_backend import EmbeddedMetrics, MetricBackend
from services.storage.event_store import EventStore

if TYPE_CHECKING:  # the aggregation's reads, passed in by the mesh
    from services.aggregation.reads import MetricReads

_COUNT = metric_pb2.METRIC_TYPE_COUNTER
_GAUGE = metric_pb2.METRIC_TYPE_GAUGE


def _point(bucket: datetime, value: float, **dimensions: str) -> metric_pb2.MetricPoint:
    return metric_pb2.MetricPoint(
        bucket_start_time=convert.timestamp(bucket), dimensions=dimensions, value=value
    )


def _invalid(field: str, error: ValueError) -> AnalyticsError:
    return invalid_request([FieldViolation(field, str(error))])


def _reports_unavailable() -> AnalyticsError:
    return AnalyticsError(
        StatusCode.FAILED_PRECONDITION,
        "INVALID_REQUEST",
        "this query service runs without a report store",
    )


class QueryServicer(pb_grpc.QueryServiceServicer):
    def __init__(
        self,
        store: EventStore,
        reports_path: Path | None = None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        scheduler_tick_seconds: float = 30.0,
        metric_backend: MetricBackend | None = None,
        reads: MetricReads | None = None,
    ) -> None:
        """`reports_path`: the SQLite file for scheduled reports (the metadata file in
        the mesh); without it the report RPCs answer FAILED_PRECONDITION.
        `metric_backend`: where GetMetrics reads (the mesh passes Pinot with
        query_backend=pinot); every other RPC reads `store`.
        `reads`: the aggregation's raw-or-rollup reads (the mesh's): GetMetrics' event
        counts then come from the rollups for ranges past the tenant's raw window, where
        raw events are deleted. Without it they read `metric_backend` / `store`."""
        self._store = store
        self._reads = reads
        self._metrics: MetricBackend = metric_backend or EmbeddedMetrics(store)
        self._clock = clock
        self._reports: reports.ReportStore | None = None
        self.scheduler: reports.ReportScheduler | None = None
        if reports_path is not None:
            self._reports = reports.ReportStore(reports_path)
            self.scheduler = reports.ReportScheduler(
                self._reports, store, tick_seconds=scheduler_tick_seconds, clock=clock
            )

    def start_background(self) -> None:
        """Starts the report scheduler on the running loop (idempotent; a no-op without
        a report store). Without it, reports are stored but only run by
        `scheduler.run_due()` (tests, a cron)."""
        if self.scheduler is not None:
            self.scheduler.start()

    async def aclose(self) -> None:
        """Stops the report scheduler (after the report it is running, if any), then
        closes the report store; idempotent."""
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self._reports is not None:
            self._reports.close()
            self._reports = None

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Any
    ) -> pb.GetMetricsResponse:
        scope = convert.scope(principal(), request.tenant_id)
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        filters = convert.filters(
            request.filter.event_name, request.filter.event_type, request.filter.ticketed_event_id
        )
        group_by = convert.group_by(request.group_by)
        try:
            return await asyncio.to_thread(
                self._compute, list(request.metrics), scope, window, granularity, filters, group_by
            )
        except rollups.RollupDimensionError as error:
            # The request is well formed; the data it needs only exists as rollups.
            raise AnalyticsError(
                StatusCode.FAILED_PRECONDITION, "INVALID_REQUEST", str(error)
            ) from error
        except rollups.RollupRangeError as error:
            raise _invalid("time_range", error) from error

    def _event_counts(
        self,
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters,
        group_by: tuple[str, ...],
    ) -> tuple[metrics.GroupedEventCount, ...]:
        if self._reads is not None:
            return self._reads.grouped_event_counts_now(
                scope, window, granularity, group_by, filters
            )
        if set(group_by) <= {"event_name", "event_type"}:
            rows = self._metrics.event_counts(scope, window, granularity, filters)
            return metrics.regroup_event_counts(rows, group_by)
        # The other dimensions from the embedded store, which holds every raw event in
        # every shape (with Pinot, the processor fills both).
        return metrics.grouped_event_counts(
            self._store, scope, window, granularity, group_by, filters
        )

    def _compute(
        self,
        kinds: list[int],
        scope: metrics.Scope,
        window: metrics.TimeRange,
        granularity: metrics.Granularity,
        filters: metrics.MetricFilters,
        group_by: tuple[str, ...],
    ) -> pb.GetMetricsResponse:
        response = pb.GetMetricsResponse()
        for kind in kinds:
            if kind == pb.METRIC_KIND_EVENT_COUNT:
                points = [
                    (
                        row.bucket_start,
                        tuple(
                            (d, convert.dimension_value(d, v))
                            for d, v in zip(group_by, row.values, strict=True)
                        ),
                        row.events,
                    )
                    for row in self._event_counts(scope, window, granularity, filters, group_by)
                ]
                series = metric_pb2.MetricSeries(
                    metric_name="event_count",
                    metric_type=_COUNT,
                    unit="1",
                    calculation_method="count(*)",
                )
                # By bucket, then the dimension values as shown (enum names).
                for bucket, key, value in sorted(points):
                    series.points.append(_point(bucket, value, **dict(key)))
            elif kind == pb.METRIC_KIND_ACTIVE_USERS:
                active = self._metrics.active_users(scope, window, granularity, filters)
                series = metric_pb2.MetricSeries(
                    metric_name="active_users",
                    metric_type=_GAUGE,
                    unit="1",
                    calculation_method="count(distinct coalesce(user_id, anonymous_id))",
                    points=[_point(r.bucket_start, r.active_users) for r in active.buckets],
                )
            elif kind == pb.METRIC_KIND_CONVERSIONS:
                rows = self._metrics.conversions(scope, window, granularity, filters)
                series = metric_pb2.MetricSeries(
                    metric_name="conversions",
                    metric_type=_COUNT,
                    unit="1",
                    calculation_method="count(*) where event_type = conversion",
                    points=[_point(r.bucket_start, r.conversions) for r in rows],
                )
            else:
                revenue_rows = self._metrics.revenue(scope, window, granularity, filters)
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

    # --- analyses ----------------------------------------------------------------------

    async def ComputeFunnel(
        self, request: pb.ComputeFunnelRequest, context: Any
    ) -> pb.ComputeFunnelResponse:
        scope = convert.scope(principal(), request.tenant_id)
        window = convert.time_range(request.time_range)
        spec = convert.funnel_spec(request)
        result = await asyncio.to_thread(funnels.compute_funnel, self._store, scope, window, spec)
        return convert.funnel_response(result)

    async def ComputeCohorts(
        self, request: pb.ComputeCohortsRequest, context: Any
    ) -> pb.ComputeCohortsResponse:
        scope = convert.scope(principal(), request.tenant_id)
        window = convert.time_range(request.time_range)
        spec = convert.cohort_spec(request)
        try:
            rows = await asyncio.to_thread(
                cohorts.compute_cohorts, self._store, scope, window, spec
            )
        except ValueError as error:  # e.g. a daily matrix over decades
            raise _invalid("time_range", error) from error
        return convert.cohorts_response(rows)

    async def GetSessionAnalytics(
        self, request: pb.GetSessionAnalyticsRequest, context: Any
    ) -> pb.GetSessionAnalyticsResponse:
        scope = convert.scope(principal(), request.tenant_id)
        window = convert.time_range(request.time_range)
        granularity = convert.granularity(request.granularity, window)
        timeout = convert.session_timeout(request.session_timeout_seconds)
        stats = await asyncio.to_thread(
            sessions.session_analytics, self._store, scope, window, granularity, timeout
        )
        return convert.sessions_response(stats)

    async def GetUserAnalytics(
        self, request: pb.GetUserAnalyticsRequest, context: Any
    ) -> pb.GetUserAnalyticsResponse:
        scope = convert.scope(principal(), request.tenant_id)
        if scope.tenant_id is None:
            raise invalid_request(
                [FieldViolation("tenant_id", "user ids belong to a tenant: name the tenant")]
            )
        timeout = convert.session_timeout(request.session_timeout_seconds)
        try:
            user = await asyncio.to_thread(
                users.user_analytics, self._store, scope, request.user_id, timeout
            )
        except users.UserNotFoundError as error:
            raise not_found(f"user {request.user_id!r}") from error
        return convert.user_response(user)

    async def GetTicketedEventAnalytics(
        self, request: pb.GetTicketedEventAnalyticsRequest, context: Any
    ) -> pb.GetTicketedEventAnalyticsResponse:
        scope = convert.scope(principal(), request.tenant_id)
        window = convert.optional_time_range(
            request.time_range, request.HasField("time_range"), self._clock()
        )
        granularity = convert.granularity(request.granularity, window)
        try:
            result = await asyncio.to_thread(
                ticketed_events.ticketed_event_analytics,
                self._store,
                scope,
                request.ticketed_event_id,
                window,
                granularity,
            )
        except ticketed_events.TicketedEventNotFoundError as error:
            raise not_found(f"ticketed event {request.ticketed_event_id!r}") from error
        return convert.ticketed_event_response(result)

    async def ExecuteQuery(
        self, request: pb.ExecuteQueryRequest, context: Any
    ) -> pb.ExecuteQueryResponse:
        scope = convert.scope(principal(), request.tenant_id)
        options = convert.query_options(request, _seconds_left(context))
        result = await asyncio.to_thread(
            sql_sandbox.execute, self._store, scope, request.sql, options
        )
        return convert.query_response(result)

    # --- scheduled reports -------------------------------------------------------------

    def _owner(self) -> str:
        """The tenant a report belongs to: the credential's ("" = a platform admin
        without one, whose reports read every tenant)."""
        return convert.scope(principal(), "").tenant_id or ""

    def _report_store(self) -> reports.ReportStore:
        if self._reports is None:
            raise _reports_unavailable()
        return self._reports

    async def CreateReport(
        self, request: pb.CreateReportRequest, context: Any
    ) -> pb.CreateReportResponse:
        store = self._report_store()
        owner = self._owner()
        # Refuse a query that could never run now, not at its first run.
        await asyncio.to_thread(
            sql_sandbox.check, self._store, reports.scope_of(owner), request.report.sql
        )
        created = await asyncio.to_thread(
            store.create,
            owner,
            request.report.display_name,
            request.report.sql,
            convert.REPORT_SCHEDULES[request.report.schedule],
            self._clock(),
        )
        if self.scheduler is not None:
            self.scheduler.wake()  # the first run is due now
        return pb.CreateReportResponse(report=convert.report(created))

    async def GetReport(self, request: pb.GetReportRequest, context: Any) -> pb.GetReportResponse:
        found = await asyncio.to_thread(self._report_store().get, self._owner(), request.report_id)
        if found is None:
            raise not_found(f"report {request.report_id!r}")
        return pb.GetReportResponse(report=convert.report(found))

    async def ListReports(
        self, request: pb.ListReportsRequest, context: Any
    ) -> pb.ListReportsResponse:
        listed, token = await asyncio.to_thread(
            self._report_store().list_page, self._owner(), request.page_size, request.page_token
        )
        return pb.ListReportsResponse(
            reports=[convert.report(r) for r in listed], next_page_token=token
        )

    async def DeleteReport(
        self, request: pb.DeleteReportRequest, context: Any
    ) -> pb.DeleteReportResponse:
        deleted = await asyncio.to_thread(
            self._report_store().delete, self._owner(), request.report_id
        )
        if not deleted:
            raise not_found(f"report {request.report_id!r}")
        return pb.DeleteReportResponse()


def _seconds_left(context: Any) -> float | None:
    """What is left of the caller's gRPC deadline, if they set one."""
    remaining = getattr(context, "time_remaining", None)
    return remaining() if callable(remaining) else None
