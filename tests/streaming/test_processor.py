"""The stream processor against the real broker: store, dead letters, schema resolution,
dedup, a rebalance between two processors, lag and the live feed."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fastavro
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from services.storage.event_store import DuckDBEventStore, StreamOffset, events_to_table
from services.streaming import avro_envelope as envelope
from services.streaming.codec import encode_table
from services.streaming.live import LiveFeed
from services.streaming.processor import (
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    ProcessorConfig,
    StreamProcessor,
)
from services.streaming.schemas import WriterSchemas
from services.streaming.status import read_group_lag
from services.streaming.topics import TopicLayout
from tests.streaming.conftest import REGISTRY_TOKEN, consume_all, event

pytestmark = pytest.mark.kafka


def processor_for(
    bootstrap: str,
    layout: TopicLayout,
    registry_url: str,
    store: DuckDBEventStore,
    *,
    group: str | None = None,
    dedup_window_seconds: float = 86_400,
    live: LiveFeed | None = None,
    max_batch_events: int = 5_000,
) -> StreamProcessor:
    return StreamProcessor(
        ProcessorConfig(
            bootstrap=bootstrap,
            topic=layout.events.name,
            dead_letter_topic=layout.dead_letter.name,
            group_id=group or f"test-processor-{uuid.uuid4().hex[:8]}",
            session_timeout_ms=6000,
            max_batch_events=max_batch_events,
            max_batch_seconds=0.1,
            dedup_window_seconds=dedup_window_seconds,
        ),
        store,
        WriterSchemas(registry_url, REGISTRY_TOKEN),
        live,
    )


def envelope_id(registry_url: str, topic: str) -> int:
    return envelope.register_envelope_schema(registry_url, REGISTRY_TOKEN, topic)


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "partitioner": "murmur2_random",
        }
    )
    for key, value in records:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def framed(events: list, schema_id: int) -> list[tuple[bytes, bytes]]:
    payloads = encode_table(events_to_table(events), schema_id)
    return [
        (envelope.envelope_key(e.tenant_id, e.event_id), p)
        for e, p in zip(events, payloads, strict=True)
    ]


def wait_for(condition: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def stored_ids(store: DuckDBEventStore) -> list[str]:
    return store.read("SELECT event_id FROM tracked_events").column(0).to_pylist()


def test_bad_records_go_to_the_dead_letter_topic_and_never_block_the_partition(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout], tmp_path: Path
) -> None:
    layout = topics(partitions=1)
    topic = layout.events.name
    schema_id = envelope_id(registry_url, topic)
    good_before = framed([event(i, prefix="before") for i in range(50)], schema_id)
    valid = envelope.encode(event(1, prefix="x"), schema_id)
    bogus_type = envelope.to_record(event(2, prefix="x"))
    bogus_type["event_type"] = "bogus"
    body = io.BytesIO()
    fastavro.schemaless_writer(body, envelope.PARSED_ENVELOPE_SCHEMA, bogus_type)
    bad = [
        (b"k1", b'{"not": "avro"}'),  # no magic byte
        (b"k2", envelope.frame(987_654, valid[5:])),  # an id the registry does not know
        (b"k3", valid[:12]),  # truncated body
        (b"k4", envelope.frame(schema_id, body.getvalue())),  # a value the model refuses
    ]
    good_after = framed([event(i, prefix="after") for i in range(50)], schema_id)
    produce(kafka_bootstrap, topic, good_before + bad + good_after)

    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        processor = processor_for(kafka_bootstrap, layout, registry_url, store)
        processor.start()
        try:
            wait_for(lambda: store.count("tenant_a") == 100, what="100 good events stored")
            wait_for(lambda: store.stream_offsets(topic) == {0: 104}, what="offsets past the bad")
        finally:
            processor.stop()
        assert processor.stats.dead_lettered == 4
    letters = consume_all(kafka_bootstrap, layout.dead_letter.name, 4)
    assert len(letters) == 4
    by_key = {m.key(): m for m in letters}
    for key, original in bad:
        letter = by_key[key]
        assert letter.value() == original  # unchanged, replayable
        headers = dict(letter.headers())
        assert headers[DLQ_SOURCE_PARTITION] == b"0"
        assert int(headers[DLQ_SOURCE_OFFSET]) in range(50, 54)
    reasons = {k: dict(m.headers())[DLQ_REASON].decode() for k, m in by_key.items()}
    assert "magic byte" in reasons[b"k1"]
    assert "unknown writer schema" in reasons[b"k2"]
    assert "truncated" in reasons[b"k3"]
    assert reasons[b"k4"] == "unknown event_type 'bogus'"


def test_writer_schemas_are_fetched_by_id_and_resolved_to_the_reader(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout], tmp_path: Path
) -> None:
    """A producer still on an older envelope version, and confluent-kafka's own
    AvroSerializer, both registered in our registry under the topic's value subject."""
    layout = topics(partitions=2)
    topic = layout.events.name
    client = SchemaRegistryClient(envelope.registry_client_conf(registry_url, REGISTRY_TOKEN))
    old = json.loads(envelope.ENVELOPE_SCHEMA_JSON)
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("campaign_id", "schema_id")]
    old_id = client.register_schema(envelope.subject_for(topic), Schema(json.dumps(old), "AVRO"))
    # The current envelope is a BACKWARD-compatible next version of the same subject.
    serializer = AvroSerializer(client, envelope.ENVELOPE_SCHEMA_JSON)
    context = SerializationContext(topic, MessageField.VALUE)
    records = []
    for i in range(20):
        e = event(i, prefix="new")
        records.append(
            (
                envelope.envelope_key(e.tenant_id, e.event_id),
                serializer(envelope.to_record(e), context),
            )
        )
    parsed_old = fastavro.parse_schema(old)
    for i in range(20):
        record = {
            k: v
            for k, v in envelope.to_record(event(i, prefix="old")).items()
            if k not in ("campaign_id", "schema_id")
        }
        body = io.BytesIO()
        fastavro.schemaless_writer(body, parsed_old, record)
        records.append((f"tenant_a:old-{i}".encode(), envelope.frame(old_id, body.getvalue())))
    assert client.get_versions(envelope.subject_for(topic)) == [1, 2]
    produce(kafka_bootstrap, topic, records)

    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        processor = processor_for(kafka_bootstrap, layout, registry_url, store)
        processor.start()
        try:
            wait_for(lambda: store.count("tenant_a") == 40, what="40 events")
        finally:
            processor.stop()
        rows = store.read(
            "SELECT event_id, campaign_id, schema_id, page_url FROM tracked_events ORDER BY event_id"
        ).to_pylist()
    assert processor.stats.dead_lettered == 0
    old_rows = [r for r in rows if r["event_id"].startswith("old-")]
    assert len(old_rows) == 20
    assert all(r["campaign_id"] == "" and r["schema_id"] == 0 for r in old_rows)  # defaults
    assert all(r["page_url"].startswith("https://bilten.example/") for r in rows)


