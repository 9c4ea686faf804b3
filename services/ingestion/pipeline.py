"""The ingestion pipeline, free of gRPC.

shape violations (from the validation layer) → implied type → size → timestamps →
business rules → enrichment → dedup → rate limit (whole call) → durable append →
quarantine of the rejected. Every event gets an outcome; nothing is dropped silently.
"""

from __future__ import annotations

import enum
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Protocol

import orjson

from services.events.model import EventSource, TrackedEvent, TrackedEventType
from services.ingestion.dedup import DedupWindow
from services.ingestion.definitions import EventDefinition, EventDefinitions, check_properties
from services.ingestion.enrichment import Enricher
from services.ingestion.rate_limit import RateLimiter
from services.platform.errors import FieldViolation, rate_limited
from services.storage.metadata_store import QuarantineEntry

MAX_EVENT_BYTES = 32 * 1024
MAX_PROPERTIES_BYTES = 16 * 1024
MAX_PROPERTY_KEYS = 200
# Revenue as the stores hold it: DECIMAL(18,6) in DuckDB (services/storage/event_store.py),
# micro-units below 10^18 in the Kafka envelope and Pinot. A value they cannot hold would
# fail the whole batch's append (or land in the dead-letter topic), so it is refused here,
# per event, instead of rounded: revenue is money.
REVENUE_DECIMAL_PLACES = 6
MAX_REVENUE = Decimal(10) ** (18 - REVENUE_DECIMAL_PLACES) - Decimal(1).scaleb(
    -REVENUE_DECIMAL_PLACES
)
_REVENUE_QUANTUM = Decimal(1).scaleb(-REVENUE_DECIMAL_PLACES)


