"""Shared test fixtures: free ports and event builders."""

from __future__ import annotations

import itertools
import os
import random
import socket
from datetime import UTC, datetime, timedelta

from bilten.analytics.type.v1 import tracked_event_pb2 as te
from google.protobuf import struct_pb2, timestamp_pb2
from google.type import money_pb2

# Ports the kernel hands out itself (bind to 0, outgoing connections) come from the
# ephemeral range (32768-60999 here), so a port picked that way can be taken by a Kafka or
# HTTP client before the server under test binds it ("Address already in use"). Servers
# get ports below that range instead, from a slice of its own per xdist worker so that two
# workers never pick the same one.
_PORT_RANGE = (15_000, 32_000)
_WORKER_SLOTS = 4


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0) % _WORKER_SLOTS


def _candidate_ports() -> itertools.cycle[int]:
    low, high = _PORT_RANGE
    width = (high - low) // _WORKER_SLOTS
    start = low + _worker_index() * width
    ports = list(range(start, start + width))
    random.Random(os.getpid()).shuffle(ports)
    return itertools.cycle(ports)


_candidates = _candidate_ports()


def free_port() -> int:
    """A port nothing listens on, outside the ephemeral range, not given out before by
    this process (the cycle covers thousands of ports before it repeats one)."""
    for _ in range(1_000):
        port = next(_candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


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