def test_duplicate_event_ids_in_the_topic_are_stored_once(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout], tmp_path: Path
) -> None:
    """A client retried after a timeout whose batch had landed: the same events twice."""
    layout = topics(partitions=3)
    schema_id = envelope_id(registry_url, layout.events.name)
    batch = framed([event(i) for i in range(300)], schema_id)
    produce(kafka_bootstrap, layout.events.name, batch + batch[:120])
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        processor = processor_for(kafka_bootstrap, layout, registry_url, store)
        processor.start()
        try:
            wait_for(
                lambda: sum(store.stream_offsets(layout.events.name).values()) == 420,
                what="all offsets",
            )
        finally:
            processor.stop()
        ids = stored_ids(store)
    assert len(ids) == 300 == len(set(ids))
    assert processor.stats.duplicate_events == 120


@pytest.mark.parametrize(("backlog_batch_seconds", "few_batches"), [(60.0, True), (0.001, False)])
def test_a_backlog_is_committed_in_full_batches_whatever_the_freshness_bound(
    kafka_bootstrap: str,
    registry_url: str,
    topics: Callable[..., TopicLayout],
    tmp_path: Path,
    backlog_batch_seconds: float,
    few_batches: bool,
) -> None:
    """60,000 records wait in the topic; max_batch_seconds is 1 ms. With the backlog rule
    the batches fill to max_batch_events (20,000); without it (the 0.001 s control) about
    every fetch (up to 2,000 records) closes a batch."""
    layout = topics(partitions=2)
    schema_id = envelope_id(registry_url, layout.events.name)
    produce(
        kafka_bootstrap, layout.events.name, framed([event(i) for i in range(60_000)], schema_id)
    )
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        processor = StreamProcessor(
            ProcessorConfig(
                bootstrap=kafka_bootstrap,
                topic=layout.events.name,
                dead_letter_topic=layout.dead_letter.name,
                group_id=f"test-processor-{uuid.uuid4().hex[:8]}",
                max_batch_events=20_000,
                max_batch_seconds=0.001,
                backlog_batch_seconds=backlog_batch_seconds,
            ),
            store,
            WriterSchemas(registry_url, REGISTRY_TOKEN),
        )
        processor.start()
        try:
            wait_for(lambda: processor.stats.stored_events == 60_000, what="all events")
        finally:
            processor.stop()
        assert len(set(stored_ids(store))) == 60_000
    # A fetch at the start or the end of the backlog may come back short: a few extra.
    if few_batches:
        # Full batches of exactly max_batch_events, even when a fetch overshoots it.
        assert processor.stats.largest_batch_records == 20_000
        assert processor.stats.batches <= 6, processor.stats
    else:
        assert processor.stats.batches >= 12, processor.stats