class IngestStatus(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class RejectionReason(enum.Enum):
    """Mirrors `bilten.analytics.ingestion.v1.RejectionReason` (names without prefix)."""

    INVALID_FIELD = "INVALID_FIELD"
    TIMESTAMP_IN_FUTURE = "TIMESTAMP_IN_FUTURE"
    TIMESTAMP_TOO_OLD = "TIMESTAMP_TOO_OLD"
    TOO_LARGE = "TOO_LARGE"
    SCHEMA_VIOLATION = "SCHEMA_VIOLATION"
    UNKNOWN_EVENT_DEFINITION = "UNKNOWN_EVENT_DEFINITION"
    BUSINESS_RULE = "BUSINESS_RULE"
    CONSENT_MISSING = "CONSENT_MISSING"
    EVENT_TYPE_MISMATCH = "EVENT_TYPE_MISMATCH"


@dataclass(slots=True)
class IncomingEvent:
    """A submitted event after decoding, before any check. Empty strings mean unset."""

    event_id: str
    event_type: TrackedEventType | None  # None: unspecified
    event_name: str
    occurred_at: datetime | None
    session_id: str = ""
    user_id: str = ""
    anonymous_id: str = ""
    page_url: str = ""
    page_title: str = ""
    referrer: str = ""
    ticketed_event_id: str = ""
    campaign_id: str = ""
    order_id: str = ""
    quantity: int = 0
    revenue: Decimal | None = None
    currency: str = ""
    source: EventSource = EventSource.API
    user_agent: str = ""
    ip_address: str = ""
    properties_json: str = "{}"
    property_count: int = 0
    definition_version: int = 0
    serialized_size: int = 0
    # Renders the event as received (canonical proto JSON) for the quarantine; only
    # called for rejected events, because rendering costs more than the whole pipeline.
    render_original: Callable[[], str] = field(default=lambda: "{}")


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    event_id: str
    status: IngestStatus
    rejection_reason: RejectionReason | None = None
    field_path: str = ""
    message: str = ""
    quarantined_event_id: str = ""


class EventLog(Protocol):
    async def append(self, events: Sequence[TrackedEvent]) -> None: ...


class QuarantineSink(Protocol):
    async def quarantine(self, entries: Sequence[QuarantineEntry]) -> None: ...


class ConsentCheck(Protocol):
    """Whether an event of these subject ids may be stored for analytics (the
    compliance service's `ConsentRegistry`); synchronous and in memory, it runs per event."""

    def allows_analytics(self, tenant_id: str, user_id: str, anonymous_id: str) -> bool: ...

    async def refresh(self) -> None:
        """Awaited once per batch before the checks: catches up with decisions recorded by
        other processes (a shared metadata store), so a withdrawal applies to every batch
        that arrives after it was recorded."""


@dataclass(frozen=True)
class PipelineLimits:
    dedup_window_seconds: float = 86_400
    max_future_skew_seconds: float = 600
    raw_retention_days: int = 7


@dataclass(frozen=True, slots=True)
class _Window:
    """The accepted `occurred_at` range of one batch: (received_at + future skew,
    received_at - raw retention)."""

    latest: datetime
    earliest: datetime


_ZERO = Decimal(0)


def _item_path(field_prefix: str, index: int) -> str:
    # Batches name items `events[i]`; single-event calls name the item `event`.
    return field_prefix if field_prefix == "event" else f"{field_prefix}[{index}]"


class _Rejected(Exception):
    def __init__(self, reason: RejectionReason, field_path: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.field_path = field_path
        self.message = message


class IngestionPipeline:
    def __init__(
        self,
        limits: PipelineLimits,
        enricher: Enricher,
        dedup: DedupWindow,
        rate_limiter: RateLimiter,
        event_log: EventLog,
        quarantine: QuarantineSink,
        definitions: EventDefinitions | None = None,
        clock: Callable[[], float] = time.time,
        consent: ConsentCheck | None = None,
        # Told about each durable batch (live metrics, rollups, result cache; see
        # services/live/observers.py). It must return quickly and never raise.
        on_accepted: Callable[[Sequence[TrackedEvent]], None] | None = None,
    ) -> None:
        self._limits = limits
        self._enricher = enricher
        self._dedup = dedup
        self._rate_limiter = rate_limiter
        self._event_log = event_log
        self._quarantine = quarantine
        self._definitions = definitions
        self._clock = clock
        self._consent = consent
        self._on_accepted = on_accepted

    async def ingest(
        self,
        tenant_id: str,
        rate_limit_key: str,
        events: Sequence[IncomingEvent],
        field_prefix: str,
        item_violations: dict[int, list[FieldViolation]] | None = None,
        implied_type: TrackedEventType | None = None,
    ) -> list[IngestOutcome]:
        """Processes a batch; returns one outcome per event, in order.

        Raises `AnalyticsError` (nothing acknowledged) when the rate limit is exhausted
        or the event log cannot take the batch.
        """
        now = self._clock()
        # Awaited: the limiter may be the Redis one shared by the replicas; it answers
        # from its in-process bucket when Redis fails (services/ingestion/rate_limit.py).
        wait = await self._rate_limiter.acquire(rate_limit_key, len(events), now)
        if wait > 0:
            raise rate_limited(wait)
        received_at = datetime.fromtimestamp(now, UTC)
        if self._consent is not None:
            await self._consent.refresh()
        violations = item_violations or {}
        definitions = await self._resolve_definitions(tenant_id, events, implied_type)
        outcomes: list[IngestOutcome | None] = [None] * len(events)
        accepted: list[TrackedEvent] = []
        accepted_index: list[int] = []
        reserved: list[tuple[str, str]] = []
        rejected: list[tuple[int, _Rejected]] = []
        # Per batch, not per event: the time window (exactly the per-event comparisons
        # `occurred_at - received_at > skew` and `received_at - occurred_at > retention`),
        # and 128 random bits per id-less event (uuid4's entropy without its object) from
        # one urandom call per batch instead of one system call per event.
        window = _Window(
            received_at + timedelta(seconds=self._limits.max_future_skew_seconds),
            received_at - timedelta(days=self._limits.raw_retention_days),
        )
        missing_ids = sum(1 for incoming in events if not incoming.event_id)
        random_hex = os.urandom(16 * missing_ids).hex() if missing_ids else ""
        next_random = 0
        dedup = self._dedup
        duplicate, accepted_status = IngestStatus.DUPLICATE, IngestStatus.ACCEPTED
        for index, incoming in enumerate(events):
            client_id = incoming.event_id
            if client_id:
                event_id = client_id
            else:
                event_id = random_hex[next_random : next_random + 32]
                next_random += 32
            try:
                if index in violations:
                    first = violations[index][0]
                    raise _Rejected(
                        RejectionReason.INVALID_FIELD,
                        first.field,
                        "; ".join(f"{v.field}: {v.description}" for v in violations[index]),
                    )
                try:
                    event = self._check(
                        tenant_id,
                        event_id,
                        incoming,
                        received_at,
                        window,
                        implied_type,
                        definitions,
                    )
                except _Rejected as relative:
                    relative.field_path = _item_path(field_prefix, index) + relative.field_path
                    raise
            except _Rejected as caught:
                rejected.append((index, caught))
                outcomes[index] = IngestOutcome(event_id, IngestStatus.REJECTED)  # filled below
                continue
            if client_id:
                if dedup.is_duplicate(tenant_id, event_id, now):
                    outcomes[index] = IngestOutcome(event_id, duplicate)
                    continue
                dedup.reserve(tenant_id, event_id)
                reserved.append((tenant_id, event_id))
            accepted.append(event)
            accepted_index.append(index)
        if accepted:
            try:
                await self._event_log.append(accepted)
            except BaseException:
                self._dedup.release(reserved)
                raise
            self._dedup.confirm(reserved, now)
            if self._on_accepted is not None:
                self._on_accepted(accepted)
            for index, event in zip(accepted_index, accepted, strict=True):
                outcomes[index] = IngestOutcome(event.event_id, accepted_status)
        if rejected:
            entries = []
            for index, rejection in rejected:
                quarantine_id = uuid.uuid4().hex
                entries.append(
                    QuarantineEntry(
                        quarantine_id,
                        tenant_id,
                        received_at,
                        rejection.reason.value,
                        rejection.field_path,
                        rejection.message,
                        events[index].render_original(),
                    )
                )
                previous = outcomes[index]
                assert previous is not None
                outcomes[index] = IngestOutcome(
                    previous.event_id,
                    IngestStatus.REJECTED,
                    rejection.reason,
                    rejection.field_path,
                    rejection.message,
                    quarantine_id,
                )
            await self._quarantine.quarantine(entries)
        return [outcome for outcome in outcomes if outcome is not None]

    async def _resolve_definitions(
        self,
        tenant_id: str,
        events: Sequence[IncomingEvent],
        implied_type: TrackedEventType | None,
    ) -> dict[tuple[str, int], EventDefinition | None]:
        """Looks up, once per batch, the definitions its custom events need."""
        wanted = {
            (e.event_name, e.definition_version)
            for e in events
            if (e.event_type or implied_type) is TrackedEventType.CUSTOM
        }
        if not wanted or self._definitions is None:
            return dict.fromkeys(wanted)
        return {key: await self._definitions.lookup(tenant_id, key[0], key[1]) for key in wanted}

    def _check(
        self,
        tenant_id: str,
        event_id: str,
        incoming: IncomingEvent,
        received_at: datetime,
        window: _Window,
        implied_type: TrackedEventType | None,
        definitions: dict[tuple[str, int], EventDefinition | None],
    ) -> TrackedEvent:
        """The checks of one event. A rejection's `field_path` is relative to the item
        (`""`, `".occurred_at"`): the caller prefixes the item's path, so it is built
        only for rejected events."""
        event_type = incoming.event_type
        if implied_type is not None:
            if event_type is None:
                event_type = implied_type
            elif event_type != implied_type and not (
                implied_type is TrackedEventType.TRACK and event_type is TrackedEventType.CLICK
            ):
                raise _Rejected(
                    RejectionReason.EVENT_TYPE_MISMATCH,
                    ".event_type",
                    f"this call takes {implied_type.value} events, got {event_type.value}",
                )
        if event_type is None:
            raise _Rejected(RejectionReason.INVALID_FIELD, ".event_type", "event_type is required")
        if incoming.serialized_size > MAX_EVENT_BYTES:
            raise _Rejected(
                RejectionReason.TOO_LARGE,
                "",
                f"event is {incoming.serialized_size} bytes; the limit is {MAX_EVENT_BYTES}",
            )
        if len(incoming.properties_json) > MAX_PROPERTIES_BYTES:
            raise _Rejected(
                RejectionReason.TOO_LARGE,
                ".properties",
                f"properties are {len(incoming.properties_json)} bytes as JSON; "
                f"the limit is {MAX_PROPERTIES_BYTES}",
            )
        if incoming.property_count > MAX_PROPERTY_KEYS:
            raise _Rejected(
                RejectionReason.TOO_LARGE,
                ".properties",
                f"{incoming.property_count} properties; the limit is {MAX_PROPERTY_KEYS}",
            )
        occurred_at = incoming.occurred_at or received_at
        if occurred_at > window.latest:
            raise _Rejected(
                RejectionReason.TIMESTAMP_IN_FUTURE,
                ".occurred_at",
                f"occurred_at is more than {self._limits.max_future_skew_seconds:.0f} s "
                "ahead of the server clock",
            )
        if occurred_at < window.earliest:
            raise _Rejected(
                RejectionReason.TIMESTAMP_TOO_OLD,
                ".occurred_at",
                f"occurred_at is older than the raw retention of "
                f"{self._limits.raw_retention_days} days",
            )
        revenue = incoming.revenue
        if revenue is None:
            revenue = _ZERO
            currency = ""
        else:
            currency = incoming.currency
            if revenue < 0:
                raise _Rejected(
                    RejectionReason.BUSINESS_RULE,
                    ".ticketing.revenue",
                    "revenue must not be negative",
                )
            # Money is units + nanos: too large a value is in `units`, digits past the
            # sixth decimal place are in `nanos`.
            if revenue > MAX_REVENUE:
                raise _Rejected(
                    RejectionReason.INVALID_FIELD,
                    ".ticketing.revenue.units",
                    f"revenue must be at most {MAX_REVENUE}",
                )
            if revenue != revenue.quantize(_REVENUE_QUANTUM):
                raise _Rejected(
                    RejectionReason.INVALID_FIELD,
                    ".ticketing.revenue.nanos",
                    f"revenue has more than {REVENUE_DECIMAL_PLACES} decimal places "
                    "(nanos must be a multiple of 1000)",
                )
            if len(incoming.currency) != 3 or not incoming.currency.isupper():
                raise _Rejected(
                    RejectionReason.BUSINESS_RULE,
                    ".ticketing.revenue.currency_code",
                    "revenue needs an ISO 4217 currency code such as EUR",
                )
        if event_type is TrackedEventType.CONVERSION and revenue == 0 and incoming.quantity == 0:
            raise _Rejected(
                RejectionReason.BUSINESS_RULE,
                ".ticketing",
                "a conversion needs a revenue or a ticket quantity",
            )
        schema_id = 0
        if event_type is TrackedEventType.CUSTOM:
            definition = definitions.get((incoming.event_name, incoming.definition_version))
            if definition is None:
                version = incoming.definition_version
                raise _Rejected(
                    RejectionReason.UNKNOWN_EVENT_DEFINITION,
                    ".event_name",
                    f"no event definition {incoming.event_name!r}"
                    + (f" version {version}" if version else "")
                    + " is registered for this tenant or the platform",
                )
            violation = check_properties(definition, orjson.loads(incoming.properties_json))
            if violation is not None:
                raise _Rejected(RejectionReason.SCHEMA_VIOLATION, f".{violation[0]}", violation[1])
            schema_id = definition.schema_id
        if self._consent is not None and not self._consent.allows_analytics(
            tenant_id, incoming.user_id, incoming.anonymous_id
        ):
            raise _Rejected(
                RejectionReason.CONSENT_MISSING,
                "",
                "the subject has not consented to analytics (withdrawn, or required and "
                "never granted)",
            )
        # Positional, in `TrackedEvent`'s field order (cheaper than keywords).
        return TrackedEvent(
            tenant_id,
            event_id,
            event_type,
            incoming.event_name,
            occurred_at,
            received_at,
            incoming.source,
            incoming.session_id,
            incoming.user_id,
            incoming.anonymous_id,
            incoming.page_url,
            incoming.page_title,
            incoming.referrer,
            incoming.ticketed_event_id,
            incoming.campaign_id,
            incoming.order_id,
            revenue,
            currency,
            incoming.quantity,
            incoming.properties_json,
            schema_id,
            self._enricher.enrich(incoming.ip_address, incoming.user_agent),
        )
