"""Unit tier: the ingestion pipeline's rules, with an in-memory event log and quarantine.

The in-memory sinks here are test doubles of the EventLog / QuarantineSink protocols;
the real group commit into DuckDB is exercised by the integration and e2e tiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.events.model import TrackedEvent, TrackedEventType
from services.ingestion.dedup import DedupWindow
from services.ingestion.enrichment import Enricher
from services.ingestion.pipeline import (
    IncomingEvent,
    IngestionPipeline,
    IngestStatus,
    PipelineLimits,
    RejectionReason,
)
from services.ingestion.rate_limit import TokenBucketLimiter
from services.platform.errors import AnalyticsError, FieldViolation, StatusCode
from services.storage.metadata_store import QuarantineEntry

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


class MemoryLog:
    def __init__(self) -> None:
        self.events: list[TrackedEvent] = []
        self.fail = False

    async def append(self, events: Sequence[TrackedEvent]) -> None:
        if self.fail:
            raise AnalyticsError(StatusCode.UNAVAILABLE, "EVENT_LOG_UNAVAILABLE", "down")
        self.events.extend(events)


class MemoryQuarantine:
    def __init__(self) -> None:
        self.entries: list[QuarantineEntry] = []

    async def quarantine(self, entries: Sequence[QuarantineEntry]) -> None:
        self.entries.extend(entries)


def _pipeline(
    rate: float = 1e9, burst: float = 1e9
) -> tuple[IngestionPipeline, MemoryLog, MemoryQuarantine]:
    log, quarantine = MemoryLog(), MemoryQuarantine()
    pipeline = IngestionPipeline(
        PipelineLimits(),
        Enricher("k" * 32),
        DedupWindow(86_400),
        TokenBucketLimiter(rate, burst),
        log,
        quarantine,
        clock=lambda: NOW.timestamp(),
    )
    return pipeline, log, quarantine


def _event(**overrides: object) -> IncomingEvent:
    values: dict[str, object] = {
        "event_id": "",
        "event_type": TrackedEventType.TRACK,
        "event_name": "ticket_viewed",
        "occurred_at": NOW - timedelta(minutes=1),
        "user_id": "u1",
    }
    values.update(overrides)
    return IncomingEvent(**values)  # type: ignore[arg-type]


async def test_accepted_event_is_enriched_and_appended() -> None:
    pipeline, log, _ = _pipeline()
    ua = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1"
    (outcome,) = await pipeline.ingest(
        "t1", "key", [_event(ip_address="81.2.69.160", user_agent=ua)], "events"
    )
    assert outcome.status is IngestStatus.ACCEPTED
    (stored,) = log.events
    assert stored.tenant_id == "t1"
    assert stored.enrichment.country_code == "GB"
    assert stored.enrichment.device_type == "mobile"
    assert stored.enrichment.browser_family == "Mobile Safari"
    assert "81.2.69.160" not in stored.enrichment.ip_hash and len(stored.enrichment.ip_hash) == 32


@pytest.mark.parametrize(
    ("overrides", "reason", "field"),
    [
        (
            {"occurred_at": NOW + timedelta(hours=1)},
            RejectionReason.TIMESTAMP_IN_FUTURE,
            "events[0].occurred_at",
        ),
        (
            {"occurred_at": NOW - timedelta(days=8)},
            RejectionReason.TIMESTAMP_TOO_OLD,
            "events[0].occurred_at",
        ),
        ({"serialized_size": 40_000}, RejectionReason.TOO_LARGE, "events[0]"),
        (
            {"properties_json": "{" + "x" * 20_000 + "}"},
            RejectionReason.TOO_LARGE,
            "events[0].properties",
        ),
        ({"property_count": 201}, RejectionReason.TOO_LARGE, "events[0].properties"),
        (
            {"event_type": TrackedEventType.CONVERSION},
            RejectionReason.BUSINESS_RULE,
            "events[0].ticketing",
        ),
        (
            {"revenue": Decimal("-1"), "currency": "EUR"},
            RejectionReason.BUSINESS_RULE,
            "events[0].ticketing.revenue",
        ),
        (
            {"revenue": Decimal("10"), "currency": "eur"},
            RejectionReason.BUSINESS_RULE,
            "events[0].ticketing.revenue.currency_code",
        ),
        ({"event_type": None}, RejectionReason.INVALID_FIELD, "events[0].event_type"),
    ],
)
async def test_each_rejection_class_is_typed_and_quarantined(
    overrides: dict[str, object], reason: RejectionReason, field: str
) -> None:
    pipeline, log, quarantine = _pipeline()
    (outcome,) = await pipeline.ingest("t1", "key", [_event(**overrides)], "events")
    assert outcome.status is IngestStatus.REJECTED
    assert outcome.rejection_reason is reason
    assert outcome.field_path == field
    assert log.events == []
    (entry,) = quarantine.entries
    assert entry.quarantined_event_id == outcome.quarantined_event_id
    assert entry.reason == reason.value and entry.tenant_id == "t1"


async def test_shape_violations_from_the_validation_layer_reject_only_that_item() -> None:
    pipeline, log, quarantine = _pipeline()
    outcomes = await pipeline.ingest(
        "t1",
        "key",
        [_event(), _event()],
        "events",
        {1: [FieldViolation("events[1].event_name", "does not match")]},
    )
    assert [o.status for o in outcomes] == [IngestStatus.ACCEPTED, IngestStatus.REJECTED]
    assert outcomes[1].field_path == "events[1].event_name"
    assert len(log.events) == 1 and len(quarantine.entries) == 1


async def test_implied_type_fills_in_and_mismatch_is_rejected() -> None:
    pipeline, log, _ = _pipeline()
    (ok,) = await pipeline.ingest(
        "t1", "k", [_event(event_type=None)], "event", implied_type=TrackedEventType.PAGE_VIEW
    )
    assert ok.status is IngestStatus.ACCEPTED
    assert log.events[0].event_type is TrackedEventType.PAGE_VIEW
    (bad,) = await pipeline.ingest(
        "t1", "k", [_event()], "event", implied_type=TrackedEventType.PAGE_VIEW
    )
    assert bad.rejection_reason is RejectionReason.EVENT_TYPE_MISMATCH
    assert bad.field_path == "event.event_type"


async def test_duplicates_inside_a_batch_and_across_calls_are_stored_once() -> None:
    pipeline, log, _ = _pipeline()
    first = await pipeline.ingest(
        "t1", "k", [_event(event_id="e1"), _event(event_id="e1")], "events"
    )
    assert [o.status for o in first] == [IngestStatus.ACCEPTED, IngestStatus.DUPLICATE]
    (again,) = await pipeline.ingest("t1", "k", [_event(event_id="e1")], "events")
    assert again.status is IngestStatus.DUPLICATE
    # The same id in another tenant is not a duplicate.
    (other,) = await pipeline.ingest("t2", "k", [_event(event_id="e1")], "events")
    assert other.status is IngestStatus.ACCEPTED
    assert len(log.events) == 2


async def test_failed_commit_acknowledges_nothing_and_a_retry_is_not_a_duplicate() -> None:
    pipeline, log, _ = _pipeline()
    log.fail = True
    with pytest.raises(AnalyticsError):
        await pipeline.ingest("t1", "k", [_event(event_id="e1")], "events")
    log.fail = False
    (retry,) = await pipeline.ingest("t1", "k", [_event(event_id="e1")], "events")
    assert retry.status is IngestStatus.ACCEPTED


async def test_rate_limit_refuses_the_whole_call_with_retry_advice() -> None:
    pipeline, log, _ = _pipeline(rate=10, burst=5)
    await pipeline.ingest("t1", "key-a", [_event() for _ in range(5)], "events")
    with pytest.raises(AnalyticsError) as caught:
        await pipeline.ingest("t1", "key-a", [_event()], "events")
    assert caught.value.code is StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.retry_after_seconds is not None and caught.value.retry_after_seconds > 0
    # Another key has its own bucket.
    await pipeline.ingest("t1", "key-b", [_event()], "events")
    assert len(log.events) == 6


async def test_revenue_the_store_cannot_hold_rejects_only_that_event() -> None:
    """The store keeps DECIMAL(18,6): more decimals or more magnitude would fail the whole
    batch's append, so each such event is refused on its own, naming the Money field."""
    pipeline, log, quarantine = _pipeline()

    def paid(revenue: str) -> IncomingEvent:
        return _event(revenue=Decimal(revenue), currency="EUR")

    outcomes = await pipeline.ingest(
        "t1",
        "key",
        [
            paid("12.345678"),
            paid("1.0000001"),  # a seventh decimal place
            paid("999999999999.999999"),  # the largest DECIMAL(18,6)
            paid("1000000000000"),
            paid("0.000000001"),  # one nano
        ],
        "events",
    )
    assert [o.status for o in outcomes] == [
        IngestStatus.ACCEPTED,
        IngestStatus.REJECTED,
        IngestStatus.ACCEPTED,
        IngestStatus.REJECTED,
        IngestStatus.REJECTED,
    ]
    rejected = {o.field_path: o for o in outcomes if o.status is IngestStatus.REJECTED}
    assert set(rejected) == {
        "events[1].ticketing.revenue.nanos",
        "events[3].ticketing.revenue.units",
        "events[4].ticketing.revenue.nanos",
    }
    assert all(o.rejection_reason is RejectionReason.INVALID_FIELD for o in rejected.values())
    assert "more than 6 decimal places" in rejected["events[1].ticketing.revenue.nanos"].message
    assert [e.revenue for e in log.events] == [
        Decimal("12.345678"),
        Decimal("999999999999.999999"),
    ]
    assert len(quarantine.entries) == 3