def test_two_processors_share_partitions_through_rebalances_without_loss_or_duplicates(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout], tmp_path: Path
) -> None:
    """Production runs while a second member joins (rebalance) and the first leaves
    (rebalance again). Dedup is off, so only the offsets-in-the-store-transaction
    mechanism stands between a rebalance and a duplicate."""
    layout = topics(partitions=6)
    topic = layout.events.name
    schema_id = envelope_id(registry_url, topic)
    stop = threading.Event()
    # Production is paced by the members' progress, not by the clock: it runs until the
    # second member has stored events, pauses until the first has left, then goes on,
    # so both rebalances happen mid-stream however slow the machine is.
    second_progressed, first_left = threading.Event(), threading.Event()
    produced = [0]

    def produce_chunk() -> None:
        start = produced[0]
        produce(
            kafka_bootstrap,
            topic,
            framed([event(i) for i in range(start, start + 1000)], schema_id),
        )
        produced[0] = start + 1000

    def producer_loop() -> None:
        while not second_progressed.is_set() and produced[0] < 200_000:
            produce_chunk()
            if stop.wait(0.25):
                return
        if not first_left.wait(120):
            return
        for _ in range(4):
            produce_chunk()

    group = f"test-rebalance-{uuid.uuid4().hex[:8]}"
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        first = processor_for(
            kafka_bootstrap,
            layout,
            registry_url,
            store,
            group=group,
            dedup_window_seconds=0,
            max_batch_events=1000,
        )
        second = processor_for(
            kafka_bootstrap,
            layout,
            registry_url,
            store,
            group=group,
            dedup_window_seconds=0,
            max_batch_events=1000,
        )
        feeder = threading.Thread(target=producer_loop)
        feeder.start()
        first.start()
        try:
            wait_for(lambda: store.count("tenant_a") >= 3000, what="first member progress")
            second.start()  # rebalance: the first hands over part of its partitions
            wait_for(lambda: second.stats.stored_events >= 1000, what="second member progress")
            second_progressed.set()
            first.stop()  # rebalance: the second takes everything
            at_handover = store.count("tenant_a")
            first_left.set()
            feeder.join(120)
            total = produced[0]
            wait_for(lambda: store.count("tenant_a") >= total, timeout=90, what="all events")
            time.sleep(1.0)  # a duplicate would show up now
        finally:
            stop.set()
            second_progressed.set()
            first_left.set()
            first.stop()
            second.stop()
            feeder.join(30)
        ids = stored_ids(store)
        offsets = store.stream_offsets(topic)
    assert len(ids) == total == len(set(ids)), (len(ids), len(set(ids)))
    assert first.stats.stored_events > 0 and second.stats.stored_events > 0
    assert at_handover <= total - 4000  # the second member took over mid-stream
    assert sum(offsets.values()) == total and len(offsets) == 6
    assert first.stats.duplicate_events == second.stats.duplicate_events == 0


