"""Which stream a WebSocket path opens, and where its credential comes from. No I/O.

Credentials, first found wins (the same tokens and API keys as every RPC):
1. `Authorization: Bearer <token>` header (non-browser clients);
2. subprotocol `bearer.<token>` offered next to `bilten.analytics.v1` (browsers cannot
   set headers on a WebSocket; the server answers with `bilten.analytics.v1` and
   never echoes the token);
3. query parameter `token=<token>` (last resort: URLs end up in logs and histories).
Platform admins choose a tenant with `tenant_id=<id>` (or `tenantId`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

from bilten.analytics.aggregation.v1 import aggregation_service_pb2 as pb
from google.protobuf.message import Message

PROTOCOL = "bilten.analytics.v1"
BEARER_PREFIX = "bearer."
_SERVICE = "/bilten.analytics.aggregation.v1.AggregationService/"
_TICKETED = re.compile(r"^/ws/analytics/events/([^/]{1,64})$")

StreamKind = Literal["metrics", "alerts"]


@dataclass(frozen=True, slots=True)
class Route:
    method: str  # full gRPC method name
    request: Message
    response_type: type[Message]
    kind: StreamKind  # metrics: every message is a full state (drop-to-latest)
    message_type: str  # the `type` of the frames: metric_update | alert_triggered


def route(path: str) -> Route | None:
    """The stream of a request path (with its query string), or None when unknown."""
    parts = urlsplit(path)
    query = {k: v[0] for k, v in parse_qs(parts.query).items() if v}
    tenant_id = query.get("tenant_id") or query.get("tenantId") or ""
    if parts.path == "/ws/analytics/live":
        return Route(
            _SERVICE + "StreamLiveMetrics",
            pb.StreamLiveMetricsRequest(tenant_id=tenant_id),
            pb.StreamLiveMetricsResponse,
            "metrics",
            "metric_update",
        )
    if parts.path == "/ws/analytics/alerts":
        return Route(
            _SERVICE + "StreamAlerts",
            pb.StreamAlertsRequest(tenant_id=tenant_id),
            pb.StreamAlertsResponse,
            "alerts",
            "alert_triggered",
        )
    match = _TICKETED.match(parts.path)
    if match:
        return Route(
            _SERVICE + "StreamTicketedEventLiveMetrics",
            pb.StreamTicketedEventLiveMetricsRequest(
                tenant_id=tenant_id, ticketed_event_id=unquote(match.group(1))
            ),
            pb.StreamTicketedEventLiveMetricsResponse,
            "metrics",
            "metric_update",
        )
    return None


def credential(path: str, headers: Mapping[str, str], subprotocols: list[str]) -> str:
    """The credential of a handshake (see the module docstring); "" when none."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for offered in subprotocols:
        if offered.startswith(BEARER_PREFIX) and len(offered) > len(BEARER_PREFIX):
            return offered[len(BEARER_PREFIX) :]
    tokens = parse_qs(urlsplit(path).query).get("token")
    return tokens[0] if tokens else ""


# gRPC status -> WebSocket close code: 4000 + the HTTP status Envoy would have used.
CLOSE_CODES = {
    "INVALID_ARGUMENT": 4400,
    "UNAUTHENTICATED": 4401,
    "PERMISSION_DENIED": 4403,
    "NOT_FOUND": 4404,
    "RESOURCE_EXHAUSTED": 4429,
    "UNIMPLEMENTED": 4501,
    "UNAVAILABLE": 4503,
}


def close_code(status_name: str) -> int:
    return CLOSE_CODES.get(status_name, 4500)
