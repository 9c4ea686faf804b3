"""The stream processor: a Kafka consumer group writing the events topic into the event store.

`bilten-analytics serve processor` runs it alone; `bilten-analytics up --event-log kafka`
runs it inside the one process that owns the DuckDB file (DuckDB lets one process open
it). Each worker thread is one member of the consumer group; members share the topic's
partitions and take over each other's partitions on a rebalance.

Exactly-once effect (each record of the topic stored once, whatever crashes):
the store is the source of truth for how far each partition has been read. A batch's rows
and the partitions' next offsets commit in ONE DuckDB transaction
(`DuckDBEventStore.append_table(rows, stream_offsets)`), and on (re)assignment a member
seeks to the offsets in the store, never to the ones committed to Kafka. A crash before
the commit loses the batch and the offsets together, so the records are read again; a
crash after it keeps both, so they are not. Kafka's committed offsets are written after
each store commit only so that lag is visible to standard tooling and to the
`GetPipelineStatus` RPC.
A member that lost its partitions without knowing (a long pause past the session timeout)
cannot write a batch the new owner also writes: the offset update is a compare-and-set
against the offsets the member last read (`StaleStreamOffsetError` → it drops its batch
and re-reads the offsets).

Beyond the topic: the same event id can be in the topic twice (a client retried after a
timeout whose batch had landed; an ingestion process died after Kafka's ack and before
its answer). The processor drops an event whose (tenant_id, event_id) it stored within
`dedup_window_seconds`, the same rule Pinot's dedupConfig applies; the window is warmed
from the store at start and only updated after a commit.

Records that cannot be stored go to the dead-letter topic, unchanged, with the reason in
headers (`bilten.dlq.reason`, `bilten.dlq.source.{topic,partition,offset}`,
`bilten.dlq.schema_id`): no Confluent framing, an unknown schema id, an Avro body that
does not decode with its writer schema, or values the model refuses (unknown event type,
empty ids, properties that are not a JSON object). They are acknowledged by the broker
BEFORE the batch's offsets move past them, so none is lost; a crash in between can write
one twice to the dead-letter topic (its source offset headers identify the copy).
Failures that are not the record's fault (registry or store unreachable) never
dead-letter: the member pauses its partitions and retries with backoff, and the lag
metric shows the stall.

Sealed PII (crypto-shredding, docs/compliance.md): with `pii=PiiOpener(...)` the
processor opens each record's sealed fields with the subject keys before the store
commit. A record whose key was destroyed (its subject was erased) is stored anonymised
(no user / anonymous id, IP hash or user agent, personal properties dropped; counted in
`anonymised_events`), never dead-lettered and never lost; one whose ciphertext does not
open with an existing key is stored the same way and counted in `unreadable_pii_events`.
A batch holds a key-store lease from decryption to commit, so an erasure (which destroys
the key, then deletes the store's rows) waits for it instead of racing it.

Erased subjects (cluster shape, services/compliance/erasure_hosts.py): with
`erased=ErasedSubjects()` the rows of subjects erased after they were received are dropped
before the store commit (their offsets still advance), under a lease of their own, so an
erasure applied on this host cannot be undone by a record still in the topic.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import structlog

from services.compliance.erasure_hosts import ErasedSubjects
from services.storage.event_store import (
    EVENT_ARROW_SCHEMA,
    StaleStreamOffsetError,
    StreamOffset,
)
from services.streaming.avro_envelope import HEADER_SIZE
from services.streaming.codec import SEALED_SCHEMA, Frames, decode_frames, decode_resolved
from services.streaming.live import LiveFeed
from services.streaming.pii import PiiOpener
from services.streaming.schemas import RegistryUnavailableError, UnknownSchemaError, WriterSchemas

log = structlog.get_logger("bilten.streaming.processor")

DLQ_REASON = "bilten.dlq.reason"
DLQ_SOURCE_TOPIC = "bilten.dlq.source.topic"
DLQ_SOURCE_PARTITION = "bilten.dlq.source.partition"
DLQ_SOURCE_OFFSET = "bilten.dlq.source.offset"
DLQ_SCHEMA_ID = "bilten.dlq.schema_id"


_FETCH_MESSAGES = 2_000  # records per consume() call


class OffsetStore(Protocol):
    """What the processor needs of the event store (`DuckDBEventStore` has it)."""

    def append_table(
        self, table: pa.Table, stream_offsets: Sequence[StreamOffset] = ()
    ) -> None: ...

    def stream_offsets(self, topic: str) -> dict[int, int]: ...

    def event_ids_since(self, since: datetime) -> Iterator[tuple[str, str]]: ...


@dataclass(frozen=True)
class ProcessorConfig:
    bootstrap: str
    topic: str
    dead_letter_topic: str
    group_id: str = "bilten-processor"
    workers: int = 1
    # DuckDB's row group size: a batch that fills whole row groups is written straight to
    # the database file; a smaller one goes to the WAL and is written again at the next
    # checkpoint. Measured: 4.1 us of commit CPU per event at 122,880 events per batch,
    # 9.2 us at 50,000 (docs/benchmarks-streaming.md). Only backlogs fill a batch; live
    # traffic is committed every `max_batch_seconds`.
    max_batch_events: int = 122_880
    # Upper bound on how long a record waits in memory before its batch commits: with
    # the commit time it bounds freshness (acknowledged → visible in a query).
    max_batch_seconds: float = 0.2
    # While the topic holds a backlog (the last fetch came back full), the batch fills to
    # max_batch_events for up to this long instead: those records' freshness is already
    # lost, and full batches commit at half the CPU per event.
    backlog_batch_seconds: float = 2.0
    session_timeout_ms: int = 10_000
    # Static group membership (KIP-345): a restarted member with the same id gets its
    # partitions back at once instead of after the session timeout. "" = dynamic.
    instance_id: str = ""
    client_config: Mapping[str, Any] = field(default_factory=dict)
    dedup_window_seconds: float = 86_400
    dedup_max_ids: int = 5_000_000


@dataclass
class ProcessorStats:
    batches: int = 0
    largest_batch_records: int = 0  # records (offsets) one commit covered, at most
    stored_events: int = 0
    duplicate_events: int = 0
    dead_lettered: int = 0
    stale_batches: int = 0
    retries: int = 0
    sealed_events: int = 0  # records that carried sealed PII
    anonymised_events: int = 0  # ... whose subject key was destroyed: stored without PII
    unreadable_pii_events: int = 0  # ... whose ciphertext did not open: stored without PII
    last_commit_seconds: float = 0.0
    last_commit_at: float = 0.0


def dedup_keys(
    tenant_ids: pa.Array | pa.ChunkedArray, event_ids: pa.Array | pa.ChunkedArray
) -> list[bytes]:
    """One hashable key per (tenant_id, event_id), built in C++ and cheaper to hash than
    a tuple of two str: `<tenant id byte length>:<tenant id>:<event id>`. The length
    prefix keeps it unambiguous whatever bytes the ids contain."""
    tenants = tenant_ids.cast(pa.binary())
    lengths = pc.binary_length(tenants).cast(pa.string()).cast(pa.binary())
    joined = pc.binary_join_element_wise(lengths, tenants, event_ids.cast(pa.binary()), b":")
    return list(joined.to_pylist())


class SharedDedup:
    """(tenant_id, event_id) stored within the last `window_seconds`, shared by the
    members of one process (thread-safe). Keys are `dedup_keys` values.

    Set operations rather than a per-id loop: the common batch has no duplicate, which
    one C-level set intersection establishes. Ids expire by commit batch, oldest first;
    past `max_ids` the oldest batches leave early (counted in `early_evictions`).
    """

    def __init__(self, window_seconds: float, max_ids: int) -> None:
        self.window_seconds = window_seconds
        self.max_ids = max_ids
        self.early_evictions = 0
        self._ids: set[bytes] = set()
        self._batches: deque[tuple[float, list[bytes]]] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def warm(self, ids: list[tuple[str, str]], at: float) -> None:
        """Adds (tenant_id, event_id) pairs read from the store."""
        tenants, events = zip(*ids, strict=True) if ids else ((), ())
        self.add(dedup_keys(pa.array(tenants, pa.string()), pa.array(events, pa.string())), at)

    def filter_new(self, keys: list[bytes], now: float) -> np.ndarray:
        """Mask of the keys neither stored within the window nor earlier in `keys`."""
        keep = np.ones(len(keys), dtype=bool)
        if self.window_seconds <= 0:
            known: set[bytes] = set()
        else:
            with self._lock:
                self._expire(now)
                known = self._ids.intersection(keys)
        if not known and len(set(keys)) == len(keys):
            return keep
        seen: set[bytes] = set()
        for row, key in enumerate(keys):
            if key in known or key in seen:
                keep[row] = False
            else:
                seen.add(key)
        return keep

    def add(self, keys: list[bytes], now: float) -> None:
        if self.window_seconds <= 0 or not keys:
            return
        with self._lock:
            self._ids.update(keys)
            self._batches.append((now, keys))
            self._expire(now)

    def remove(self, keys: list[bytes]) -> None:
        """Takes back keys added for a commit that then failed."""
        with self._lock:
            self._ids.difference_update(keys)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_seconds
        while self._batches and (self._batches[0][0] < horizon or len(self._ids) > self.max_ids):
            at, keys = self._batches.popleft()
            if at >= horizon:
                self.early_evictions += len(keys)
            self._ids.difference_update(keys)


class _TransientError(RuntimeError):
    """Not the records' fault: retry the same batch later."""


