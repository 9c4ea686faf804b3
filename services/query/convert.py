"""Proto ↔ domain conversion shared by the query and aggregation servicers."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from bilten.analytics.query.v1 import query_service_pb2 as query_pb
from bilten.analytics.type.v1 import metric_pb2, time_range_pb2, tracked_event_pb2
from google.protobuf import struct_pb2, timestamp_pb2
from google.type import money_pb2

from services.events.model import EventSource, TrackedEventType
from services.platform.auth import Principal
from services.platform.errors import FieldViolation, invalid_request, tenant_mismatch
from services.query import (
    cohorts,
    funnels,
    metrics,
    reports,
    sessions,
    sql_sandbox,
    ticketed_events,
    users,
)

_GRANULARITIES = {
    time_range_pb2.GRANULARITY_UNSPECIFIED: metrics.Granularity.DAY,
    time_range_pb2.GRANULARITY_MINUTE: metrics.Granularity.MINUTE,
    time_range_pb2.GRANULARITY_HOUR: metrics.Granularity.HOUR,
    time_range_pb2.GRANULARITY_DAY: metrics.Granularity.DAY,
    time_range_pb2.GRANULARITY_WEEK: metrics.Granularity.WEEK,
    time_range_pb2.GRANULARITY_MONTH: metrics.Granularity.MONTH,
}
_EVENT_TYPES = {
    tracked_event_pb2.TRACKED_EVENT_TYPE_TRACK: TrackedEventType.TRACK,
    tracked_event_pb2.TRACKED_EVENT_TYPE_PAGE_VIEW: TrackedEventType.PAGE_VIEW,
    tracked_event_pb2.TRACKED_EVENT_TYPE_CLICK: TrackedEventType.CLICK,
    tracked_event_pb2.TRACKED_EVENT_TYPE_CONVERSION: TrackedEventType.CONVERSION,
    tracked_event_pb2.TRACKED_EVENT_TYPE_CUSTOM: TrackedEventType.CUSTOM,
}
EVENT_TYPE_NAMES = {v: tracked_event_pb2.TrackedEventType.Name(k) for k, v in _EVENT_TYPES.items()}
# Stored `source` values -> their proto enum names (as event types are shown).
SOURCE_NAMES = {
    EventSource.WEB.value: tracked_event_pb2.EventSource.Name(tracked_event_pb2.EVENT_SOURCE_WEB),
    EventSource.MOBILE.value: tracked_event_pb2.EventSource.Name(
        tracked_event_pb2.EVENT_SOURCE_MOBILE
    ),
    EventSource.SERVER.value: tracked_event_pb2.EventSource.Name(
        tracked_event_pb2.EVENT_SOURCE_SERVER
    ),
    EventSource.API.value: tracked_event_pb2.EventSource.Name(tracked_event_pb2.EVENT_SOURCE_API),
}
# GetMetrics group_by -> the column it groups by, which is also the point's dimension key.
GROUP_BY_COLUMNS = {
    query_pb.DIMENSION_EVENT_NAME: "event_name",
    query_pb.DIMENSION_EVENT_TYPE: "event_type",
    query_pb.DIMENSION_COUNTRY: "country_code",
    query_pb.DIMENSION_TICKETED_EVENT: "ticketed_event_id",
    query_pb.DIMENSION_SOURCE: "source",
}


def group_by(values: Sequence[int]) -> tuple[str, ...]:
    """The columns to group by, in request order; a repeated dimension counts once."""
    columns = [GROUP_BY_COLUMNS.get(query_pb.Dimension.ValueType(v)) for v in values]
    if None in columns:  # the edge's validation refuses these first
        raise invalid_request([FieldViolation("group_by", "an unknown dimension")])
    return tuple(dict.fromkeys(c for c in columns if c is not None))


def dimension_value(column: str, value: str) -> str:
    """A grouped value as GetMetrics shows it: enums by their proto names."""
    if column == "event_type":
        return EVENT_TYPE_NAMES[TrackedEventType(value)]
    if column == "source":
        return SOURCE_NAMES.get(value, value)
    return value


# Bucket limit per request: keeps a minute-granularity year from building 500k rows.
MAX_BUCKETS = 10_000


def scope(caller: Principal, requested_tenant_id: str) -> metrics.Scope:
    """The tenant comes from the credential; only platform admins may choose one."""
    if caller.is_platform_admin:
        if requested_tenant_id:
            return metrics.Scope.tenant(requested_tenant_id)
        if caller.tenant_id:
            return metrics.Scope.tenant(caller.tenant_id)
        return metrics.Scope.all_tenants()
    if requested_tenant_id and requested_tenant_id != caller.tenant_id:
        raise tenant_mismatch()
    return metrics.Scope.tenant(caller.tenant_id)


def time_range(value: time_range_pb2.TimeRange) -> metrics.TimeRange:
    # Shape (presence, order) is checked by the validation layer.
    return metrics.TimeRange(
        value.start_time.ToDatetime(tzinfo=UTC), value.end_time.ToDatetime(tzinfo=UTC)
    )


def granularity(value: int, window: metrics.TimeRange) -> metrics.Granularity:
    chosen = _GRANULARITIES[time_range_pb2.Granularity.ValueType(value)]
    seconds = {
        metrics.Granularity.MINUTE: 60,
        metrics.Granularity.HOUR: 3600,
        metrics.Granularity.DAY: 86_400,
        metrics.Granularity.WEEK: 7 * 86_400,
        metrics.Granularity.MONTH: 28 * 86_400,
    }[chosen]
    buckets = (window.end - window.start).total_seconds() / seconds
    if buckets > MAX_BUCKETS:
        raise invalid_request(
            [
                FieldViolation(
                    "granularity",
                    f"{buckets:.0f} buckets requested; at most {MAX_BUCKETS}: "
                    "choose a coarser granularity or a shorter range",
                )
            ]
        )
    return chosen


def filters(
    event_name: str = "", event_type: int = 0, ticketed_event_id: str = ""
) -> metrics.MetricFilters:
    return metrics.MetricFilters(
        event_name=event_name or None,
        event_type=_EVENT_TYPES.get(tracked_event_pb2.TrackedEventType.ValueType(event_type)),
        ticketed_event_id=ticketed_event_id or None,
    )


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def money(currency: str, amount: Decimal) -> money_pb2.Money:
    """google.type.Money: units plus nanos with the same sign."""
    units = int(amount)
    nanos = int((amount - units) * 1_000_000_000)
    return money_pb2.Money(currency_code=currency, units=units, nanos=nanos)


# --- analyses (issue #5): requests to domain specs, results to responses ----------------

DEFAULT_TICKETED_EVENT_RANGE = timedelta(days=30)
_FUNNEL_ORDERS = {
    query_pb.FUNNEL_ORDER_UNSPECIFIED: funnels.FunnelOrder.ORDERED,
    query_pb.FUNNEL_ORDER_ORDERED: funnels.FunnelOrder.ORDERED,
    query_pb.FUNNEL_ORDER_STRICT: funnels.FunnelOrder.STRICT,
    query_pb.FUNNEL_ORDER_ANY: funnels.FunnelOrder.ANY,
}
_COHORT_PERIODS = {
    time_range_pb2.GRANULARITY_UNSPECIFIED: metrics.Granularity.WEEK,
    time_range_pb2.GRANULARITY_DAY: metrics.Granularity.DAY,
    time_range_pb2.GRANULARITY_WEEK: metrics.Granularity.WEEK,
    time_range_pb2.GRANULARITY_MONTH: metrics.Granularity.MONTH,
}
REPORT_SCHEDULES = {
    query_pb.REPORT_SCHEDULE_HOURLY: reports.ReportSchedule.HOURLY,
    query_pb.REPORT_SCHEDULE_DAILY: reports.ReportSchedule.DAILY,
    query_pb.REPORT_SCHEDULE_WEEKLY: reports.ReportSchedule.WEEKLY,
}
_REPORT_SCHEDULE_VALUES = {v: k for k, v in REPORT_SCHEDULES.items()}


def _pairs(values: Any) -> tuple[tuple[str, str], ...]:
    """A proto map<string, string> as sorted pairs (specs compare and hash)."""
    return tuple(sorted(dict(values).items()))


def funnel_spec(request: query_pb.ComputeFunnelRequest) -> funnels.FunnelSpec:
    if request.steps:
        steps = tuple(
            funnels.FunnelStep(s.event_name, _pairs(s.property_equals)) for s in request.steps
        )
    else:
        steps = tuple(funnels.FunnelStep(name) for name in request.step_event_names)
    names = {s.event_name for s in steps}
    clash = sorted(names & set(request.exclusion_event_names))
    if clash:
        raise invalid_request(
            [
                FieldViolation(
                    "exclusion_event_names",
                    f"{', '.join(clash)} is a step; an exclusion must be another event",
                )
            ]
        )
    window = timedelta(seconds=request.conversion_window_seconds) or funnels.DEFAULT_WINDOW
    return funnels.FunnelSpec(
        steps=steps,
        window=window,
        order=_FUNNEL_ORDERS[query_pb.FunnelOrder.ValueType(request.order)],
        exclusion_event_names=tuple(request.exclusion_event_names),
        breakdown_property=request.breakdown_property or None,
    )


def funnel_response(result: funnels.FunnelResult) -> query_pb.ComputeFunnelResponse:
    return query_pb.ComputeFunnelResponse(
        breakdowns=[
            query_pb.FunnelBreakdown(
                breakdown_value=b.breakdown_value or "",
                steps=[
                    query_pb.FunnelStepResult(
                        step_index=s.step_index,
                        event_name=s.event_name,
                        user_count=s.users,
                        conversion_rate_from_start=s.conversion_rate_from_start,
                        conversion_rate_from_previous=s.conversion_rate_from_previous,
                        drop_off_rate=s.drop_off_rate,
                        median_seconds_from_start=s.median_seconds_from_start,
                    )
                    for s in b.steps
                ],
            )
            for b in result.breakdowns
        ]
    )


def cohort_spec(request: query_pb.ComputeCohortsRequest) -> cohorts.CohortSpec:
    # The validation layer refuses minute and hour periods.
    return cohorts.CohortSpec(
        cohort_event_name=request.cohort_event_name or None,
        return_event_name=request.return_event_name or None,
        period=_COHORT_PERIODS[time_range_pb2.Granularity.ValueType(request.period)],
        period_count=request.period_count or cohorts.DEFAULT_PERIOD_COUNT,
        property_equals=_pairs(request.property_equals),
    )


def cohorts_response(rows: Sequence[cohorts.CohortRow]) -> query_pb.ComputeCohortsResponse:
    return query_pb.ComputeCohortsResponse(
        cohorts=[
            query_pb.Cohort(
                cohort_start_time=timestamp(row.cohort_start),
                size=row.size,
                retained_counts=row.retained_counts,
                retention_rates=row.retention_rates,
            )
            for row in rows
        ]
    )


def session_timeout(seconds: int) -> timedelta:
    return timedelta(seconds=seconds) if seconds else sessions.DEFAULT_TIMEOUT


def _series(
    name: str, kind: int, unit: str, method: str, points: list[metric_pb2.MetricPoint]
) -> metric_pb2.MetricSeries:
    return metric_pb2.MetricSeries(
        metric_name=name,
        metric_type=kind,  # type: ignore[arg-type]
        unit=unit,
        calculation_method=method,
        points=points,
    )


def _point(bucket: datetime, value: float, **dimensions: str) -> metric_pb2.MetricPoint:
    return metric_pb2.MetricPoint(
        bucket_start_time=timestamp(bucket), dimensions=dimensions, value=value
    )


def sessions_response(stats: sessions.SessionStats) -> query_pb.GetSessionAnalyticsResponse:
    gauge, counter = metric_pb2.METRIC_TYPE_GAUGE, metric_pb2.METRIC_TYPE_COUNTER
    return query_pb.GetSessionAnalyticsResponse(
        series=[
            _series(
                "sessions",
                counter,
                "1",
                "sessions starting in the bucket (split after the inactivity timeout)",
                [_point(b.bucket_start, b.sessions) for b in stats.buckets],
            ),
            _series(
                "average_session_duration_seconds",
                gauge,
                "s",
                "mean of (last event - first event) of the sessions starting in the bucket",
                [_point(b.bucket_start, b.average_duration_seconds) for b in stats.buckets],
            ),
            _series(
                "bounce_rate",
                gauge,
                "1",
                "one-event sessions / sessions starting in the bucket",
                [_point(b.bucket_start, b.bounce_rate) for b in stats.buckets],
            ),
        ],
        session_count=stats.session_count,
        average_session_duration_seconds=stats.average_duration_seconds,
        median_session_duration_seconds=stats.median_duration_seconds,
    )


def user_response(user: users.UserAnalytics) -> query_pb.GetUserAnalyticsResponse:
    return query_pb.GetUserAnalyticsResponse(
        user_id=user.user_id,
        total_sessions=user.total_sessions,
        average_session_duration_seconds=user.average_session_duration_seconds,
        last_session_time=timestamp(user.last_session_start),
        device_types=user.device_types,
        browsers=user.browsers,
        page_view_count=user.page_views,
        ticketed_events_viewed_count=user.ticketed_events_viewed,
        tickets_purchased=user.tickets_purchased,
        total_spent=[money(m.currency, m.amount) for m in user.total_spent],
        average_order_values=[money(m.currency, m.amount) for m in user.average_order_values],
        preferred_categories=user.preferred_categories,
        hour_of_day_activity=user.hour_of_day_activity,
        day_of_week_activity=user.day_of_week_activity,
        funnel_position=user.funnel_position,
    )


def optional_time_range(
    value: time_range_pb2.TimeRange, has_value: bool, now: datetime
) -> metrics.TimeRange:
    """The request's range, or the `DEFAULT_TICKETED_EVENT_RANGE` before `now`."""
    if has_value:
        return time_range(value)
    return metrics.TimeRange(now - DEFAULT_TICKETED_EVENT_RANGE, now)


