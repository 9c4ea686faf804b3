"""Shared test fixtures: free ports and event builders."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

from bilten.analytics.type.v1 import tracked_event_pb2 as te
from google.protobuf import struct_pb2, timestamp_pb2
from google.type import money_pb2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def tracked_event(
    name: str = "ticket_viewed",
    *,
    event_type: int = te.TRACKED_EVENT_TYPE_TRACK,
    user_id: str = "u1",
    event_id: str = "",
    ago: timedelta = timedelta(minutes=5),
    revenue: tuple[str, int, int] | None = None,
    quantity: int = 0,
    ip: str = "",
    ticketed_event_id: str = "",
    properties: dict[str, object] | None = None,
) -> te.TrackedEvent:
    event = te.TrackedEvent(
        event_id=event_id,
        event_type=event_type,
        event_name=name,
        user_id=user_id,
        occurred_at=ts(datetime.now(UTC) - ago),
    )
    if revenue is not None:
        currency, units, nanos = revenue
        event.ticketing.revenue.CopyFrom(
            money_pb2.Money(currency_code=currency, units=units, nanos=nanos)
        )
    if quantity:
        event.ticketing.quantity = quantity
    if ticketed_event_id:
        event.ticketing.ticketed_event_id = ticketed_event_id
    if ip:
        event.client.ip_address = ip
    if properties:
        struct = struct_pb2.Struct()
        struct.update(properties)
        event.properties.CopyFrom(struct)
    return event