class StreamProcessor:
    """Runs `config.workers` consumer-group members in threads over one store."""

    def __init__(
        self,
        config: ProcessorConfig,
        store: OffsetStore,
        schemas: WriterSchemas,
        live: LiveFeed | None = None,
        dedup: SharedDedup | None = None,
        pii: PiiOpener | None = None,
        erased: ErasedSubjects | None = None,
    ) -> None:
        self.config = config
        self.pii = pii
        self.erased = erased
        self.store = store
        self.schemas = schemas
        self.live = live
        self.dedup = dedup or SharedDedup(config.dedup_window_seconds, config.dedup_max_ids)
        self._warm = dedup is None
        self.stats = ProcessorStats()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[_Member] = []
        self._threads: list[threading.Thread] = []
        self._dlq_producer: Any = None
        self._dlq_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        if self._warm and self.config.dedup_window_seconds > 0:
            since = datetime.now(UTC) - timedelta(seconds=self.config.dedup_window_seconds)
            self.dedup.warm(list(self.store.event_ids_since(since)), time.time())
        for index in range(self.config.workers):
            member = _Member(self, index)
            thread = threading.Thread(
                target=member.run, name=f"stream-processor-{index}", daemon=True
            )
            self._workers.append(member)
            self._threads.append(thread)
            thread.start()
        log.info(
            "stream_processor_started",
            topic=self.config.topic,
            group=self.config.group_id,
            workers=self.config.workers,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Commits what each member holds, leaves the group, and waits for the threads."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        if self._dlq_producer is not None:
            self._dlq_producer.flush(max(0.1, deadline - time.monotonic()))

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def lag(self) -> dict[int, int]:
        """{partition: records in Kafka not yet in the store} of the partitions this
        process holds (from the last fetch's high watermark)."""
        lag: dict[int, int] = {}
        for member in self._workers:
            lag.update(member.lag)
        return lag

    def count(self, **increments: float) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    # --- dead letters ---------------------------------------------------------------

    def dead_letter(self, records: Sequence[tuple[Any, str, int | None]]) -> None:
        """Writes (message, reason, schema id) records to the dead-letter topic and waits
        for the broker's acknowledgement; `_TransientError` if it does not come."""
        if not records:
            return
        from confluent_kafka import Producer

        with self._dlq_lock:
            if self._dlq_producer is None:
                self._dlq_producer = Producer(
                    {
                        "bootstrap.servers": self.config.bootstrap,
                        "enable.idempotence": True,
                        "acks": "all",
                        "linger.ms": 5,
                        "message.timeout.ms": 30_000,
                        **self.config.client_config,
                    }
                )
            producer = self._dlq_producer
        failures: list[str] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for message, reason, schema_id in records:
            headers = [
                (DLQ_REASON, reason.encode()),
                (DLQ_SOURCE_TOPIC, message.topic().encode()),
                (DLQ_SOURCE_PARTITION, str(message.partition()).encode()),
                (DLQ_SOURCE_OFFSET, str(message.offset()).encode()),
            ]
            if schema_id is not None:
                headers.append((DLQ_SCHEMA_ID, str(schema_id).encode()))
            producer.produce(
                self.config.dead_letter_topic,
                message.value(),
                message.key(),
                headers=headers,
                on_delivery=on_delivery,
            )
        remaining = producer.flush(35)
        if remaining or failures:
            raise _TransientError(
                f"dead-letter topic did not acknowledge {remaining or len(failures)} records "
                f"({failures[:1]})"
            )
        self.count(dead_lettered=len(records))
        for message, reason, _ in records:
            log.warning(
                "record_dead_lettered",
                topic=message.topic(),
                partition=message.partition(),
                offset=message.offset(),
                reason=reason,
            )


@dataclass
class _Prepared:
    """A batch decoded, deduplicated and dead-lettered, ready to commit."""

    table: pa.Table
    keys: list[bytes]
    offsets: list[StreamOffset]
    next_offsets: dict[int, int]
    duplicates: int
    started: float
    now: float
    lease: int | None = None  # key-store lease held from decryption to commit
    erased_lease: int | None = None  # ErasedSubjects lease held from the filter to commit
    pii_counts: dict[str, int] = field(default_factory=dict)  # counted after the commit
    records: int = 0  # topic records the batch covers (stored, duplicate or dead-lettered)


class _Member:
    """One consumer-group member; all of its state is touched by its own thread only
    (rebalance callbacks run inside `consume`, on that thread).

    Pipelined: while batch N commits in the member's committer thread (DuckDB releases
    the GIL), the member consumes and decodes batch N+1, whose expected offsets and
    dedup assume N commits. If N fails, N+1 is dropped, the keys of N are taken back and
    the member re-reads from the store's offsets; the compare-and-set of the offsets
    makes a wrong assumption unable to write anything.
    """

    def __init__(self, processor: StreamProcessor, index: int) -> None:
        self.processor = processor
        self.config = processor.config
        self.index = index
        self.positions: dict[int, int | None] = {}  # stored next offset per owned partition
        self.accept_from: dict[int, int] = {}  # lowest offset still to take per partition
        self.pending: list[Any] = []
        self.pending_since = 0.0
        self.lag: dict[int, int] = {}
        self.paused = False
        self.retry_at = 0.0
        self.backoff = 0.1
        self.consumer: Any = None
        # (partition, offset) already acknowledged by the dead-letter topic for the batch
        # being retried, so a retry does not write them twice.
        self.dead_lettered: set[tuple[int, int]] = set()
        self.committer = ThreadPoolExecutor(1, thread_name_prefix=f"store-commit-{index}")
        self.inflight: tuple[_Prepared, Future[None]] | None = None

    def _consumer_config(self) -> dict[str, Any]:
        session = self.config.session_timeout_ms
        conf: dict[str, Any] = {
            "bootstrap.servers": self.config.bootstrap,
            "group.id": self.config.group_id,
            "client.id": f"{self.config.group_id}-{self.index}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            # Only records of committed producer transactions; our producer is not
            # transactional, but other producers of the topic may be.
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": session,
            "heartbeat.interval.ms": max(500, min(3000, session // 3)),
            "fetch.wait.max.ms": 50,
            "queued.max.messages.kbytes": 65_536,
            # librdkafka waits fetch.queue.backoff.ms (1 s by default) before fetching a
            # partition again once its local queue was full: a processor draining a
            # backlog faster than that stalls. 8 MiB per partition per fetch fills a
            # 50,000-event batch in one round trip. Measured: 207k -> 438k records/s
            # consumed alone (docs/benchmarks-streaming.md).
            "fetch.queue.backoff.ms": 10,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            **self.config.client_config,
        }
        if self.config.instance_id:
            conf["group.instance.id"] = f"{self.config.instance_id}-{self.index}"
        return conf

    # --- rebalance callbacks --------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        stored = self.processor.store.stream_offsets(self.config.topic)
        for tp in partitions:
            offset = stored.get(tp.partition)
            self.positions[tp.partition] = offset
            self.accept_from[tp.partition] = offset if offset is not None else 0
            tp.offset = offset if offset is not None else OFFSET_BEGINNING
        consumer.incremental_assign(partitions)
        # Kafka's committed offsets only mirror the store's (for lag figures); a crash
        # between a store commit and its Kafka commit leaves Kafka behind, and with no
        # new records on the partition it would stay behind. Mirror them now.
        known = [
            TopicPartition(self.config.topic, tp.partition, stored[tp.partition])
            for tp in partitions
            if tp.partition in stored
        ]
        if known:
            try:
                consumer.commit(offsets=known, asynchronous=True)
            except Exception as exc:  # only the lag figure depends on it
                log.warning("kafka_offset_commit_failed", error=str(exc))
        if self.paused:
            consumer.pause(partitions)
        log.info(
            "partitions_assigned",
            member=self.index,
            partitions={tp.partition: tp.offset for tp in partitions},
        )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # Hand over cleanly: what we hold is committed now, so the next owner starts
        # right after it. If that fails, the next owner reads it again from the store's
        # offsets: nothing is lost either way.
        try:
            self._flush()
            self._settle()
        except Exception as exc:
            log.warning("flush_on_revoke_failed", error=str(exc))
        self._forget([tp.partition for tp in partitions])
        consumer.incremental_unassign(partitions)
        log.info(
            "partitions_revoked", member=self.index, partitions=[tp.partition for tp in partitions]
        )

    def _on_lost(self, consumer: Any, partitions: list[Any]) -> None:
        # Someone else owns them already: what we hold must not be written (a commit in
        # flight either lands before the new owner's first one, or fails the CAS).
        try:
            self._settle()
        except Exception as exc:
            log.warning("commit_in_flight_failed", error=str(exc))
        self._forget([tp.partition for tp in partitions])
        consumer.incremental_unassign(partitions)
        log.warning(
            "partitions_lost", member=self.index, partitions=[tp.partition for tp in partitions]
        )

    def _forget(self, partitions: list[int]) -> None:
        gone = set(partitions)
        self.pending = [m for m in self.pending if m.partition() not in gone]
        for partition in gone:
            self.positions.pop(partition, None)
            self.accept_from.pop(partition, None)
            self.lag.pop(partition, None)

    # --- main loop ------------------------------------------------------------------

    def run(self) -> None:
        from confluent_kafka import Consumer, KafkaError

        stop = self.processor._stop
        self.consumer = consumer = Consumer(self._consumer_config())
        consumer.subscribe(
            [self.config.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        last_lag = 0.0
        try:
            while not stop.is_set():
                messages = consumer.consume(num_messages=_FETCH_MESSAGES, timeout=0.05)
                # A full fetch means records wait in the topic (a backlog): their freshness
                # is already lost, so the batch fills up to max_batch_events (a full row
                # group commits at half the CPU per event) within a longer time bound.
                backlog = len(messages) >= _FETCH_MESSAGES
                for message in messages:
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer_error", member=self.index, error=str(error))
                        continue
                    partition = message.partition()
                    offset = message.offset()
                    if partition is None or offset is None:
                        continue
                    start = self.accept_from.get(partition)
                    if start is None or offset < start:
                        continue  # not ours any more, or already in the store
                    self.accept_from[partition] = offset + 1
                    if not self.pending:
                        self.pending_since = time.monotonic()
                    self.pending.append(message)
                now = time.monotonic()
                if self.inflight is not None and self.inflight[1].done():
                    self._flush_or_back_off(settle_only=True)  # publish it promptly
                if (
                    self.pending
                    and now >= self.retry_at
                    and (
                        len(self.pending) >= self.config.max_batch_events
                        or now - self.pending_since
                        >= (
                            self.config.backlog_batch_seconds
                            if backlog
                            else self.config.max_batch_seconds
                        )
                        or self.paused
                    )
                ):
                    self._flush_or_back_off()
                elif self.paused and not self.pending and now >= self.retry_at:
                    self._resume()
                if now - last_lag >= 0.5:
                    last_lag = now
                    self._update_lag()
            # Commit what is held, a full batch at a time (a failure leaves the rest to be
            # read again by whoever gets the partitions next).
            for _ in range(len(self.pending) // self.config.max_batch_events + 1):
                self._flush_or_back_off()
                if not self.pending or self.paused:
                    break
            self._flush_or_back_off(settle_only=True)
        except Exception:
            log.exception("stream_processor_member_crashed", member=self.index)
            raise
        finally:
            consumer.close()  # commits nothing (auto commit off); leaves the group
            self.committer.shutdown(wait=True)

    def _update_lag(self) -> None:
        from confluent_kafka import TopicPartition

        for partition, position in list(self.positions.items()):
            try:
                low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.config.topic, partition), cached=True
                )
            except Exception as exc:  # not fetched yet: no figure this round
                log.debug("watermark_unavailable", partition=partition, error=str(exc))
                continue
            if high < 0:
                continue
            done = position if position is not None else max(low, 0)
            self.lag[partition] = max(0, high - done)

    def _resume(self) -> None:
        self.consumer.resume(self.consumer.assignment())
        self.paused = False

    def _flush_or_back_off(self, settle_only: bool = False) -> None:
        try:
            if settle_only:
                self._settle()
                return
            self._flush()
        except _TransientError as exc:
            self.processor.count(retries=1)
            log.warning("batch_retry", member=self.index, error=str(exc), in_seconds=self.backoff)
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(5.0, self.backoff * 2)
            if not self.paused:
                # Stop fetching while stuck, but keep polling so the group keeps us.
                self.consumer.pause(self.consumer.assignment())
                self.paused = True
            return
        self.backoff = 0.1
        if self.paused:
            self._resume()

    # --- one batch ------------------------------------------------------------------

    def _flush(self) -> None:
        """Prepares the pending batch, waits for the commit in flight, submits this one."""
        prepared = None
        if self.pending:
            # Exactly max_batch_events at most, the rest waits for the next batch: a fetch
            # overshooting a full row group by a few records would leave a small row group
            # behind each batch, and DuckDB's checkpoint later merges those (measured: a
            # 1 s commit stall after four 124,000-event batches, none after 122,880).
            limit = self.config.max_batch_events
            batch = self.pending[:limit]
            prepared = self._prepare(batch)  # raises before changing anything
            self.pending = self.pending[limit:]
            if self.pending:
                self.pending_since = time.monotonic()
        try:
            settled = self._settle()
        except BaseException:
            if prepared is not None:
                self._release(prepared)
            raise
        if not settled:
            if prepared is not None:
                self._release(prepared)
            return  # the previous batch was stale: this one was built on it, drop it
        if prepared is not None:
            self._submit(prepared)

    def _release(self, prepared: _Prepared) -> None:
        if prepared.lease is not None and self.processor.pii is not None:
            self.processor.pii.cipher.keys.release_lease(prepared.lease)
            prepared.lease = None
        if prepared.erased_lease is not None and self.processor.erased is not None:
            self.processor.erased.release(prepared.erased_lease)
            prepared.erased_lease = None

    def _submit(self, prepared: _Prepared) -> None:
        # Optimistic: the next batch is prepared as if this one commits.
        for partition, offset in prepared.next_offsets.items():
            self.positions[partition] = offset
        self.processor.dedup.add(prepared.keys, prepared.now)
        future = self.committer.submit(
            self.processor.store.append_table, prepared.table, prepared.offsets
        )
        self.inflight = (prepared, future)

    def _settle(self) -> bool:
        """Waits for the commit in flight and finishes it. False when it was stale (the
        member re-read the store's offsets); `_TransientError` when it failed otherwise."""
        if self.inflight is None:
            return True
        prepared, future = self.inflight
        self.inflight = None
        try:
            future.result()
        except Exception as exc:
            self._release(prepared)
            processor = self.processor
            processor.dedup.remove(prepared.keys)
            self.pending = []
            try:
                self._resync()
            except Exception as resync_error:  # the store is unusable: the CAS guards us
                log.warning("resync_failed", error=str(resync_error))
            if isinstance(exc, StaleStreamOffsetError):
                processor.count(stale_batches=1)
                log.warning("stale_batch_dropped", member=self.index, error=str(exc))
                return False
            raise _TransientError(f"event store did not commit the batch: {exc}") from exc
        self._release(prepared)
        self._committed(prepared)
        return True

    def _resync(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        stored = self.processor.store.stream_offsets(self.config.topic)
        for partition in list(self.positions):
            offset = stored.get(partition)
            self.positions[partition] = offset
            self.accept_from[partition] = offset if offset is not None else 0
            try:
                self.consumer.seek(
                    TopicPartition(
                        self.config.topic,
                        partition,
                        offset if offset is not None else OFFSET_BEGINNING,
                    )
                )
            except Exception as exc:  # not fetching it yet: the next assign seeks anyway
                log.warning("seek_failed", partition=partition, error=str(exc))

    def _prepare(self, batch: list[Any]) -> _Prepared:
        started = time.perf_counter()
        processor = self.processor
        table, sealed, rejected = self._decode(batch)
        lease: int | None = None
        erased_lease: int | None = None
        try:
            table, lease, counts = self._open_pii(table, sealed)
            if processor.erased is not None:
                # Taken before the filter reads the erased set, so an erasure applied on
                # this host meanwhile waits for this batch's commit before it deletes.
                erased_lease = processor.erased.acquire()
                table = processor.erased.drop_erased(table)
            prepared = self._prepare_rest(batch, table, rejected, started, lease)
            prepared.pii_counts = counts
            prepared.erased_lease = erased_lease
            return prepared
        except BaseException:
            if lease is not None and processor.pii is not None:
                processor.pii.cipher.keys.release_lease(lease)
            if erased_lease is not None and processor.erased is not None:
                processor.erased.release(erased_lease)
            raise

    def _open_pii(
        self, table: pa.Table, sealed: pa.Table
    ) -> tuple[pa.Table, int | None, dict[str, int]]:
        """The batch with its sealed PII opened (or removed), the lease taken, counts."""
        processor = self.processor
        if sealed.num_rows == 0 or not any(sealed.column("pii_key_ids").to_pylist()):
            return table, None, {}
        if processor.pii is None:
            # A processor without the key store cannot open them: the rows are stored
            # without PII (their clear id columns are empty), never lost.
            count = sum(1 for k in sealed.column("pii_key_ids").to_pylist() if k)
            log.warning("sealed_pii_without_key_store", events=count)
            return table, None, {"sealed_events": count, "anonymised_events": count}
        keys = processor.pii.cipher.keys
        lease = keys.acquire_lease()
        try:
            result = processor.pii.open_table(table, sealed)
        except BaseException:
            keys.release_lease(lease)
            raise
        if result.unreadable_events:
            log.warning("sealed_pii_unreadable", events=result.unreadable_events)
        counts = {
            "sealed_events": result.sealed_events,
            "anonymised_events": result.anonymised_events,
            "unreadable_pii_events": result.unreadable_events,
        }
        return result.table, lease, counts

    def _prepare_rest(
        self,
        batch: list[Any],
        table: pa.Table,
        rejected: list[tuple[Any, str, int | None]],
        started: float,
        lease: int | None,
    ) -> _Prepared:
        processor = self.processor
        now = time.time()
        keys = dedup_keys(table.column("tenant_id"), table.column("event_id"))
        keep = processor.dedup.filter_new(keys, now)
        duplicates = int(len(keep) - keep.sum())
        if duplicates:
            table = table.filter(pa.array(keep))
            keys = [key for key, kept in zip(keys, keep.tolist(), strict=True) if kept]
        fresh = [r for r in rejected if (r[0].partition(), r[0].offset()) not in self.dead_lettered]
        processor.dead_letter(fresh)
        self.dead_lettered.update((r[0].partition(), r[0].offset()) for r in fresh)
        next_offsets: dict[int, int] = {}
        for message in batch:
            partition = message.partition()
            next_offsets[partition] = max(next_offsets.get(partition, 0), message.offset() + 1)
        offsets = [
            StreamOffset(self.config.topic, partition, self.positions.get(partition), offset)
            for partition, offset in sorted(next_offsets.items())
        ]
        return _Prepared(
            table, keys, offsets, next_offsets, duplicates, started, now, lease, records=len(batch)
        )

    def _committed(self, prepared: _Prepared) -> None:
        """After the store commit: Kafka's offsets (lag figures), live feed, counters."""
        from confluent_kafka import TopicPartition

        processor = self.processor
        self.dead_lettered = {
            (p, o) for p, o in self.dead_lettered if o >= prepared.next_offsets.get(p, 0)
        }
        try:
            self.consumer.commit(
                offsets=[
                    TopicPartition(self.config.topic, p, o)
                    for p, o in prepared.next_offsets.items()
                ],
                asynchronous=True,
            )
        except Exception as exc:  # only the lag figure depends on it
            log.warning("kafka_offset_commit_failed", error=str(exc))
        if processor.live is not None:
            processor.live.publish(prepared.table)
        processor.count(
            batches=1,
            stored_events=prepared.table.num_rows,
            duplicate_events=prepared.duplicates,
            **prepared.pii_counts,
        )
        with processor._stats_lock:
            processor.stats.largest_batch_records = max(
                processor.stats.largest_batch_records, prepared.records
            )
        processor.stats.last_commit_seconds = time.perf_counter() - prepared.started
        processor.stats.last_commit_at = time.time()

    def _decode(
        self, batch: list[Any]
    ) -> tuple[pa.Table, pa.Table, list[tuple[Any, str, int | None]]]:
        """Rows of the decodable, valid records and their sealed-PII columns;
        (message, reason, schema id) of the rest."""
        rejected: list[tuple[Any, str, int | None]] = []
        values = [message.value() for message in batch]
        frames = Frames(values)
        schema_ids = frames.schema_ids()
        for index in np.flatnonzero(schema_ids < 0).tolist():
            rejected.append(
                (batch[index], "not in the Confluent wire format (no magic byte 0)", None)
            )
        tables: list[pa.Table] = []
        sealed: list[pa.Table] = []
        for schema_id in np.unique(schema_ids[schema_ids >= 0]).tolist():
            rows = np.flatnonzero(schema_ids == schema_id)
            try:
                writer = self.processor.schemas.get(schema_id)
            except UnknownSchemaError as exc:
                rejected.extend(
                    (batch[i], f"unknown writer schema: {exc}", schema_id) for i in rows.tolist()
                )
                continue
            except RegistryUnavailableError as exc:
                raise _TransientError(str(exc)) from exc
            if writer.is_envelope:
                whole = len(rows) == frames.count
                decoded = decode_frames(frames, None if whole else rows, HEADER_SIZE)
            else:
                bodies = [memoryview(values[i])[HEADER_SIZE:] for i in rows.tolist()]
                decoded = decode_resolved(
                    bodies, writer.parsed, self.processor.schemas.reader_schema
                )
            tables.append(decoded.table)
            sealed.append(decoded.sealed)
            rejected.extend(
                (batch[int(rows[i])], reason, schema_id) for i, reason in decoded.rejected
            )
        table = pa.concat_tables(tables) if tables else EVENT_ARROW_SCHEMA.empty_table()
        seals = pa.concat_tables(sealed) if sealed else SEALED_SCHEMA.empty_table()
        return table, seals, rejected
