"""Proto ↔ domain conversion shared by the query and aggregation servicers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from bilten.analytics.type.v1 import time_range_pb2, tracked_event_pb2
from google.protobuf import timestamp_pb2
from google.type import money_pb2

from services.events.model import TrackedEventType
from services.platform.auth import Principal
from services.platform.errors import FieldViolation, invalid_request, tenant_mismatch
from services.query import metrics

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
