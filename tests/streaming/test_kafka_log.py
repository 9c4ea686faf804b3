"""The Kafka event log against the real broker and our registry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from services.platform.errors import AnalyticsError, StatusCode
from services.streaming import avro_envelope as envelope
from services.streaming.kafka_log import KafkaEventLog
from services.streaming.schemas import EnvelopeSchemaId
from services.streaming.topics import TopicLayout, TopicLayoutError
from tests.conftest import free_port
from tests.streaming.conftest import REGISTRY_TOKEN, consume_all, event, make_layout

pytestmark = pytest.mark.kafka


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The Java client's default partitioner (Utils.murmur2 & 0x7fffffff % n)."""
    length = len(key)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length % 4
    if tail:
        rest = key[length - tail :]
        if tail == 3:
            h ^= rest[2] << 16
        if tail >= 2:
            h ^= rest[1] << 8
        h ^= rest[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def make_log(
    bootstrap: str, layout: TopicLayout, registry_url: str, **kwargs: object
) -> KafkaEventLog:
    return KafkaEventLog(
        bootstrap=bootstrap,
        layout=layout,
        schema_id=EnvelopeSchemaId(registry_url, REGISTRY_TOKEN, layout.events.name),
        **kwargs,  # type: ignore[arg-type]
    )


async def test_acknowledged_events_are_confluent_avro_keyed_for_pinot_dedup(
    kafka_bootstrap: str, registry_url: str, topic_name: str
) -> None:
    layout = make_layout(topic_name, partitions=4)
    log = make_log(kafka_bootstrap, layout, registry_url)
    assert await log.start()  # creates both topics, registers the envelope
    events = [event(i, tenant=("t1", "t2")[i % 2]) for i in range(600)]
    await asyncio.gather(log.append(events[:300]), log.append(events[300:]))
    assert log.status().acknowledged_events == 600 and log.status().pending_events == 0
    await log.close()

    client = SchemaRegistryClient(envelope.registry_client_conf(registry_url, REGISTRY_TOKEN))
    registered = client.get_latest_version(envelope.subject_for(topic_name))
    assert registered.schema_id == log.status().schema_id
    assert json.loads(registered.schema.schema_str)["name"] == envelope.ENVELOPE_NAME

    messages = consume_all(kafka_bootstrap, topic_name, 600)
    assert len(messages) == 600
    # confluent-kafka's own deserializer, fetching the writer schema from our registry.
    deserializer = AvroDeserializer(client)
    context = SerializationContext(topic_name, MessageField.VALUE)
    by_id = {e.event_id: e for e in events}
    for message in messages:
        record = deserializer(message.value(), context)
        expected = by_id[record["event_id"]]
        assert envelope.from_record(record) == expected
        assert message.key() == envelope.envelope_key(expected.tenant_id, expected.event_id)
        # Java producers (and Pinot's view of partitioning) agree on the partition.
        assert message.partition() == murmur2_partition(message.key(), 4)


async def test_unreachable_kafka_answers_unavailable_with_retry_advice(
    registry_url: str, topic_name: str
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    log = make_log(dead, make_layout(topic_name), registry_url, append_timeout_seconds=2.0)
    assert not await log.start(timeout=3)
    started = time.monotonic()
    with pytest.raises(AnalyticsError) as caught:
        await log.append([event(1)])
    assert caught.value.code is StatusCode.UNAVAILABLE
    assert caught.value.reason == "EVENT_LOG_UNAVAILABLE"
    assert caught.value.retry_after_seconds and caught.value.retry_after_seconds > 0
    assert time.monotonic() - started < 20
    await log.close(timeout=1)


async def test_past_the_pending_bound_appends_fail_at_once(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout]
) -> None:
    log = make_log(kafka_bootstrap, topics(), registry_url, max_pending_events=1000)
    await log.start()
    log.pending_events = 900  # as if 900 events were awaiting the broker
    with pytest.raises(AnalyticsError) as caught:
        await log.append([event(i) for i in range(200)])
    assert caught.value.code is StatusCode.UNAVAILABLE
    assert "full" in caught.value.message and caught.value.retry_after_seconds
    log.pending_events = 0
    await log.append([event(i) for i in range(200)])  # room again: goes through
    with pytest.raises(ValueError):
        await log.append([event(i) for i in range(1001)])  # could never fit: a bug, not load
    await log.close()


async def test_an_events_topic_with_another_partition_count_refuses_the_start(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout]
) -> None:
    existing = topics(partitions=2)
    log = make_log(kafka_bootstrap, make_layout(existing.events.name, partitions=3), registry_url)
    with pytest.raises(TopicLayoutError, match="2 partitions"):
        await log.start()
    await log.close(timeout=1)
