"""Faults against the real broker, with the real processes:

- `kill -9` of `bilten-analytics serve processor` mid-stream, restarted: the store holds
  every produced event exactly once;
- the broker stopped and restarted during ingestion (a private broker): every event
  acknowledged to the client ends up stored; the others were reported failed;
- `kill -9` of `bilten-analytics serve ingestion` mid-batch: every acknowledged event is
  in Kafka.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from confluent_kafka.admin import AdminClient
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.storage.event_store import DuckDBEventStore
from services.streaming.avro_envelope import HEADER_SIZE
from services.streaming.codec import decode_bodies
from services.streaming.kafka_log import KafkaEventLog
from services.streaming.schemas import EnvelopeSchemaId
from services.streaming.status import read_group_lag
from services.streaming.topics import TopicLayout, ensure_topics
from tests.conftest import free_port, tracked_event
from tests.streaming.conftest import (
    REGISTRY_TOKEN,
    REPO,
    PrivateBroker,
    consume_all,
    event,
    make_layout,
)
from tests.streaming.test_processor import processor_for, wait_for

pytestmark = pytest.mark.kafka


def platform_env(
    data_dir: Path, bootstrap: str, topic: str, registry_url: str, **extra: str
) -> dict[str, str]:
    return {
        **os.environ,
        "BILTEN_DATA_DIR": str(data_dir),
        "BILTEN_GRPC_PORT": str(free_port()),
        "BILTEN_METRICS_PORT": "0",
        "BILTEN_EVENT_LOG": "kafka",
        "BILTEN_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "BILTEN_KAFKA_EVENTS_TOPIC": topic,
        "BILTEN_KAFKA_EVENTS_PARTITIONS": "3",
        "BILTEN_SCHEMA_REGISTRY_URL": registry_url,
        "BILTEN_SCHEMA_REGISTRY_TOKEN": REGISTRY_TOKEN,
        "BILTEN_PROCESSOR_SESSION_TIMEOUT_MS": "6000",
        **extra,
    }


def spawn(service: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", service],
        cwd=REPO,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def committed(admin: AdminClient, group: str, topic: str) -> int:
    return sum(p.committed_offset or 0 for p in read_group_lag(admin, group, topic))


def progressed(
    admin: AdminClient, group: str, topic: str, threshold: int, process: subprocess.Popen[bytes]
) -> Callable[[], bool]:
    """True once the group committed `threshold` records, or the process died."""
    return lambda: committed(admin, group, topic) >= threshold or process.poll() is not None


def test_processor_killed_with_sigkill_mid_stream_stores_each_event_exactly_once(
    kafka_bootstrap: str, registry_url: str, topics: Callable[..., TopicLayout], tmp_path: Path
) -> None:
    layout = topics(partitions=3)
    topic = layout.events.name
    group = f"test-kill-{uuid.uuid4().hex[:8]}"
    env = platform_env(
        tmp_path / "data",
        kafka_bootstrap,
        topic,
        registry_url,
        BILTEN_PROCESSOR_GROUP_ID=group,
        # Static membership: the restarted process gets its partitions back at once.
        BILTEN_PROCESSOR_INSTANCE_ID="kill-test",
        # Small batches: many commits, so a kill lands around commits.
        BILTEN_PROCESSOR_MAX_BATCH_EVENTS="1500",
        BILTEN_PROCESSOR_MAX_BATCH_SECONDS="0.05",
        # Dedup off: a replayed record would be stored twice, so only the offsets that
        # commit with the rows can make the count come out right.
        BILTEN_DEDUP_WINDOW_SECONDS="0",
    )
    total = 16_000
    acknowledged = 0

    async def produce_all() -> None:
        nonlocal acknowledged
        log = KafkaEventLog(
            bootstrap=kafka_bootstrap,
            layout=layout,
            schema_id=EnvelopeSchemaId(registry_url, REGISTRY_TOKEN, topic),
        )
        for start in range(0, total, 1000):
            await log.append([event(i) for i in range(start, start + 1000)])
            acknowledged += 1000
            await asyncio.sleep(0.1)
        await log.close()

    producer = threading.Thread(target=lambda: asyncio.run(produce_all()))
    producer.start()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    log_path = tmp_path / "processor.log"
    kills = 0
    try:
        for threshold in (3_000, 9_000):
            process = spawn("processor", env, log_path)
            try:
                wait_for(
                    progressed(admin, group, topic, threshold, process),
                    timeout=240,  # includes the process start: imports alone take a minute on a busy box
                    what=f"processor progress past {threshold}",
                )
                assert process.poll() is None, log_path.read_text()[-3000:]
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait(30)
                kills += 1
        producer.join(120)
        assert acknowledged == total
        process = spawn("processor", env, log_path)
        try:
            try:
                wait_for(
                    lambda: committed(admin, group, topic) >= total or process.poll() is not None,
                    timeout=240,
                    what="the restarted processor to catch up",
                )
            except AssertionError as timed_out:
                # What the process was doing: its log, and the group's committed offsets.
                lag = [
                    (p.partition, p.committed_offset) for p in read_group_lag(admin, group, topic)
                ]
                raise AssertionError(
                    f"{timed_out}; committed {lag}; log:\n{log_path.read_text()[-6000:]}"
                ) from None
            assert process.poll() is None, log_path.read_text()[-3000:]
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        producer.join(5)
    with DuckDBEventStore(tmp_path / "data" / "events.duckdb") as store:
        rows = store.read(
            "SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM tracked_events"
        ).to_pylist()[0]
        offsets = store.stream_offsets(topic)
    assert kills == 2
    assert rows == {"n": total, "ids": total}
    assert sum(offsets.values()) == total


def _retry_delay(error: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToTimedelta().total_seconds()
    return None


async def test_broker_restart_during_ingestion_loses_no_acknowledged_event(
    private_broker: PrivateBroker, registry_url: str, tmp_path: Path
) -> None:
    """Ingestion over gRPC (in process) onto a private broker that is stopped and started
    again while batches keep coming."""
    from services.mesh import Mesh
    from services.platform.settings import PlatformSettings

    topic = f"test.restart.{uuid.uuid4().hex[:10]}"
    settings = PlatformSettings(
        data_dir=tmp_path / "data",
        grpc_port=0,
        metrics_port=0,
        event_log="kafka",
        kafka_bootstrap_servers=private_broker.bootstrap,
        kafka_events_topic=topic,
        kafka_events_partitions=3,
        kafka_append_timeout_seconds=4.0,
        schema_registry_url=registry_url,
        schema_registry_token=REGISTRY_TOKEN,
    )
    mesh = Mesh.open(settings)
    port = await mesh.start(("ingestion",))
    key = mesh.ensure_dev_credentials()["write_key"]
    acknowledged: set[str] = set()
    failed: list[tuple[grpc.StatusCode, float | None, list[str]]] = []
    phase = {"name": "before"}
    successes = {"before": 0, "down": 0, "after": 0}

    async def client() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.IngestionServiceStub(channel)
            batch = 0
            while phase["name"] != "done":
                ids = [f"b{batch}-e{i}" for i in range(200)]
                batch += 1
                try:
                    response = await stub.IngestEvents(
                        pb.IngestEventsRequest(events=[tracked_event(event_id=x) for x in ids]),
                        metadata=(("authorization", f"Bearer {key}"),),
                        timeout=20,
                    )
                except grpc.aio.AioRpcError as exc:
                    failed.append((exc.code(), _retry_delay(exc), ids))
                    await asyncio.sleep(0.2)
                    continue
                accepted = [
                    r.event_id for r in response.results if r.status == pb.INGEST_STATUS_ACCEPTED
                ]
                assert len(accepted) == 200
                acknowledged.update(accepted)
                successes[phase["name"]] = successes.get(phase["name"], 0) + 1
                await asyncio.sleep(0.05)

    task = asyncio.create_task(client())
    try:
        deadline = time.monotonic() + 60
        while successes["before"] < 5:  # polling a counter the client task bumps
            assert time.monotonic() < deadline, failed[-3:]
            await asyncio.sleep(0.1)
        phase["name"] = "down"
        await asyncio.to_thread(private_broker.stop)
        await asyncio.sleep(3)  # requests meanwhile must fail, not hang nor buffer
        await asyncio.to_thread(private_broker.start)
        phase["name"] = "after"
        deadline = time.monotonic() + 90
        while successes["after"] < 5:
            assert time.monotonic() < deadline, (successes, failed[-3:])
            await asyncio.sleep(0.2)
    finally:
        phase["name"] = "done"
        await task
        await mesh.stop()

    assert failed, "the outage produced no failure: the broker was not really down"
    for code, retry_delay, _ in failed:
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED), code
        assert retry_delay is not None and retry_delay > 0
    reported_failed = {x for _, _, ids in failed for x in ids}
    assert not acknowledged & reported_failed

    layout = make_layout(topic, partitions=3)
    with DuckDBEventStore(tmp_path / "processor" / "events.duckdb") as store:
        processor = processor_for(private_broker.bootstrap, layout, registry_url, store)
        processor.start()
        try:
            wait_for(
                lambda: (
                    acknowledged
                    <= set(store.read("SELECT event_id FROM tracked_events").column(0).to_pylist())
                ),
                timeout=90,
                what="every acknowledged event in the store",
            )
        finally:
            processor.stop()


def test_ingestion_killed_mid_batch_keeps_every_acknowledged_event_in_kafka(
    kafka_bootstrap: str, registry_url: str, tmp_path: Path
) -> None:
    topic = f"test.killingest.{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    layout = make_layout(topic, partitions=3)
    ensure_topics(admin, layout)
    env = platform_env(tmp_path / "data", kafka_bootstrap, topic, registry_url)
    log_path = tmp_path / "ingestion.log"
    process = spawn("ingestion", env, log_path)
    target = f"127.0.0.1:{env['BILTEN_GRPC_PORT']}"
    credentials = tmp_path / "data" / "credentials.json"
    wait_for(
        lambda: credentials.exists() or process.poll() is not None, timeout=240, what="server up"
    )
    assert process.poll() is None, log_path.read_text()[-3000:]
    import json

    key = json.loads(credentials.read_text())["write_key"]
    acknowledged: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    in_flight_at_kill = threading.Event()

    def sender(n: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.IngestionServiceStub(channel)
            batch = 0
            while not stop.is_set():
                ids = [f"s{n}-b{batch}-e{i}" for i in range(500)]
                batch += 1
                try:
                    response = stub.IngestEvents(
                        pb.IngestEventsRequest(events=[tracked_event(event_id=x) for x in ids]),
                        metadata=(("authorization", f"Bearer {key}"),),
                        timeout=15,
                    )
                except grpc.RpcError:
                    in_flight_at_kill.set()
                    return
                with lock:
                    acknowledged.update(
                        r.event_id
                        for r in response.results
                        if r.status == pb.INGEST_STATUS_ACCEPTED
                    )

    senders = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for thread in senders:
        thread.start()
    try:
        wait_for(lambda: len(acknowledged) >= 4_000, timeout=90, what="4,000 acknowledged")
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        stop.set()
        for thread in senders:
            thread.join(30)
        if process.poll() is None:
            process.kill()
    assert in_flight_at_kill.is_set(), "no request was in flight when the server died"
    messages = consume_all(kafka_bootstrap, topic, len(acknowledged), timeout=60, settle=2)
    decoded = decode_bodies([memoryview(m.value())[HEADER_SIZE:] for m in messages])
    in_kafka = set(decoded.table.column("event_id").to_pylist())
    assert decoded.rejected == []
    missing = acknowledged - in_kafka
    assert not missing, f"{len(missing)} acknowledged events are not in Kafka"
    for future in admin.delete_topics([spec.name for spec in layout.all]).values():
        future.result(30)
