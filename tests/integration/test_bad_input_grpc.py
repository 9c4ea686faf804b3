"""Bad input over gRPC, one test per class, each with its precise status: malformed bytes,
unknown enum numbers, oversized batches, messages and properties, forged credentials and
another tenant's ids. A small fuzz checks that no input answers INTERNAL or UNKNOWN."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from bilten.analytics.type.v1 import tracked_event_pb2 as te
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.platform.auth import ORGANIZER_ADMIN_SCOPES
from tests.conftest import tracked_event
from tests.integration.test_grpc_mesh import Running, _start

pytestmark = pytest.mark.integration

INGESTION = "/bilten.analytics.ingestion.v1.IngestionService"
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    mesh, registry = await _start(tmp_path / "data")
    yield Running(mesh, f"http://127.0.0.1:{mesh.settings.schema_registry_port}")
    await mesh.stop()
    await registry.stop()  # type: ignore[attr-defined]


def _status(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list[str]]:
    """The ErrorInfo and the BadRequest field paths of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in grpc-status-details-bin"
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
        else:
            detail.Unpack(info)
    return info, fields


def _raw(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        f"{INGESTION}/{method}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )


@pytest.mark.parametrize("method", ["Track", "IngestEvents"])
async def test_malformed_protobuf_bytes_are_invalid_argument(running: Running, method: str) -> None:
    # A field 1 length-delimited claiming 100 bytes, then 3: a truncated message.
    garbage = b"\x0a\x64abc"
    async with grpc.aio.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _raw(channel, method)(
                garbage, metadata=running.md(running.credentials["write_key"])
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "not a valid protobuf message" in (caught.value.details() or "")
    info, _ = _status(caught.value)
    assert info.reason == "ERROR_REASON_INVALID_REQUEST"


async def test_malformed_bytes_in_a_client_stream_are_invalid_argument(running: Running) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        upload = channel.stream_unary(
            f"{INGESTION}/UploadEvents",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        good = pb.UploadEventsRequest(events=[tracked_event()]).SerializeToString()

        async def chunks() -> AsyncIterator[bytes]:
            yield good
            yield b"\x0a\x64abc"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upload(chunks(), metadata=running.md(running.credentials["write_key"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


async def test_malformed_bytes_without_credentials_are_still_unauthenticated(
    running: Running,
) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _raw(channel, "Track")(b"\x0a\x64abc")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_enum_number(running: Running) -> None:
    write = running.md(running.credentials["write_key"])
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Track(pb.TrackRequest(event=tracked_event(event_type=99)), metadata=write)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info, fields = _status(caught.value)
        assert info.reason == "ERROR_REASON_INVALID_REQUEST"
        assert "event.event_type" in fields
        # In a batch the one event is rejected, the others go on.
        response = await stub.IngestEvents(
            pb.IngestEventsRequest(events=[tracked_event(), tracked_event(event_type=99)]),
            metadata=write,
        )
    first, second = response.results
    assert first.status == pb.INGEST_STATUS_ACCEPTED
    assert second.status == pb.INGEST_STATUS_REJECTED
    assert second.rejection_reason == pb.REJECTION_REASON_INVALID_FIELD
    assert second.field_path == "events[1].event_type"


async def test_batch_over_the_limit_is_rejected_whole(running: Running) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.IngestEvents(
                pb.IngestEventsRequest(events=[tracked_event() for _ in range(1001)]),
                metadata=running.md(running.credentials["write_key"]),
            )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, fields = _status(caught.value)
    assert fields == ["events"]
    assert running.mesh.event_store.count(running.credentials["tenant_id"]) == 0


async def test_message_over_the_receive_limit_is_resource_exhausted(running: Running) -> None:
    event = tracked_event(properties={"blob": "x" * (5 * 1024 * 1024)})
    async with grpc.aio.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.IngestionServiceStub(channel).Track(
                pb.TrackRequest(event=event),
                metadata=running.md(running.credentials["write_key"]),
            )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    "properties",
    [
        {f"k{i}": i for i in range(201)},  # too many keys
        {"blob": "x" * (17 * 1024)},  # too many bytes
    ],
    ids=["keys", "bytes"],
)
async def test_oversized_properties_are_rejected_and_quarantined(
    running: Running, properties: dict[str, object]
) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Track(
                pb.TrackRequest(event=tracked_event(properties=properties)),
                metadata=running.md(running.credentials["write_key"]),
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, fields = _status(caught.value)
        assert fields == ["event.properties"]
        batch = await stub.IngestEvents(
            pb.IngestEventsRequest(events=[tracked_event(properties=properties)]),
            metadata=running.md(running.credentials["write_key"]),
        )
        (result,) = batch.results
        assert result.rejection_reason == pb.REJECTION_REASON_TOO_LARGE
        assert result.field_path == "events[0].properties"
        listed = await stub.ListQuarantinedEvents(
            pb.ListQuarantinedEventsRequest(page_size=100),
            metadata=running.md(running.credentials["admin_token"]),
        )
    assert result.quarantined_event_id in {
        q.quarantined_event_id for q in listed.quarantined_events
    }


@pytest.mark.parametrize(
    "credential",
    ["bak_forged_notasecret", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "garbage"],
)
async def test_forged_credentials_are_unauthenticated(running: Running, credential: str) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.IngestionServiceStub(channel).Track(
                pb.TrackRequest(event=tracked_event()), metadata=running.md(credential)
            )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info, _ = _status(caught.value)
    assert info.reason == "ERROR_REASON_CREDENTIAL_INVALID"


async def test_another_tenants_quarantine_id_is_not_found(running: Running) -> None:
    other = running.mesh.tokens.issue("bob", "tenant_other", ORGANIZER_ADMIN_SCOPES)
    secret = "secret_of_the_other_tenant"
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = pb_grpc.IngestionServiceStub(channel)
        theirs = await stub.IngestEvents(
            pb.IngestEventsRequest(events=[tracked_event("Bad Name", user_id=secret)]),
            metadata=running.md(other),
        )
        quarantined_id = theirs.results[0].quarantined_event_id
        assert quarantined_id
        for credential in (running.credentials["write_key"], running.credentials["admin_token"]):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ReplayQuarantinedEvents(
                    pb.ReplayQuarantinedEventsRequest(quarantined_event_ids=[quarantined_id]),
                    metadata=running.md(credential),
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert secret not in (caught.value.details() or "")
            assert secret.encode() not in repr(caught.value.trailing_metadata()).encode()
        # Still in its owner's quarantine, untouched.
        listed = await stub.ListQuarantinedEvents(
            pb.ListQuarantinedEventsRequest(page_size=100), metadata=running.md(other)
        )
    assert quarantined_id in {q.quarantined_event_id for q in listed.quarantined_events}


def _fuzz(target: str, write_key: str) -> None:
    """Random bytes and random field values into IngestEvents (and Track): whatever the
    answer, it is never a server fault. Runs in a thread with a blocking channel while the
    in-process server keeps serving on the test's event loop."""
    metadata = (("authorization", f"Bearer {write_key}"),)
    events = st.builds(
        te.TrackedEvent,
        event_id=st.text(max_size=300),
        event_type=st.integers(min_value=-5, max_value=2**31 - 1),
        event_name=st.text(max_size=300),
        user_id=st.text(max_size=300),
        anonymous_id=st.text(max_size=50),
    )
    with grpc.insecure_channel(target) as channel:
        batch = channel.unary_unary(
            f"{INGESTION}/IngestEvents",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        track = channel.unary_unary(
            f"{INGESTION}/Track",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

        @settings(
            max_examples=60,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(
            payload=st.one_of(
                st.binary(max_size=2000),
                st.lists(events, max_size=5).map(
                    lambda e: pb.IngestEventsRequest(events=e).SerializeToString()
                ),
            )
        )
        def never_a_server_fault(payload: bytes) -> None:
            for call in (batch, track):
                try:
                    call(payload, metadata=metadata, timeout=20)
                except grpc.RpcError as error:
                    assert error.code() not in SERVER_FAULTS, (payload, error.details())  # type: ignore[attr-defined]

        never_a_server_fault()


async def test_fuzzed_ingest_payloads_never_answer_a_server_fault(running: Running) -> None:
    await asyncio.to_thread(_fuzz, running.target, running.credentials["write_key"])