def _counted(values: Sequence[ticketed_events.CountedValue]) -> list[query_pb.CountedValue]:
    return [
        query_pb.CountedValue(value=v.value, event_count=v.events, user_count=v.users)
        for v in values
    ]


def ticketed_event_response(
    result: ticketed_events.TicketedEventAnalytics,
) -> query_pb.GetTicketedEventAnalyticsResponse:
    counter, gauge = metric_pb2.METRIC_TYPE_COUNTER, metric_pb2.METRIC_TYPE_GAUGE
    buckets = result.buckets
    return query_pb.GetTicketedEventAnalyticsResponse(
        ticketed_event_id=result.ticketed_event_id,
        view_count=result.views,
        unique_visitor_count=result.visitors,
        buyer_count=result.buyers,
        conversion_rate=result.conversion_rate,
        tickets_sold=result.tickets_sold,
        revenues=[money(m.currency, m.amount) for m in result.revenue],
        sales_velocity_tickets_per_hour=result.sales_velocity_tickets_per_hour,
        series=[
            _series(
                "views",
                counter,
                "1",
                "page views and ticket_viewed events of the ticketed event",
                [_point(b.bucket_start, b.views) for b in buckets],
            ),
            _series(
                "visitors",
                gauge,
                "1",
                "count(distinct coalesce(user_id, anonymous_id)) in the bucket",
                [_point(b.bucket_start, b.visitors) for b in buckets],
            ),
            _series(
                "tickets_sold",
                counter,
                "1",
                "sum(quantity) of conversion events",
                [_point(b.bucket_start, b.tickets_sold) for b in buckets],
            ),
            _series(
                "revenue",
                counter,
                "currency (see the currency dimension)",
                "sum(revenue) of conversion events, per currency",
                [
                    _point(b.bucket_start, float(m.amount), currency=m.currency)
                    for b in buckets
                    for m in b.revenue
                ],
            ),
        ],
        top_referrers=_counted(result.top_referrers),
        top_campaigns=_counted(result.top_campaigns),
        top_countries=_counted(result.top_countries),
    )


