"""Every `buf.validate` rule of a tracked event, over gRPC: `Track` fails with
INVALID_ARGUMENT naming the field (protovalidate at the edge), and inside `IngestEvents`
the event alone is rejected with `REJECTION_REASON_INVALID_FIELD` and the field path
(the pipeline's check, services/ingestion/shape.py), its neighbours accepted. The rule
list and the check's equivalence with protovalidate: tests/unit/test_ingestion_shape.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import tracked_event_pb2 as te

from tests.conftest import tracked_event
from tests.integration.test_bad_input_grpc import _status
from tests.integration.test_grpc_mesh import Running, _start
from tests.unit.test_ingestion_shape import RULE_CASES

pytestmark = pytest.mark.integration


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    mesh, registry = await _start(tmp_path / "data")
    yield Running(mesh, f"http://127.0.0.1:{mesh.settings.schema_registry_port}")
    await mesh.stop()
    await registry.stop()  # type: ignore[attr-defined]


def _breaking(rule: tuple[str, str]) -> tuple[te.TrackedEvent, str]:
    mutate, path = RULE_CASES[rule]
    event = tracked_event()
    mutate(event)
    return event, path


async def test_every_event_rule_rejects_the_event_in_track_and_in_a_batch(
    running: Running,
) -> None:
    # One server for all the rules (a mesh per case would take minutes).
    write = running.md(running.credentials["write_key"])
    tenant = running.credentials["tenant_id"]
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        for rule in RULE_CASES:
            event, path = _breaking(rule)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Track(pb.TrackRequest(event=event), metadata=write)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rule
            info, fields = _status(caught.value)
            assert info.reason == "ERROR_REASON_INVALID_REQUEST", rule
            assert fields == [f"event{path}"], rule
            assert info.metadata["rejection_reason"] == "INVALID_FIELD", rule

            stored = running.mesh.event_store.count(tenant)
            response = await stub.IngestEvents(
                pb.IngestEventsRequest(events=[tracked_event(), event, tracked_event()]),
                metadata=write,
            )
            first, second, third = response.results
            assert first.status == third.status == pb.INGEST_STATUS_ACCEPTED, rule
            assert second.status == pb.INGEST_STATUS_REJECTED, rule
            assert second.rejection_reason == pb.REJECTION_REASON_INVALID_FIELD, rule
            assert second.field_path == f"events[1]{path}", rule
            assert second.quarantined_event_id, rule
            assert (response.accepted_count, response.rejected_count) == (2, 1), rule
            assert running.mesh.event_store.count(tenant) == stored + 2, rule


async def test_every_event_rule_rejects_the_event_in_an_upload_stream(running: Running) -> None:
    rules = list(RULE_CASES)

    async def chunks() -> AsyncIterator[pb.UploadEventsRequest]:
        for rule in rules:
            event, _ = _breaking(rule)
            yield pb.UploadEventsRequest(events=[tracked_event(), event])

    async with grpc.aio.insecure_channel(running.target) as channel:
        response = await pb_grpc.IngestionServiceStub(channel).UploadEvents(
            chunks(), metadata=running.md(running.credentials["write_key"])
        )
    assert (response.accepted_count, response.rejected_count) == (len(rules), len(rules))
    assert [r.field_path for r in response.not_accepted_results] == [
        f"events[1]{RULE_CASES[rule][1]}" for rule in rules
    ]
    assert {r.rejection_reason for r in response.not_accepted_results} == {
        pb.REJECTION_REASON_INVALID_FIELD
    }
