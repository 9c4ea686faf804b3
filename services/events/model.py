"""The tracked event: one analytics record, as the platform stores it.

Plain dataclasses, no gRPC: ingestion converts protos into these, the event log and
stores persist them, query and aggregation read them back as columns. A *tracked event*
(a page view, a purchase) is never confused with a *ticketed event* (the concert):
the latter only appears here as `ticketed_event_id`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal


class TrackedEventType(enum.StrEnum):
    """What kind of record this is; `track` is a named business event (`ticket_viewed`)."""

    TRACK = "track"
    PAGE_VIEW = "page_view"
    CLICK = "click"
    CONVERSION = "conversion"
    CUSTOM = "custom"


class EventSource(enum.StrEnum):
    """Where the event was produced."""

    WEB = "web"
    MOBILE = "mobile"
    SERVER = "server"
    API = "api"


@dataclass(frozen=True, slots=True)
class Enrichment:
    """What ingestion derives from the request; raw IPs and raw user agents are never kept."""

    ip_hash: str = ""  # keyed hash (HMAC-SHA256, hex, truncated) of the client IP
    country_code: str = ""  # ISO 3166-1 alpha-2, "" when unknown (private IPs, no IP)
    browser_family: str = ""
    browser_version: str = ""  # major version only: minimisation
    os_family: str = ""
    device_type: str = ""  # desktop | mobile | tablet | bot | other


@dataclass(frozen=True, slots=True)
class TrackedEvent:
    """One accepted tracked event, after validation and enrichment.

    Times are timezone-aware UTC datetimes. `event_id` is the client-supplied id used for
    idempotent retries and deduplication (server-generated when the client sent none).
    `revenue` is in `currency` (ISO 4217); zero when the event carries no money.
    """

    tenant_id: str
    event_id: str
    event_type: TrackedEventType
    event_name: str
    occurred_at: datetime
    received_at: datetime
    source: EventSource = EventSource.API
    session_id: str = ""
    user_id: str = ""
    anonymous_id: str = ""
    page_url: str = ""
    page_title: str = ""
    referrer: str = ""
    ticketed_event_id: str = ""
    campaign_id: str = ""
    order_id: str = ""
    revenue: Decimal = Decimal(0)
    currency: str = ""
    quantity: int = 0  # tickets in a conversion
    properties_json: str = "{}"  # custom properties, JSON object text
    schema_id: int = 0  # registry id of the event definition the properties were checked against
    enrichment: Enrichment = field(default_factory=Enrichment)
