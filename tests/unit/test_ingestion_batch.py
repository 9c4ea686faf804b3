"""Unit tier: the batched hot path gives what the per-event path gives.

- `convert.incoming_events` (one pass over a request) against `convert.incoming_event`
  (the per-event reference), on generated protos;
- `convert.ingest_results` and `convert.add_ingest_results` against `convert.ingest_result`;
- one pipeline call over a batch against one call per event: same statuses, reasons,
  messages, field paths (up to the item prefix), same stored rows and quarantine;
- the per-batch time window against the per-event formula it replaced;
- the enrichment caches against uncached parses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as ingestion_pb2
from bilten.analytics.type.v1 import tracked_event_pb2 as te
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.model import TrackedEvent, TrackedEventType
from services.ingestion import convert
from services.ingestion.dedup import DedupWindow
from services.ingestion.enrichment import Enricher, parse_user_agent
from services.ingestion.pipeline import (
    IncomingEvent,
    IngestionPipeline,
    IngestOutcome,
    IngestStatus,
    PipelineLimits,
    RejectionReason,
)
from services.ingestion.rate_limit import TokenBucketLimiter
from services.storage.metadata_store import QuarantineEntry

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_UAS = [
    "",
    "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Googlebot/2.1 (+http://www.google.com/bot.html)",
    "curl/8.5.0",
]
_IPS = ["", "81.2.69.160", "10.0.0.1", "2001:db8::1", "not-an-ip", "8.8.8.8"]


@st.composite
def proto_events(draw: st.DrawFn) -> te.TrackedEvent:
    event = te.TrackedEvent(
        event_id=draw(st.sampled_from(["", "e1", "e2", "x" * 40])),
        event_type=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 99])),
        event_name=draw(_text),
        session_id=draw(_text),
        user_id=draw(st.sampled_from(["", "u1", "u2"])),
        anonymous_id=draw(st.sampled_from(["", "a1"])),
        definition_version=draw(st.integers(0, 3)),
    )
    if draw(st.booleans()):
        # Around the accepted window: far past, recent, near now, the future.
        offset = draw(st.integers(-9 * 86_400, 3_600))
        stamp = NOW.timestamp() + offset
        event.occurred_at.seconds = int(stamp)
        event.occurred_at.nanos = draw(st.integers(0, 999_999_999))
    if draw(st.booleans()):
        event.page.url = draw(_text)
        event.page.title = draw(_text)
        event.page.referrer = draw(_text)
    if draw(st.booleans()):
        event.ticketing.ticketed_event_id = draw(_text)
        event.ticketing.order_id = draw(st.sampled_from(["", "o1"]))
        event.ticketing.quantity = draw(st.integers(-2, 5))
        if draw(st.booleans()):
            event.ticketing.revenue.units = draw(st.integers(-5, 10**13))
            event.ticketing.revenue.nanos = draw(st.sampled_from([0, 500_000_000, 1, 999_999_000]))
            event.ticketing.revenue.currency_code = draw(st.sampled_from(["", "EUR", "eur"]))
    if draw(st.booleans()):
        event.client.source = draw(st.sampled_from([0, 1, 2, 3, 4, 7]))
        event.client.user_agent = draw(st.sampled_from(_UAS))
        event.client.ip_address = draw(st.sampled_from(_IPS))
    if draw(st.booleans()):
        for key, value in draw(
            st.dictionaries(st.text(max_size=5), st.integers(-100, 100) | _text, max_size=4)
        ).items():
            event.properties[key] = value
    if draw(st.booleans()):
        event.properties.Clear()  # set but empty
        event.properties.SetInParent()
    return event


def _fields(incoming: IncomingEvent) -> dict[str, object]:
    values = dataclasses.asdict(incoming)
    values.pop("render_original")
    return values


@settings(max_examples=300, deadline=None)
@given(st.lists(proto_events(), max_size=8), st.sampled_from(_IPS), st.sampled_from(_UAS))
def test_batched_conversion_equals_the_per_event_conversion(
    events: list[te.TrackedEvent], peer_ip: str, peer_ua: str
) -> None:
    request = ingestion_pb2.IngestEventsRequest(events=events)
    batched = convert.incoming_events(request.events, peer_ip, peer_ua)
    single = [convert.incoming_event(e, peer_ip, peer_ua) for e in request.events]
    assert [_fields(b) for b in batched] == [_fields(s) for s in single]
    assert [b.render_original() for b in batched] == [s.render_original() for s in single]


@st.composite
def outcomes(draw: st.DrawFn) -> IngestOutcome:
    status = draw(st.sampled_from(list(IngestStatus)))
    if status is IngestStatus.REJECTED and draw(st.booleans()):
        return IngestOutcome(
            draw(_text),
            status,
            draw(st.sampled_from(list(RejectionReason))),
            draw(_text),
            draw(_text),
            draw(_text),
        )
    return IngestOutcome(draw(_text), status)


@settings(max_examples=200, deadline=None)
@given(st.lists(outcomes(), max_size=10))
def test_batched_results_equal_the_per_outcome_results(found: list[IngestOutcome]) -> None:
    assert convert.ingest_results(found) == [convert.ingest_result(o) for o in found]
    response = ingestion_pb2.IngestEventsResponse()
    convert.add_ingest_results(response.results, found)
    assert list(response.results) == [convert.ingest_result(o) for o in found]


class _Log:
    def __init__(self) -> None:
        self.events: list[TrackedEvent] = []

    async def append(self, events: Sequence[TrackedEvent]) -> None:
        self.events.extend(events)


class _Quarantine:
    def __init__(self) -> None:
        self.entries: list[QuarantineEntry] = []

    async def quarantine(self, entries: Sequence[QuarantineEntry]) -> None:
        self.entries.extend(entries)


def _pipeline() -> tuple[IngestionPipeline, _Log, _Quarantine]:
    log, quarantine = _Log(), _Quarantine()
    pipeline = IngestionPipeline(
        PipelineLimits(),
        Enricher("k" * 32),
        DedupWindow(86_400),
        TokenBucketLimiter(1e9, 1e9),
        log,
        quarantine,
        clock=lambda: NOW.timestamp(),
    )
    return pipeline, log, quarantine


def _comparable(event: TrackedEvent) -> TrackedEvent:
    # Server-generated ids are random; everything else must match.
    return event if len(event.event_id) != 32 else dataclasses.replace(event, event_id="<gen>")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(proto_events(), min_size=1, max_size=8))
async def test_one_batch_gives_what_one_call_per_event_gives(
    events: list[te.TrackedEvent],
) -> None:
    request = ingestion_pb2.IngestEventsRequest(events=events)
    incoming = convert.incoming_events(request.events, "81.2.69.160", "")
    batch_pipeline, batch_log, batch_quarantine = _pipeline()
    batched = await batch_pipeline.ingest("t1", "k", incoming, "events")
    single_pipeline, single_log, single_quarantine = _pipeline()
    single: list[IngestOutcome] = []
    for index, event in enumerate(incoming):
        (outcome,) = await single_pipeline.ingest("t1", "k", [event], "events")
        # The per-event calls see every item as `events[0]`.
        single.append(
            dataclasses.replace(
                outcome, field_path=outcome.field_path.replace("events[0]", f"events[{index}]")
            )
        )
    assert len(batched) == len(single) == len(incoming)
    for index, (got, want) in enumerate(zip(batched, single, strict=True)):
        assert (got.status, got.rejection_reason, got.field_path, got.message) == (
            want.status,
            want.rejection_reason,
            want.field_path,
            want.message,
        )
        if incoming[index].event_id:
            assert got.event_id == want.event_id
        else:
            assert len(got.event_id) == 32 and int(got.event_id, 16) >= 0
        assert bool(got.quarantined_event_id) == (got.status is IngestStatus.REJECTED)
    assert [_comparable(e) for e in batch_log.events] == [_comparable(e) for e in single_log.events]
    generated = [o.event_id for o in batched if len(o.event_id) == 32]
    assert len(set(generated)) == len(generated)
    assert [(q.reason, q.message, q.event_json) for q in batch_quarantine.entries] == [
        (q.reason, q.message, q.event_json) for q in single_quarantine.entries
    ]
    rejected = [o for o in batched if o.status is IngestStatus.REJECTED]
    assert [(q.quarantined_event_id, q.field_path) for q in batch_quarantine.entries] == [
        (o.quarantined_event_id, o.field_path) for o in rejected
    ]


@settings(max_examples=300, deadline=None)
@given(st.integers(-8 * 86_400 * 10**6, 2 * 3_600 * 10**6))
async def test_the_batch_time_window_matches_the_per_event_formula(offset_us: int) -> None:
    limits = PipelineLimits()
    occurred_at = NOW + timedelta(microseconds=offset_us)
    if occurred_at - NOW > timedelta(seconds=limits.max_future_skew_seconds):
        expected: RejectionReason | None = RejectionReason.TIMESTAMP_IN_FUTURE
    elif NOW - occurred_at > timedelta(days=limits.raw_retention_days):
        expected = RejectionReason.TIMESTAMP_TOO_OLD
    else:
        expected = None
    pipeline, _, _ = _pipeline()
    event = IncomingEvent("", TrackedEventType.TRACK, "n", occurred_at)
    (outcome,) = await pipeline.ingest("t1", "k", [event], "events")
    assert outcome.rejection_reason is expected


@pytest.mark.parametrize(
    "offset",
    [
        timedelta(seconds=600),
        timedelta(seconds=600, microseconds=1),
        -timedelta(days=7),
        -timedelta(days=7, microseconds=1),
    ],
)
async def test_window_edges_are_inclusive_as_before(offset: timedelta) -> None:
    pipeline, _, _ = _pipeline()
    event = IncomingEvent("", TrackedEventType.TRACK, "n", NOW + offset)
    (outcome,) = await pipeline.ingest("t1", "k", [event], "events")
    exact = offset in (timedelta(seconds=600), -timedelta(days=7))
    assert (outcome.status is IngestStatus.ACCEPTED) == exact


@pytest.mark.parametrize("user_agent", _UAS)
def test_the_user_agent_cache_returns_the_uncached_parse(user_agent: str) -> None:
    uncached = parse_user_agent.__wrapped__(user_agent)
    assert parse_user_agent(user_agent) == uncached
    assert parse_user_agent(user_agent) == uncached  # now from the cache


@pytest.mark.parametrize("ip", _IPS)
@pytest.mark.parametrize("user_agent", _UAS[:3])
def test_the_enrichment_cache_returns_the_uncached_enrichment(ip: str, user_agent: str) -> None:
    enricher = Enricher("k" * 32)
    uncached = enricher._enrich(ip, user_agent)
    assert enricher.enrich(ip, user_agent) == uncached
    assert enricher.enrich(ip, user_agent) == uncached
    other_key = Enricher("j" * 32).enrich(ip, user_agent)
    assert (other_key.ip_hash != uncached.ip_hash) == bool(ip)  # keyed, per enricher
