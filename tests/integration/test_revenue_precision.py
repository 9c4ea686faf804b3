"""Revenue the event store cannot hold (DECIMAL(18,6)) is refused per event at ingestion,
over real gRPC into the real DuckDB store: before, one such event failed the append of
its whole batch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import tracked_event_pb2 as te
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.mesh import Mesh
from services.platform.settings import PlatformSettings
from services.storage.event_store import TABLE
from tests.conftest import tracked_event

pytestmark = pytest.mark.integration


@pytest.fixture
async def ingestion(tmp_path: Path) -> AsyncIterator[tuple[Mesh, str, str]]:
    mesh = Mesh.open(PlatformSettings(data_dir=tmp_path / "data", grpc_port=0, metrics_port=0))
    await mesh.start(("ingestion",))
    credentials = mesh.ensure_dev_credentials()
    yield mesh, credentials["write_key"], credentials["tenant_id"]
    await mesh.stop()


def _conversion(units: int, nanos: int, order_id: str) -> te.TrackedEvent:
    event = tracked_event(
        "ticket_purchased",
        event_type=te.TRACKED_EVENT_TYPE_CONVERSION,
        revenue=("EUR", units, nanos),
        quantity=1,
    )
    event.ticketing.order_id = order_id
    return event


async def test_a_batch_stores_all_but_the_event_with_unstorable_revenue(
    ingestion: tuple[Mesh, str, str],
) -> None:
    mesh, write_key, tenant = ingestion
    events = [
        _conversion(12, 345_678_000, "ok-1"),  # 12.345678
        _conversion(19, 990_000_001, "too-precise"),  # 19.990000001
        _conversion(999_999_999_999, 999_999_000, "largest"),  # 999999999999.999999
        _conversion(10**12, 0, "too-large"),
        _conversion(0, 500_000_000, "ok-2"),  # 0.5
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        response = await stub.IngestEvents(
            pb.IngestEventsRequest(events=events),
            metadata=(("authorization", f"Bearer {write_key}"),),
        )
    statuses = [r.status for r in response.results]
    assert statuses == [
        pb.INGEST_STATUS_ACCEPTED,
        pb.INGEST_STATUS_REJECTED,
        pb.INGEST_STATUS_ACCEPTED,
        pb.INGEST_STATUS_REJECTED,
        pb.INGEST_STATUS_ACCEPTED,
    ]
    too_precise, too_large = response.results[1], response.results[3]
    assert too_precise.field_path == "events[1].ticketing.revenue.nanos"
    assert too_large.field_path == "events[3].ticketing.revenue.units"
    for result in (too_precise, too_large):
        assert result.rejection_reason == pb.REJECTION_REASON_INVALID_FIELD
        assert result.quarantined_event_id
    stored = mesh.event_store.read(
        f"SELECT order_id, revenue FROM {TABLE} WHERE tenant_id = ? ORDER BY order_id", [tenant]
    ).to_pylist()
    assert stored == [
        {"order_id": "largest", "revenue": Decimal("999999999999.999999")},
        {"order_id": "ok-1", "revenue": Decimal("12.345678")},
        {"order_id": "ok-2", "revenue": Decimal("0.500000")},
    ]


async def test_a_single_conversion_with_unstorable_revenue_is_invalid_argument(
    ingestion: tuple[Mesh, str, str],
) -> None:
    mesh, write_key, tenant = ingestion
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.TrackConversion(
                pb.TrackConversionRequest(event=_conversion(1, 1, "one-nano")),
                metadata=(("authorization", f"Bearer {write_key}"),),
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad_request) for detail in status.details)
    (violation,) = bad_request.field_violations
    assert violation.field == "event.ticketing.revenue.nanos"
    assert mesh.event_store.count(tenant) == 0
