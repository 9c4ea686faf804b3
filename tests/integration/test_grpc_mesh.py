"""Integration tier: the mesh in process (grpc.aio on a free port, real DuckDB, SQLite and
schema registry), driven over real gRPC channels."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from bilten.analytics.aggregation.v1 import aggregation_service_pb2 as agg_pb
from bilten.analytics.aggregation.v1 import aggregation_service_pb2_grpc as agg_grpc
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import time_range_pb2
from bilten.analytics.type.v1 import tracked_event_pb2 as te
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.mesh import Mesh
from services.platform.auth import ORGANIZER_ADMIN_SCOPES, Scope
from services.platform.settings import PlatformSettings
from tests.conftest import free_port, tracked_event, ts

pytestmark = pytest.mark.integration


class Running:
    def __init__(self, mesh: Mesh, registry_url: str) -> None:
        self.mesh = mesh
        self.registry_url = registry_url
        self.target = f"127.0.0.1:{mesh.port}"
        self.credentials = mesh.ensure_dev_credentials()

    def md(self, credential: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {credential}"),)


async def _start(data_dir: Path, **overrides: object) -> tuple[Mesh, object]:
    registry_port = free_port()
    settings = PlatformSettings(
        data_dir=data_dir,
        grpc_port=0,
        metrics_port=0,
        schema_registry_port=registry_port,
        definition_cache_seconds=0,
        **overrides,  # type: ignore[arg-type]
    )
    mesh = Mesh.open(settings)
    registry = mesh.registry()
    await registry.start()
    await mesh.start()
    return mesh, registry


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    mesh, registry = await _start(tmp_path / "data")
    yield Running(mesh, f"http://127.0.0.1:{mesh.settings.schema_registry_port}")
    await mesh.stop()
    await registry.stop()  # type: ignore[attr-defined]


def _details(error: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(error)
    assert status is not None
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (
            error_details_pb2.ErrorInfo,
            error_details_pb2.BadRequest,
            error_details_pb2.RetryInfo,
        ):
            message = kind()
            if detail.Unpack(message):
                found[kind.__name__] = message
    return found


async def test_upload_stream_commits_each_chunk_and_summarises(running: Running) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.IngestionServiceStub(channel)

        async def chunks() -> AsyncIterator[pb.UploadEventsRequest]:
            for chunk in range(5):
                events = [
                    tracked_event("stream_test", event_id=f"c{chunk}-{i}") for i in range(100)
                ]
                events.append(tracked_event("Bad Name"))
                events.append(tracked_event("stream_test", event_id=f"c{chunk}-0"))  # duplicate
                yield pb.UploadEventsRequest(events=events)

        summary = await stub.UploadEvents(
            chunks(), metadata=running.md(running.credentials["write_key"])
        )
    assert (summary.accepted_count, summary.duplicate_count, summary.rejected_count) == (500, 5, 5)
    assert len(summary.not_accepted_results) == 10
    assert running.mesh.event_store.count(running.credentials["tenant_id"]) == 500


async def test_replay_after_registering_the_definition(running: Running) -> None:
    tenant = running.credentials["tenant_id"]
    event = tracked_event(
        "promo_seen", event_type=te.TRACKED_EVENT_TYPE_CUSTOM, properties={"slot": 3}
    )
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        write = running.md(running.credentials["write_key"])
        first = await stub.IngestEvents(pb.IngestEventsRequest(events=[event]), metadata=write)
        (result,) = first.results
        assert result.rejection_reason == pb.REJECTION_REASON_UNKNOWN_EVENT_DEFINITION
        schema = {
            "type": "record",
            "name": "PromoSeen",
            "fields": [{"name": "slot", "type": "int"}],
        }
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{running.registry_url}/subjects/events.{tenant}.promo_seen/versions",
                auth=("x", running.credentials["admin_token"]),
                json={"schema": json.dumps(schema)},
            )
            assert r.status_code == 200, r.text
        replayed = await stub.ReplayQuarantinedEvents(
            pb.ReplayQuarantinedEventsRequest(quarantined_event_ids=[result.quarantined_event_id]),
            metadata=write,
        )
        assert replayed.results[0].status == pb.INGEST_STATUS_ACCEPTED
        listed = await stub.ListQuarantinedEvents(
            pb.ListQuarantinedEventsRequest(),
            metadata=running.md(running.credentials["admin_token"]),
        )
        assert result.quarantined_event_id not in {
            q.quarantined_event_id for q in listed.quarantined_events
        }
        # Replaying it again: it has left the quarantine.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ReplayQuarantinedEvents(
                pb.ReplayQuarantinedEventsRequest(
                    quarantined_event_ids=[result.quarantined_event_id]
                ),
                metadata=write,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_tenants_are_isolated_and_platform_admins_read_across(running: Running) -> None:
    mesh = running.mesh
    other_token = mesh.tokens.issue("bob", "tenant_other", ORGANIZER_ADMIN_SCOPES)
    admin_token = running.credentials["platform_admin_token"]
    async with grpc.aio.insecure_channel(running.target) as channel:
        ingest = pb_grpc.IngestionServiceStub(channel)
        await ingest.IngestEvents(
            pb.IngestEventsRequest(
                events=[tracked_event("iso", user_id=f"a{i}") for i in range(3)]
            ),
            metadata=running.md(running.credentials["write_key"]),
        )
        await ingest.IngestEvents(
            pb.IngestEventsRequest(
                events=[tracked_event("iso", user_id=f"b{i}") for i in range(5)]
            ),
            metadata=running.md(other_token),
        )
        agg = agg_grpc.AggregationServiceStub(channel)
        now = datetime.now(UTC)
        window = time_range_pb2.TimeRange(
            start_time=ts(now - timedelta(days=1)), end_time=ts(now + timedelta(minutes=1))
        )

        async def dau(token: str, tenant_id: str = "") -> int:
            response = await agg.GetActiveUsers(
                agg_pb.GetActiveUsersRequest(time_range=window, tenant_id=tenant_id),
                metadata=running.md(token),
            )
            return int(response.daily_active_users)

        assert await dau(running.credentials["admin_token"]) == 3
        assert await dau(other_token) == 5
        assert await dau(admin_token) == 8
        assert await dau(admin_token, "tenant_other") == 5
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await dau(other_token, running.credentials["tenant_id"])
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = _details(caught.value)["ErrorInfo"]
        assert info.reason == "ERROR_REASON_TENANT_MISMATCH"  # type: ignore[attr-defined]
        # The other tenant's quarantine is invisible.
        await ingest.IngestEvents(
            pb.IngestEventsRequest(events=[tracked_event("Bad")]), metadata=running.md(other_token)
        )
        mine = await ingest.ListQuarantinedEvents(
            pb.ListQuarantinedEventsRequest(),
            metadata=running.md(running.credentials["admin_token"]),
        )
        assert all("Bad" not in q.event_json for q in mine.quarantined_events)


async def test_expired_and_missing_credentials_over_grpc(running: Running) -> None:
    expired = running.mesh.tokens.issue(
        "old", running.credentials["tenant_id"], frozenset({Scope.EVENTS_WRITE}), ttl_seconds=-5
    )
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        for metadata, reason in [
            (running.md(expired), "ERROR_REASON_CREDENTIAL_EXPIRED"),
            ((), "ERROR_REASON_CREDENTIAL_MISSING"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Track(pb.TrackRequest(event=tracked_event()), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert _details(caught.value)["ErrorInfo"].reason == reason  # type: ignore[attr-defined]


async def test_rate_limit_answers_resource_exhausted_with_retry_info(tmp_path: Path) -> None:
    mesh, registry = await _start(
        tmp_path / "data", rate_limit_events_per_second=10.0, rate_limit_burst_events=20
    )
    try:
        key = mesh.ensure_dev_credentials()["write_key"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
            stub = pb_grpc.IngestionServiceStub(channel)
            md = (("authorization", f"Bearer {key}"),)
            await stub.IngestEvents(
                pb.IngestEventsRequest(events=[tracked_event() for _ in range(20)]), metadata=md
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.IngestEvents(
                    pb.IngestEventsRequest(events=[tracked_event() for _ in range(5)]), metadata=md
                )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = _details(caught.value)["RetryInfo"]
        assert retry.retry_delay.ToMilliseconds() > 0  # type: ignore[attr-defined]
    finally:
        await mesh.stop()
        await registry.stop()  # type: ignore[attr-defined]


async def test_dedup_window_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    for attempt in range(2):
        mesh, registry = await _start(data_dir)
        try:
            key = mesh.ensure_dev_credentials()["write_key"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
                response = await pb_grpc.IngestionServiceStub(channel).Track(
                    pb.TrackRequest(event=tracked_event(event_id="order-42-paid")),
                    metadata=(("authorization", f"Bearer {key}"),),
                )
            expected = pb.INGEST_STATUS_ACCEPTED if attempt == 0 else pb.INGEST_STATUS_DUPLICATE
            assert response.result.status == expected
        finally:
            await mesh.stop()
            await registry.stop()  # type: ignore[attr-defined]