def query_options(
    request: query_pb.ExecuteQueryRequest, seconds_left: float | None
) -> sql_sandbox.QueryOptions:
    """Page size and deadline: the request's (or the defaults), never past the RPC's."""
    timeout = timedelta(milliseconds=request.timeout_ms) or sql_sandbox.DEFAULT_TIMEOUT
    if seconds_left is not None:
        timeout = min(timeout, timedelta(seconds=max(seconds_left, 0.001)))
    return sql_sandbox.QueryOptions(
        page_size=request.page_size or sql_sandbox.DEFAULT_PAGE_SIZE,
        page_token=request.page_token,
        timeout=timeout,
    )


def _columns(columns: Sequence[sql_sandbox.ResultColumn]) -> list[query_pb.Column]:
    return [query_pb.Column(name=c.name, type=c.sql_type) for c in columns]


def _rows(rows: Sequence[Sequence[Any]]) -> list[struct_pb2.ListValue]:
    out = []
    for row in rows:
        values = struct_pb2.ListValue()
        values.extend(list(row))
        out.append(values)
    return out


def query_response(result: sql_sandbox.QueryResult) -> query_pb.ExecuteQueryResponse:
    return query_pb.ExecuteQueryResponse(
        columns=_columns(result.columns),
        rows=_rows(result.rows),
        next_page_token=result.next_page_token,
    )


def report(value: reports.Report) -> query_pb.Report:
    out = query_pb.Report(
        report_id=value.report_id,
        display_name=value.display_name,
        sql=value.sql,
        schedule=_REPORT_SCHEDULE_VALUES[value.schedule],
        create_time=timestamp(value.create_time),
    )
    run = value.latest_run
    if run is not None:
        out.latest_run.CopyFrom(
            query_pb.ReportRun(
                finish_time=timestamp(run.finish_time),
                columns=_columns(run.columns),
                rows=_rows(run.rows),
                error_message=run.error_message,
            )
        )
    return out
