"""The live feed (in process) and the store's compare-and-set of stream offsets."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from services.storage.event_store import (
    EVENT_ARROW_SCHEMA,
    DuckDBEventStore,
    StaleStreamOffsetError,
    StreamOffset,
    events_to_table,
)
from services.streaming.live import LiveFeed, summarize
from tests.streaming.conftest import event

pytestmark = pytest.mark.unit


async def test_subscribers_get_their_tenants_rows_published_from_another_thread() -> None:
    feed = LiveFeed()
    rows = events_to_table([event(i, tenant="t1") for i in range(5)] + [event(9, tenant="t2")])
    async with feed.subscribe("t1") as only_t1, feed.subscribe(None) as everyone:
        publisher = threading.Thread(target=feed.publish, args=(rows,))
        publisher.start()
        publisher.join()
        first = await asyncio.wait_for(anext(only_t1), 5)
        every = await asyncio.wait_for(anext(everyone), 5)
    assert first.rows.num_rows == 5 and set(first.rows.column("tenant_id").to_pylist()) == {"t1"}
    assert every.rows.num_rows == 6 and not first.gap
    assert feed.subscriber_count == 0
    delta = summarize(first.rows)
    assert delta.events == 5
    assert delta.conversions == 1 and delta.revenue == {"EUR": Decimal("49.990001")}
    assert delta.by_event_name == {"page_view": 4, "ticket_purchased": 1}


async def test_a_slow_subscriber_loses_the_oldest_batches_and_is_told() -> None:
    feed = LiveFeed()
    subscription = feed.subscribe("t1", max_pending_batches=2)
    for i in range(5):
        feed.publish(events_to_table([event(i, tenant="t1")]))
    await asyncio.sleep(0.05)  # deliveries run on this loop
    got = [await anext(subscription), await anext(subscription)]
    assert [b.rows.column("event_id")[0].as_py() for b in got] == ["e-3", "e-4"]
    assert got[0].gap and not got[1].gap
    assert subscription.dropped_batches == 3
    subscription.close()


def test_offsets_commit_with_rows_and_a_stale_writer_writes_nothing(tmp_path: Path) -> None:
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        batch = events_to_table([event(i) for i in range(10)])
        store.append_table(batch, [StreamOffset("t", 0, None, 10)])
        # A zombie that read the offsets before that commit (None) must be refused ...
        with pytest.raises(StaleStreamOffsetError):
            store.append_table(batch, [StreamOffset("t", 0, None, 10)])
        # ... and so must one that expects an older position.
        with pytest.raises(StaleStreamOffsetError):
            store.append_table(batch, [StreamOffset("t", 1, None, 3), StreamOffset("t", 0, 4, 12)])
        assert store.count("tenant_a") == 10
        assert store.stream_offsets("t") == {0: 10}  # partition 1 rolled back too
        # Offsets alone (every record of a batch dead-lettered) still move.
        store.append_table(EVENT_ARROW_SCHEMA.empty_table(), [StreamOffset("t", 0, 10, 15)])
        assert store.stream_offsets("t") == {0: 15}
    with DuckDBEventStore(tmp_path / "events.duckdb") as reopened:
        assert reopened.stream_offsets("t") == {0: 15}
        assert reopened.count("tenant_a") == 10
