"""The Kafka topic layout of the platform, and its creation at start.

| topic | key | partitions | retention | cleanup |
|---|---|---|---|---|
| `bilten.tracked-events.v1` | `<tenant_id>:<event_id>` | 6, for life | 7 d (raw tier) | delete |
| `bilten.tracked-events.v1.dlq` | the source record's key | 1 | 30 d | delete |

Why this key: Pinot's dedup (and upsert) keeps its primary-key map per stream
partition, so all copies of one event must land in the same partition; the key is a
function of the table's primary key (tenant_id, event_id) and nothing else. A per-tenant
or per-user key would also satisfy that only if it were part of the primary key, and it
would make one big organizer a hot partition. Producers use the `murmur2_random`
partitioner, the Java client's default, so a Java or Go producer writing the same key
picks the same partition. For the same reason the partition count never changes after
creation: growing it remaps keys and breaks dedup; `ensure_topics` refuses to.

No topic is compacted: events are facts, not the latest state of a key, and compaction
would run long after Pinot and the processor consumed the record anyway. The dead-letter
topic keeps records 30 days, longer than the events, so an operator can inspect and
replay them after fixing the cause.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

log = structlog.get_logger("bilten.streaming.topics")

DEFAULT_EVENTS_TOPIC: Final = "bilten.tracked-events.v1"
DEAD_LETTER_SUFFIX: Final = ".dlq"
_DAY_MS: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TopicLayout:
    """The topics one deployment uses; built from settings by `layout_from_settings`."""

    events: TopicSpec
    dead_letter: TopicSpec

    @property
    def all(self) -> tuple[TopicSpec, ...]:
        return (self.events, self.dead_letter)


def build_layout(
    events_topic: str = DEFAULT_EVENTS_TOPIC,
    partitions: int = 6,
    replication_factor: int = 1,
    retention_days: int = 7,
    dead_letter_retention_days: int = 30,
    min_insync_replicas: int | None = None,
) -> TopicLayout:
    """The layout for an events topic name; the dead-letter topic is `<name>.dlq`.

    `min.insync.replicas` defaults to replication - 1 (at least 1): with `acks=all`, a
    write is acknowledged only once that many replicas have it, and one broker may be
    down without stopping ingestion.
    """
    isr = min_insync_replicas or max(1, replication_factor - 1)
    common = {"cleanup.policy": "delete", "min.insync.replicas": str(isr)}
    return TopicLayout(
        events=TopicSpec(
            events_topic,
            partitions,
            replication_factor,
            {
                **common,
                "retention.ms": str(retention_days * _DAY_MS),
                # The producer compresses (lz4); the broker keeps its batches as they are.
                "compression.type": "producer",
            },
        ),
        dead_letter=TopicSpec(
            events_topic + DEAD_LETTER_SUFFIX,
            1,
            replication_factor,
            {**common, "retention.ms": str(dead_letter_retention_days * _DAY_MS)},
        ),
    )


class TopicLayoutError(RuntimeError):
    """An existing topic does not match the layout in a way that breaks guarantees."""


def ensure_topics(
    admin: Any, layout: TopicLayout, timeout: float = 30.0
) -> dict[str, str]:  # admin: confluent_kafka.admin.AdminClient
    """Creates the missing topics of `layout` and waits until they are served.

    Returns {topic: "created" | "exists"}. An existing events topic with another
    partition count is refused (`TopicLayoutError`): the key → partition mapping that
    dedup relies on would differ from what this deployment expects.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.cimpl import NewTopic

    metadata = admin.list_topics(timeout=timeout)
    result: dict[str, str] = {}
    missing = []
    for spec in layout.all:
        existing = metadata.topics.get(spec.name)
        if existing is not None and existing.error is None:
            result[spec.name] = "exists"
            if spec is layout.events and len(existing.partitions) != spec.partitions:
                raise TopicLayoutError(
                    f"topic {spec.name} has {len(existing.partitions)} partitions, the layout "
                    f"says {spec.partitions}; partitions cannot change without remapping keys "
                    "(set BILTEN_KAFKA_EVENTS_PARTITIONS to the topic's count)"
                )
            continue
        missing.append(spec)
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    s.name,
                    num_partitions=s.partitions,
                    replication_factor=s.replication_factor,
                    config=dict(s.config),
                )
                for s in missing
            ],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        for name, future in futures.items():
            try:
                future.result(timeout=timeout)
                result[name] = "created"
                log.info("kafka_topic_created", topic=name)
            except KafkaException as exc:
                # Another process (a second replica starting at once) created it first.
                if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    result[name] = "exists"
                else:
                    raise
        _wait_served(admin, [s for s in missing], timeout)
    return result


def _wait_served(admin: Any, specs: list[TopicSpec], timeout: float) -> None:
    # CreateTopics answers once the controller committed the topic; the broker applies
    # the metadata a moment later, and producing before that fails with
    # UNKNOWN_TOPIC_OR_PART on the first send.
    deadline = time.monotonic() + timeout
    for spec in specs:
        while True:
            topic = admin.list_topics(topic=spec.name, timeout=timeout).topics.get(spec.name)
            if (
                topic is not None
                and topic.error is None
                and len(topic.partitions) == spec.partitions
                and all(p.leader >= 0 for p in topic.partitions.values())
            ):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {spec.name} not served after {timeout:.0f} s")
            time.sleep(0.1)
