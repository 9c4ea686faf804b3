"""Pipeline status: how far the event store is behind the event log, as a metric and for
the `GetPipelineStatus` RPC.

The RPC's figures come from Kafka itself (the processor group's committed offsets against
each partition's last stable offset), so any process can answer, wherever the processor
runs. The processor commits those offsets right after each store commit, so the figure
is at most one batch behind the store's own offsets. The Prometheus gauges of a process
running the processor come from its members' positions and the high watermarks of their
last fetches, which costs no request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from services.platform.errors import AnalyticsError, StatusCode


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    partition: int
    end_offset: int  # last stable offset: the next record a read_committed reader gets
    committed_offset: int | None  # the processor group's; None before its first commit
    lag: int  # records written to the topic and not yet in the event store


@dataclass(frozen=True, slots=True)
class PipelineStatus:
    event_log: str  # "embedded" | "kafka"
    observed_at: datetime
    pending_events: int = 0  # in this ingestion process: accepted, not yet durable
    topic: str = ""
    consumer_group: str = ""
    partitions: tuple[PartitionStatus, ...] = field(default_factory=tuple)

    @property
    def total_lag(self) -> int:
        return sum(p.lag for p in self.partitions)


class PipelineStatusSource(Protocol):
    async def status(self) -> PipelineStatus: ...


class EmbeddedPipelineStatus:
    """The embedded log has no processor: events are in the store once acknowledged."""

    def __init__(self, pending: Callable[[], int]) -> None:
        self._pending = pending

    async def status(self) -> PipelineStatus:
        return PipelineStatus("embedded", datetime.now(UTC), pending_events=self._pending())


def dependency_unavailable(message: str, retry_after_seconds: float = 2.0) -> AnalyticsError:
    return AnalyticsError(
        StatusCode.UNAVAILABLE,
        "DEPENDENCY_UNAVAILABLE",
        message,
        retry_after_seconds=retry_after_seconds,
    )


def read_group_lag(
    admin: Any, group_id: str, topic: str, timeout: float = 5.0
) -> tuple[PartitionStatus, ...]:
    """Per partition: last stable offset, the group's committed offset, and the lag.

    Without a committed offset the lag counts from the earliest retained record, which
    is where a new processor starts.
    """
    from confluent_kafka import (
        ConsumerGroupTopicPartitions,
        IsolationLevel,
        TopicPartition,
    )
    from confluent_kafka.admin._listoffsets import OffsetSpec

    metadata = admin.list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise LookupError(f"topic {topic} not found: {getattr(metadata, 'error', None)}")
    partitions = sorted(metadata.partitions)
    tps = [TopicPartition(topic, p) for p in partitions]
    futures = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group_id, tps)])
    committed: dict[int, int | None] = {}
    for tp in futures[group_id].result(timeout=timeout).topic_partitions:
        committed[tp.partition] = tp.offset if tp.offset >= 0 else None

    def offsets(spec: Any) -> dict[int, int]:
        result = admin.list_offsets(
            {TopicPartition(topic, p): spec for p in partitions},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=timeout,
        )
        return {tp.partition: fut.result(timeout=timeout).offset for tp, fut in result.items()}

    latest = offsets(OffsetSpec.latest())  # type: ignore[no-untyped-call]
    earliest = (
        offsets(OffsetSpec.earliest())  # type: ignore[no-untyped-call]
        if None in committed.values() or len(committed) < len(partitions)
        else {}
    )
    out = []
    for p in partitions:
        done = committed.get(p)
        start = done if done is not None else earliest.get(p, 0)
        out.append(PartitionStatus(p, latest[p], done, max(0, latest[p] - start)))
    return tuple(out)


class KafkaPipelineStatus:
    """Status of the Kafka pipeline, cached for a second so dashboards polling the RPC
    cost Kafka at most one round of admin requests per second."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        client_config: Mapping[str, Any] | None = None,
        pending: Callable[[], int] = lambda: 0,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._group = group_id
        self._client_config = dict(client_config or {})
        self._pending = pending
        self._admin: Any = None
        self._cached: tuple[float, tuple[PartitionStatus, ...]] | None = None
        self._lock = asyncio.Lock()

    def _read(self) -> tuple[PartitionStatus, ...]:
        from confluent_kafka.admin import AdminClient

        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self._bootstrap, **self._client_config})
        return read_group_lag(self._admin, self._group, self._topic)

    async def status(self) -> PipelineStatus:
        async with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > 1.0:
                try:
                    partitions = await asyncio.to_thread(self._read)
                except Exception as exc:
                    raise dependency_unavailable(
                        f"Kafka at {self._bootstrap} did not answer the lag query: {exc}"
                    ) from exc
                self._cached = (now, partitions)
            partitions = self._cached[1]
        return PipelineStatus(
            "kafka",
            datetime.now(UTC),
            pending_events=self._pending(),
            topic=self._topic,
            consumer_group=self._group,
            partitions=partitions,
        )


def observe_processor(
    lag: Callable[[], Mapping[int, int]], stats: Callable[[], Any], topic: str
) -> None:
    """Prometheus gauges of a process running the processor:
    `bilten_processor_lag_events{topic,partition}` and counters of what it stored."""
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Observation

    meter = metrics.get_meter("bilten.analytics")

    def lag_callback(_: CallbackOptions) -> Iterable[Observation]:
        for partition, value in sorted(lag().items()):
            yield Observation(value, {"topic": topic, "partition": str(partition)})

    meter.create_observable_gauge(
        "bilten_processor_lag_events",
        callbacks=[lag_callback],
        description="Records in the events topic not yet in the event store, per partition",
    )
    for name, attribute, description in (
        ("bilten_processor_stored_events", "stored_events", "Events the processor stored"),
        (
            "bilten_processor_dead_lettered",
            "dead_lettered",
            "Records sent to the dead-letter topic",
        ),
        ("bilten_processor_duplicate_events", "duplicate_events", "Events dropped as duplicates"),
        (
            "bilten_processor_anonymised_events",
            "anonymised_events",
            "Sealed events stored without PII: their subject key was destroyed (erasure)",
        ),
        (
            "bilten_processor_unreadable_pii_events",
            "unreadable_pii_events",
            "Sealed events stored without PII: their ciphertext did not open",
        ),
    ):

        def callback(_: CallbackOptions, attribute: str = attribute) -> Iterable[Observation]:
            yield Observation(getattr(stats(), attribute), {"topic": topic})

        meter.create_observable_counter(name, callbacks=[callback], description=description)
