"""Integration tier: every RPC leaves an OpenTelemetry server span with its outcome."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from bilten.analytics.ingestion.v1 import ingestion_service_pb2 as pb
from bilten.analytics.ingestion.v1 import ingestion_service_pb2_grpc as pb_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.mesh import Mesh
from services.platform.settings import PlatformSettings
from tests.conftest import tracked_event

pytestmark = pytest.mark.integration


async def test_rpcs_produce_server_spans_with_status(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    mesh = Mesh.open(PlatformSettings(data_dir=tmp_path, grpc_port=0, metrics_port=0))
    await mesh.start(("ingestion",))
    try:
        key = mesh.ensure_dev_credentials()["write_key"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
            stub = pb_grpc.IngestionServiceStub(channel)
            await stub.Track(pb.TrackRequest(event=tracked_event()), metadata=(("x-api-key", key),))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Track(pb.TrackRequest(event=tracked_event()))
    finally:
        await mesh.stop()
    spans = [s for s in exporter.get_finished_spans() if s.name.endswith("IngestionService/Track")]
    assert len(spans) == 2
    assert all(s.kind is trace.SpanKind.SERVER for s in spans)
    codes = sorted(str(s.attributes.get("rpc.grpc.status_code", "OK")) for s in spans)
    assert codes == ["OK", "UNAUTHENTICATED"]
