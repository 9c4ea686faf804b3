"""Erasure in the cluster shape (issue #6): a compliance pod and a stream-processor pod,
each with its own data dir and DuckDB, sharing the PostgreSQL metadata (and, with
crypto-shredding, the subject keys in it). The erasure is created over gRPC on the
compliance pod; the processor pod's store must lose the subject's rows within the bound,
keep the other subject's, and not take the subject's earlier events back from the topic.

Needs the real Kafka broker and PostgreSQL (BILTEN_TEST_KAFKA_BOOTSTRAP,
BILTEN_TEST_POSTGRES_DSN).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from bilten.analytics.compliance.v1 import compliance_service_pb2 as c_pb
from bilten.analytics.compliance.v1 import compliance_service_pb2_grpc as c_grpc
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as i_pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as i_grpc

from services.mesh import Mesh
from services.platform.auth import ROLE_SCOPES, Role
from services.platform.settings import PlatformSettings
from tests.conftest import tracked_event
from tests.storage.metadata_backends import fresh_postgres_schema, requires_postgres
from tests.streaming.conftest import REGISTRY_TOKEN, event

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, requires_postgres()]

BOUND_SECONDS = 0.5  # erasure_apply_interval_seconds of the processor pod


def _settings(
    data_dir: Path, metadata_url: str, topic: str, bootstrap: str, registry: str, shred: bool
) -> PlatformSettings:
    return PlatformSettings(
        data_dir=data_dir,
        metadata_store_url=metadata_url,
        grpc_port=0,
        metrics_port=0,
        event_log="kafka",
        kafka_bootstrap_servers=bootstrap,
        kafka_events_topic=topic,
        kafka_events_partitions=2,
        schema_registry_url=registry,
        schema_registry_token=REGISTRY_TOKEN,
        processor_group_id=f"test-erasure-{topic}",
        processor_session_timeout_ms=6000,
        # The pods share the chart Secret's values.
        jwt_secret="cluster-jwt-secret-0123456789abcdef0123",
        api_key_pepper="cluster-pepper-0123456789abcdef",
        ip_hash_key="cluster-ip-hash-key-0123456789abcdef",
        subject_key_encryption_key="cluster-kek-0123456789abcdef0123",
        crypto_shredding=shred,
        erasure_apply_interval_seconds=BOUND_SECONDS,
    )


def _user_ids(mesh: Mesh, tenant: str) -> list[str]:
    table = mesh.event_store.read(
        f"SELECT user_id FROM tracked_events WHERE tenant_id = '{tenant}' ORDER BY event_id"
    )
    return [str(v) for v in table.column(0).to_pylist()]


async def _until(predicate: object, timeout: float, what: str) -> float:
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, what
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("shred", [False, True], ids=["plain", "crypto-shredding"])
async def test_erasure_on_the_compliance_pod_reaches_the_processor_pods_store(
    kafka_bootstrap: str, registry_url: str, tmp_path: Path, shred: bool
) -> None:
    topic = f"test.erasure.{uuid.uuid4().hex[:12]}"
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    with fresh_postgres_schema("erasure_cluster") as url:
        compliance = Mesh.open(
            _settings(tmp_path / "compliance", url, topic, kafka_bootstrap, registry_url, shred)
        )
        processor = Mesh.open(
            _settings(tmp_path / "processor", url, topic, kafka_bootstrap, registry_url, shred)
        )
        compliance_port = await compliance.start(("compliance",))
        processor_port = await processor.start(("ingestion", "query"))  # query hosts it
        try:
            assert processor.erasure_applier is not None and compliance.erasure_applier is None
            credentials = compliance.ensure_dev_credentials()
            tenant = credentials["tenant_id"]
            write = (("authorization", f"Bearer {credentials['write_key']}"),)
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{processor_port}") as p_channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{compliance_port}") as c_channel,
            ):
                events = [tracked_event("page_view", user_id=alice) for _ in range(20)]
                events += [tracked_event("page_view", user_id=bob) for _ in range(15)]
                ingested = await i_grpc.IngestionServiceStub(p_channel).IngestEvents(
                    i_pb.IngestEventsRequest(events=events), metadata=write
                )
                assert ingested.accepted_count == 35
                await _until(
                    lambda: len(_user_ids(processor, tenant)) == 35, 60, "events never stored"
                )
                assert _user_ids(processor, tenant).count(alice) == 20

                token = compliance.tokens.issue(
                    "officer", tenant, ROLE_SCOPES[Role.COMPLIANCE_OFFICER], single_use=True
                )
                stub = c_grpc.ComplianceServiceStub(c_channel)
                created = await stub.CreateErasureRequest(
                    c_pb.CreateErasureRequestRequest(request_id="erase-alice", subject_id=alice),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
                request = created.erasure_request
                assert request.state == c_pb.ERASURE_STATE_DONE, request.error_message
                erased_at = datetime.now(UTC)
                text = "\n".join(request.certificate_lines)
                # The compliance pod certifies its own store and names the hosts' part.
                assert "this process's event store (tracked_events): 0 rows deleted" in text
                assert "stream-processor hosts' event stores: not erased by this process" in text

                # The processor pod's store loses A's rows within the bound; B's remain.
                took = await _until(
                    lambda: alice not in _user_ids(processor, tenant),
                    60,
                    "the processor host never applied the erasure",
                )
                # The bound is the apply interval; under a loaded CI machine a pass can
                # run late, so only a host that stopped applying fails here.
                assert took < BOUND_SECONDS + 30
                assert _user_ids(processor, tenant) == [bob] * 15

                # GetErasureRequest lists the host's application.
                read = compliance.tokens.issue(
                    "officer", tenant, ROLE_SCOPES[Role.COMPLIANCE_OFFICER]
                )
                got = await stub.GetErasureRequest(
                    c_pb.GetErasureRequestRequest(erasure_request_id=request.erasure_request_id),
                    metadata=(("authorization", f"Bearer {read}"),),
                )
                applier = processor.erasure_applier
                host_lines = [
                    line
                    for line in got.erasure_request.certificate_lines
                    if f"stream-processor host {applier.host_id}:" in line
                ]
                # One line for its event store, one for its rollups: a `query` host runs
                # no aggregation runtime, so it has none.
                assert len(host_lines) == 2 and "20 rows deleted" in host_lines[0]
                assert "rollups of stream-processor host" in host_lines[1]
                assert "nothing changed (no aggregation runtime on that host" in host_lines[1]

            # An event of A acknowledged before the erasure but only now reaching the
            # processor (lag, replay): not stored again. A marker of B after it shows the
            # processor got past it.
            late = replace(
                event(1, tenant=tenant, prefix="late"),
                user_id=alice,
                anonymous_id="",
                received_at=erased_at - timedelta(seconds=30),
            )
            marker = replace(event(2, tenant=tenant, prefix="marker"), user_id=bob, anonymous_id="")
            assert processor.streaming is not None
            await processor.streaming.event_log.append([late, marker])
            # The two records may sit on different partitions: wait until the store's
            # offsets cover every record of the topic (35 ingested + these 2), so the
            # late one was processed too, not merely the marker.
            await _until(
                lambda: sum(processor.event_store.stream_offsets(topic).values()) >= 37,
                60,
                "the processor never got past the late event and the marker",
            )
            assert alice not in _user_ids(processor, tenant)
            if not shred:
                # Without crypto-shredding its ids were in clear: the filter dropped it.
                assert processor.erasure_applier.erased.dropped_events == 1
        finally:
            await processor.stop()
            await compliance.stop()
