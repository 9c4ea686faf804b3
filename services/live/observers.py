"""The input of live metrics, rollups and the result cache: durable batches of events.

`EventObserver` is the whole protocol. A producer calls it once per batch that has
become durable, in the order it made them durable:

- `observe_events(events)`: batches of `TrackedEvent` (the ingestion pipeline, right
  after the embedded event log committed them: `IngestionPipeline(on_accepted=...)`).
- `observe_rows(rows)`: the same as an Arrow table with the columns of
  `services.storage.event_store.EVENT_ARROW_SCHEMA` (the Kafka stream processor, after
  its store commit; `follow_live_feed` adapts its `LiveFeed`).

Rules for implementations: callable from any thread; return quickly (note the batch,
do the work elsewhere); never raise into the producer: a durable event is acknowledged
whatever a dashboard does. `ObserverFanout` enforces the last rule for its members.

Each batch must reach an observer through exactly one producer: the mesh feeds the
observers from the pipeline when events are committed in process (embedded event log),
and from the processor's live feed when they come through Kafka, never both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pyarrow as pa
import structlog

from services.events.model import TrackedEvent
from services.streaming.live import LiveFeed

log = structlog.get_logger(__name__)


class EventObserver(Protocol):
    def observe_events(self, events: Sequence[TrackedEvent]) -> None:
        """A durable batch, as the pipeline holds it."""
        ...

    def observe_rows(self, rows: pa.Table) -> None:
        """A durable batch as Arrow rows (`EVENT_ARROW_SCHEMA` columns)."""
        ...


class ObserverFanout:
    """Hands each batch to every member; a failing member is logged, never raised."""

    def __init__(self, *observers: EventObserver) -> None:
        self._observers: list[EventObserver] = list(observers)

    def add(self, observer: EventObserver) -> None:
        self._observers.append(observer)

    def observe_events(self, events: Sequence[TrackedEvent]) -> None:
        for observer in self._observers:
            try:
                observer.observe_events(events)
            except Exception:
                log.exception("event_observer_failed", observer=type(observer).__name__)

    def observe_rows(self, rows: pa.Table) -> None:
        for observer in self._observers:
            try:
                observer.observe_rows(rows)
            except Exception:
                log.exception("event_observer_failed", observer=type(observer).__name__)


# The processor's feed drops a subscriber's oldest batches past this many; our
# subscriber only notes each batch, so it keeps up unless the loop is starved.
_FEED_BUFFER_BATCHES = 10_000


async def follow_live_feed(feed: LiveFeed, observer: EventObserver) -> None:
    """Feeds `observer` from the stream processor's live feed until cancelled."""
    async with feed.subscribe(None, max_pending_batches=_FEED_BUFFER_BATCHES) as subscription:
        async for batch in subscription:
            if batch.gap:
                # Live numbers of the dropped batches are missing until the next
                # restart re-seeds; the store and the rollups' rebuild still have them.
                log.warning("live_feed_gap", dropped_batches=subscription.dropped_batches)
            observer.observe_rows(batch.rows)