async def test_lag_is_exported_and_read_from_kafka_and_the_live_feed_gets_commits(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout], tmp_path: Path
) -> None:
    layout = topics(partitions=2)
    topic = layout.events.name
    schema_id = envelope_id(registry_url, topic)
    produce(kafka_bootstrap, topic, framed([event(i) for i in range(500)], schema_id))
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    group = f"test-lag-{uuid.uuid4().hex[:8]}"
    before = read_group_lag(admin, group, topic)
    assert sum(p.lag for p in before) == 500 and all(p.committed_offset is None for p in before)

    feed = LiveFeed()
    subscription = feed.subscribe("tenant_a")
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        processor = processor_for(
            kafka_bootstrap, layout, registry_url, store, group=group, live=feed
        )
        processor.start()
        try:
            live_rows = 0
            while live_rows < 500:
                batch = await asyncio.wait_for(anext(subscription), 60)
                live_rows += batch.rows.num_rows
            assert live_rows == 500
            deadline = time.monotonic() + 30
            while sum(processor.lag().values()) != 0 or len(processor.lag()) != 2:
                assert time.monotonic() < deadline, processor.lag()
                await asyncio.sleep(0.2)
            deadline = time.monotonic() + 30
            while True:
                after = read_group_lag(admin, group, topic)
                if sum(p.lag for p in after) == 0:
                    break
                assert time.monotonic() < deadline, after
                await asyncio.sleep(0.2)
        finally:
            subscription.close()
            processor.stop()
    assert sum(p.end_offset for p in after) == 500
    assert all(p.committed_offset == p.end_offset for p in after)


def test_kafka_offsets_catch_up_with_the_store_at_assignment(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout], tmp_path: Path
) -> None:
    """A crash between a store commit and its Kafka commit leaves Kafka behind; with no
    new records nothing would ever move it. The store's offsets are mirrored on assign."""
    layout = topics(partitions=1)
    schema_id = envelope_id(registry_url, layout.events.name)
    events = [event(i) for i in range(10)]
    produce(kafka_bootstrap, layout.events.name, framed(events, schema_id))
    group = f"test-processor-{uuid.uuid4().hex[:8]}"
    with DuckDBEventStore(tmp_path / "events.duckdb") as store:
        # As if a processor stored all ten and died before committing to Kafka.
        store.append_table(events_to_table(events), [StreamOffset(layout.events.name, 0, None, 10)])
        processor = processor_for(kafka_bootstrap, layout, registry_url, store, group=group)
        processor.start()
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        try:
            wait_for(
                lambda: (
                    [p.committed_offset for p in read_group_lag(admin, group, layout.events.name)]
                    == [10]
                ),
                what="Kafka's committed offset to reach the store's",
            )
        finally:
            processor.stop()
        assert len(stored_ids(store)) == 10  # nothing read again
