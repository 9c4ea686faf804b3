"""The Kafka event log: ingestion's `EventLog` in the cluster shape.

`append` returns only after the broker acknowledged every event of the batch with
`acks=all` (the leader and `min.insync.replicas` followers have it): that is when an
event is durable and the client may be told ACCEPTED. Any failure raises an
`AnalyticsError` (UNAVAILABLE, `EVENT_LOG_UNAVAILABLE`, with retry advice) and the
client is told nothing was accepted; part of such a batch may still have landed, which is
why the client retries with the same event ids and dedup (ingestion's window, the
processor's window, Pinot's dedupConfig) makes the retry harmless.

Producer: idempotent (`enable.idempotence`: no duplicates or reordering from its own
retries), lz4, `linger.ms=5`, the `murmur2_random` partitioner (the Java client's, so
every producer maps a key to the same partition), the key `<tenant_id>:<event_id>`
(see services/streaming/topics.py for why).

Back-pressure, instead of buffering without bound:
- events handed to the producer but not yet acknowledged never exceed
  `max_pending_events`; past it `append` fails at once with a retry delay estimated
  from the recent acknowledgement rate;
- when librdkafka reports all brokers down, `append` fails at once (retry in 1 s) until
  a metadata request succeeds again (probed every second), rather than letting every
  request wait out the delivery timeout;
- a batch not acknowledged within `append_timeout_seconds` (librdkafka's
  `message.timeout.ms`) fails.

Crypto-shredding (`pii=PiiSealer(...)`, docs/compliance.md): every batch's PII is sealed
with its subjects' keys before encoding (services/streaming/pii.py), so no record on the
topic carries a user id, anonymous id, IP hash, user agent or personal property in clear.
Sealing runs in a worker thread (it may create keys, an fsynced SQLite write); a failure
to seal fails the batch with UNAVAILABLE, nothing of it produced.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from services.events.model import TrackedEvent
from services.platform.errors import FieldViolation, event_log_unavailable, invalid_request
from services.storage.event_store import events_to_table
from services.streaming.avro_envelope import EnvelopeError, envelope_key
from services.streaming.codec import encode_table
from services.streaming.pii import PiiSealer
from services.streaming.schemas import EnvelopeSchemaId, RegistryUnavailableError
from services.streaming.topics import TopicLayout, TopicLayoutError, ensure_topics

log = structlog.get_logger("bilten.streaming.kafka_log")

# Batches this large are encoded and handed to librdkafka in a worker thread, so the
# event loop keeps serving other RPCs meanwhile (~5 µs per event). ONE thread: batches
# encoded side by side only fight over the GIL (measured with 8 batches in flight:
# 33 µs of process CPU per event with the default pool, ~23 µs with one encoder); the
# broker round trips of the batches still overlap.
_THREAD_THRESHOLD = 200


@dataclass(frozen=True, slots=True)
class ProducerStatus:
    pending_events: int  # handed to the producer, not yet acknowledged or failed
    brokers_down: bool
    acknowledged_events: int
    failed_events: int
    schema_id: int | None


def producer_config(
    bootstrap: str, append_timeout_seconds: float, max_pending_events: int, extra: Mapping[str, Any]
) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "max.in.flight.requests.per.connection": 5,
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "partitioner": "murmur2_random",
        "message.timeout.ms": int(append_timeout_seconds * 1000),
        # Our own bound (max_pending_events) is the real limit; librdkafka's queue is
        # larger so `produce` never raises BufferError half-way through a batch.
        "queue.buffering.max.messages": min(2 * max_pending_events + 10_000, 10_000_000),
        "queue.buffering.max.kbytes": 2_097_151,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 1000,
        "socket.connection.setup.timeout.ms": 5000,
    }
    conf.update(extra)
    return conf


class _BatchAck:
    """Counts one batch's delivery reports (in the poller thread) and resolves a future
    on the event loop when the last one arrives."""

    __slots__ = ("error", "future", "lock", "loop", "on_done", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, on_done: Any) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.remaining = count
        self.error: str | None = None
        self.on_done = on_done
        # Delivery reports (poller thread) and `abandon` (producing thread) both count.
        self.lock = threading.Lock()

    def on_delivery(self, err: Any, _msg: Any) -> None:
        self._count(1, None if err is None else str(err))

    def abandon(self, count: int, error: str) -> None:
        """`count` messages never reached librdkafka (produce raised)."""
        self._count(count, error)

    def _count(self, count: int, error: str | None) -> None:
        with self.lock:
            if error is not None and self.error is None:
                self.error = error
            self.remaining -= count
            done = self.remaining == 0 and count > 0
        if done:
            self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        self.on_done(self)
        if not self.future.done():
            self.future.set_result(None)


class KafkaEventLog:
    """`EventLog` on a Kafka topic. Use from one event loop; `close()` flushes."""

    def __init__(
        self,
        *,
        bootstrap: str,
        layout: TopicLayout,
        schema_id: EnvelopeSchemaId,
        append_timeout_seconds: float = 10.0,
        max_pending_events: int = 200_000,
        client_config: Mapping[str, Any] | None = None,
        create_topics: bool = True,
        pii: PiiSealer | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._layout = layout
        self._topic = layout.events.name
        self._schema_id = schema_id
        self._append_timeout = append_timeout_seconds
        self.max_pending_events = max_pending_events
        self._client_config = dict(client_config or {})
        self._create_topics = create_topics
        self.pii = pii
        self._topics_ready = not create_topics
        self._producer: Any = None
        self._fatal: str | None = None
        self._brokers_down = False
        self._closing = False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._ready_lock = asyncio.Lock()
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-encode")
        self.pending_events = 0
        self.acknowledged_events = 0
        self.failed_events = 0
        # (monotonic time, events acknowledged) of recent batches, for retry advice.
        self._recent: list[tuple[float, int]] = []

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, timeout: float = 15.0) -> bool:
        """Creates missing topics and registers the envelope; False (logged) when Kafka
        or the registry is not reachable yet: appends retry that and answer UNAVAILABLE
        meanwhile, so a late broker or registry does not stop the service starting.
        Raises `TopicLayoutError` when the topic exists with another partition count."""
        try:
            await asyncio.wait_for(self._ready(), timeout)
            return True
        except TopicLayoutError:
            raise  # a configuration error, not an outage: refuse to start
        except Exception as exc:
            log.warning("kafka_event_log_not_ready", error=str(exc), bootstrap=self._bootstrap)
            return False

    def _ensure_producer(self) -> Any:
        from confluent_kafka import Producer

        if self._producer is not None and self._fatal is None:
            return self._producer
        if self._producer is not None:
            # A fatal error (e.g. the idempotent producer lost its sequence state after
            # broker data loss) makes this instance unusable: fail what it still holds
            # and start a fresh one with a new producer id.
            log.error("kafka_producer_replaced", reason=self._fatal)
            old = self._producer
            old.purge(in_queue=True, in_flight=True)
            old.flush(1)
            self._fatal = None
        conf = producer_config(
            self._bootstrap, self._append_timeout, self.max_pending_events, self._client_config
        )
        conf["error_cb"] = self._on_error
        self._producer = Producer(conf)
        if self._poller is None:
            self._poller = threading.Thread(
                target=self._poll, name="kafka-event-log-poller", daemon=True
            )
            self._poller.start()
        return self._producer

    async def _ready(self) -> None:
        async with self._ready_lock:
            self._ensure_producer()
            if not self._topics_ready:
                await asyncio.to_thread(self._create_missing_topics)
                self._topics_ready = True
            if self._schema_id.cached is None:
                await asyncio.to_thread(self._schema_id.get)

    def _create_missing_topics(self) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self._bootstrap, **self._client_config})
        ensure_topics(admin, self._layout, timeout=10)

    async def close(self, timeout: float = 30.0) -> None:
        """Stops taking appends and waits (up to `timeout`) for those in flight; what the
        broker has not acknowledged by then fails (its callers were not told otherwise)
        and the producer is released, so no client keeps reconnecting to a gone broker."""
        self._closing = True
        producer = self._producer
        if producer is not None:
            remaining = await asyncio.to_thread(producer.flush, timeout)
            if remaining:
                log.warning("kafka_event_log_closed_with_unacknowledged", messages=remaining)
                producer.purge(in_queue=True, in_flight=True)
                await asyncio.to_thread(producer.flush, 1.0)  # serves the purge callbacks
        self._stop.set()
        self._encoder.shutdown(wait=False)
        if self._poller is not None:
            await asyncio.to_thread(self._poller.join, 5)
            if not self._poller.is_alive():
                # Only once the poller is gone: destroying a producer another thread
                # still polls would crash the process.
                self._producer = None

    # --- librdkafka callbacks (poller thread) ----------------------------------------

    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.fatal():
            self._fatal = str(err)
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            if not self._brokers_down:
                log.warning("kafka_all_brokers_down", bootstrap=self._bootstrap)
            self._brokers_down = True
        else:
            log.warning("kafka_producer_error", error=str(err))

    def _poll(self) -> None:
        last_probe = 0.0
        while not self._stop.is_set():
            producer = self._producer
            if producer is None:
                time.sleep(0.05)
                continue
            producer.poll(0.05)
            now = time.monotonic()
            if self._brokers_down and now - last_probe >= 1.0:
                last_probe = now
                try:
                    # A metadata request makes librdkafka connect again; its success
                    # is the signal that appends may go through.
                    producer.list_topics(self._topic, timeout=1.0)
                    self._brokers_down = False
                    log.info("kafka_brokers_back", bootstrap=self._bootstrap)
                except Exception as exc:  # still down: probe again in a second
                    log.debug("kafka_probe_failed", error=str(exc))

    # --- appends ----------------------------------------------------------------------

    def status(self) -> ProducerStatus:
        return ProducerStatus(
            self.pending_events,
            self._brokers_down,
            self.acknowledged_events,
            self.failed_events,
            self._schema_id.cached,
        )

    def _retry_after_seconds(self) -> float:
        now = time.monotonic()
        self._recent = [(t, n) for t, n in self._recent if now - t < 10]
        acknowledged = sum(n for _, n in self._recent)
        if not acknowledged:
            return 1.0
        rate = acknowledged / max(0.5, now - self._recent[0][0])
        return min(5.0, max(0.05, self.pending_events / rate))

    def _on_batch_done(self, ack: _BatchAck, count: int) -> None:
        self.pending_events -= count
        if ack.error is None:
            self.acknowledged_events += count
            self._recent.append((time.monotonic(), count))
        else:
            self.failed_events += count

    async def append(self, events: Sequence[TrackedEvent]) -> None:
        """Returns once the broker acknowledged every event; raises `AnalyticsError`."""
        if not events:
            return
        if self._closing:
            raise event_log_unavailable("event log is shutting down; retry", 1.0)
        count = len(events)
        if count > self.max_pending_events:
            raise ValueError(
                f"a batch of {count} events exceeds max_pending_events ({self.max_pending_events})"
            )
        if self.pending_events + count > self.max_pending_events:
            retry = self._retry_after_seconds()
            raise event_log_unavailable(
                f"event log is full: {self.pending_events} events await Kafka's "
                f"acknowledgement (limit {self.max_pending_events}); retry in {retry:.2f} s",
                retry,
            )
        if self._brokers_down:
            raise event_log_unavailable("Kafka is unreachable; retry in 1 s", 1.0)
        try:
            await self._ready()
        except RegistryUnavailableError as exc:
            raise event_log_unavailable(f"{exc}; retry in 2 s", 2.0) from exc
        except Exception as exc:  # broker unreachable while creating topics
            raise event_log_unavailable(f"Kafka is not ready: {exc}; retry in 2 s", 2.0) from exc
        schema_id = self._schema_id.get()
        loop = asyncio.get_running_loop()
        ack = _BatchAck(loop, count, lambda done: self._on_batch_done(done, count))
        self.pending_events += count
        try:
            if count >= _THREAD_THRESHOLD or self.pii is not None:
                await loop.run_in_executor(self._encoder, self._produce, events, schema_id, ack)
            else:
                self._produce(events, schema_id, ack)
        except EnvelopeError as exc:
            # Raised before anything was produced. (`_produce` itself counts what it could
            # not hand over; a cancelled caller leaves the thread to finish the batch.)
            ack.abandon(count, str(exc))
            raise invalid_request([FieldViolation("events", str(exc))]) from exc
        # librdkafka reports every message within message.timeout.ms; the extra margin
        # only guards against a lost callback.
        await asyncio.wait_for(asyncio.shield(ack.future), self._append_timeout + 30)
        if ack.error is not None:
            raise event_log_unavailable(
                f"Kafka did not acknowledge the batch ({ack.error}); nothing of it was "
                "acknowledged to you, retry with the same event ids",
                1.0,
            )

    def _produce(self, events: Sequence[TrackedEvent], schema_id: int, ack: _BatchAck) -> None:
        try:
            table = events_to_table(events)
        except Exception as exc:  # pyarrow refuses revenue beyond DECIMAL(18,6)
            raise EnvelopeError(f"an event cannot be encoded: {exc}") from exc
        if self.pii is not None:
            try:
                table = self.pii.seal_table(table)
            except Exception as exc:  # key store or registry (personal fields) failing
                log.warning("pii_sealing_failed", error=str(exc))
                ack.abandon(len(events), f"sealing PII failed: {exc}")
                raise event_log_unavailable(
                    f"PII could not be sealed ({exc}); retry in 1 s", 1.0
                ) from exc
        payloads = encode_table(table, schema_id)
        producer = self._producer
        topic = self._topic
        on_delivery = ack.on_delivery
        produced = 0
        try:
            for event, payload in zip(events, payloads, strict=True):
                producer.produce(
                    topic,
                    payload,
                    envelope_key(event.tenant_id, event.event_id),
                    on_delivery=on_delivery,
                )
                produced += 1
        except BufferError as exc:
            ack.abandon(len(events) - produced, f"producer queue full: {exc}")
            raise event_log_unavailable("Kafka producer queue is full; retry in 1 s", 1.0) from exc
        except Exception as exc:
            ack.abandon(len(events) - produced, f"produce failed: {exc}")
            raise event_log_unavailable(f"Kafka producer failed: {exc}", 1.0) from exc
