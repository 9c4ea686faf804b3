"""`GetPipelineStatus` and the one-process Kafka shape (`up --event-log kafka`, without
Envoy): gRPC ingestion → Kafka → processor (in process) → DuckDB → gRPC query."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from bilten.analytics.query.v1 import query_service_pb2 as query_pb
from bilten.analytics.query.v1 import query_service_pb2_grpc as query_grpc
from bilten.analytics.type.v1 import time_range_pb2

from services.mesh import Mesh
from services.platform.settings import PlatformSettings
from tests.conftest import tracked_event, ts
from tests.streaming.conftest import REGISTRY_TOKEN


@pytest.mark.integration
async def test_embedded_event_log_reports_no_lag(tmp_path: Path) -> None:
    mesh = Mesh.open(PlatformSettings(data_dir=tmp_path, grpc_port=0, metrics_port=0))
    port = await mesh.start(("ingestion",))
    token = mesh.ensure_dev_credentials()["admin_token"]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = await pb_grpc.IngestionServiceStub(channel).GetPipelineStatus(
                pb.GetPipelineStatusRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )
    finally:
        await mesh.stop()
    assert status.event_log == pb.EVENT_LOG_KIND_EMBEDDED
    assert status.total_lag == 0 and not status.partitions


def kafka_settings(
    data_dir: Path, kafka_bootstrap: str, registry_url: str, topic: str
) -> PlatformSettings:
    """One process on the Kafka event log: its own topic (2 partitions) and group."""
    return PlatformSettings(
        data_dir=data_dir,
        grpc_port=0,
        metrics_port=0,
        event_log="kafka",
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_events_topic=topic,
        kafka_events_partitions=2,
        schema_registry_url=registry_url,
        schema_registry_token=REGISTRY_TOKEN,
        processor_group_id=f"group-{topic}",
        processor_session_timeout_ms=6000,
    )


@pytest.mark.kafka
async def test_kafka_shape_in_one_process_reports_lag_and_serves_queries(
    kafka_bootstrap: str, registry_url: str, tmp_path: Path
) -> None:
    topic = f"test.oneprocess.{time.time_ns()}"
    settings = kafka_settings(tmp_path, kafka_bootstrap, registry_url, topic)
    mesh = Mesh.open(settings)
    port = await mesh.start(("ingestion", "query"))  # query hosts the processor
    credentials = mesh.ensure_dev_credentials()
    assert mesh.live_feed is not None
    write = (("authorization", f"Bearer {credentials['write_key']}"),)
    read = (("authorization", f"Bearer {credentials['admin_token']}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            ingestion = pb_grpc.IngestionServiceStub(channel)
            response = await ingestion.IngestEvents(
                pb.IngestEventsRequest(
                    events=[tracked_event("page_view", event_id=f"e{i}") for i in range(300)]
                ),
                metadata=write,
            )
            assert response.accepted_count == 300
            deadline = time.monotonic() + 60
            while True:
                status = await ingestion.GetPipelineStatus(
                    pb.GetPipelineStatusRequest(), metadata=read
                )
                if sum(p.end_offset for p in status.partitions) == 300 and status.total_lag == 0:
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.3)
            assert status.event_log == pb.EVENT_LOG_KIND_KAFKA
            assert status.topic == topic and status.consumer_group == settings.processor_group_id
            assert [p.partition for p in status.partitions] == [0, 1]
            assert all(p.HasField("committed_offset") for p in status.partitions)
            now = datetime.now(UTC)
            metrics = await query_grpc.QueryServiceStub(channel).GetMetrics(
                query_pb.GetMetricsRequest(
                    metrics=[query_pb.METRIC_KIND_EVENT_COUNT],
                    time_range=time_range_pb2.TimeRange(
                        start_time=ts(now - timedelta(days=1)),
                        end_time=ts(now + timedelta(hours=1)),
                    ),
                ),
                metadata=read,
            )
            assert sum(p.value for p in metrics.series[0].points) == 300
    finally:
        await mesh.stop()


@pytest.mark.kafka
async def test_a_prediction_process_fills_its_own_store_and_checks_live_batches(
    kafka_bootstrap: str, registry_url: str, tmp_path: Path
) -> None:
    """Cluster shape: prediction is a stream-processor host (it reads the store), and its
    live anomaly check is fed from its own processor when no aggregation runtime runs."""
    settings = kafka_settings(
        tmp_path, kafka_bootstrap, registry_url, f"test.prediction-host.{time.time_ns()}"
    )
    mesh = Mesh.open(settings)
    port = await mesh.start(("ingestion", "prediction"))
    credentials = mesh.ensure_dev_credentials()
    write = (("authorization", f"Bearer {credentials['write_key']}"),)
    try:
        assert mesh.live_feed is not None and mesh.prediction is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            response = await pb_grpc.IngestionServiceStub(channel).IngestEvents(
                pb.IngestEventsRequest(
                    events=[tracked_event("page_view", event_id=f"p{i}") for i in range(40)]
                ),
                metadata=write,
            )
            assert response.accepted_count == 40
        tenant = credentials["tenant_id"]
        deadline = time.monotonic() + 60
        while mesh.event_store.count(tenant) < 40:
            assert time.monotonic() < deadline, mesh.event_store.count(tenant)
            await asyncio.sleep(0.2)
        while (opened := mesh.prediction.live.open_hour(tenant)) is None:
            assert time.monotonic() < deadline, "the live check saw no batch"
            await asyncio.sleep(0.2)
        assert opened[1]["event_count"] > 0
    finally:
        await mesh.stop()
