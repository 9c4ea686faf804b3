"""OpenTelemetry traces and metrics, with a Prometheus scrape endpoint.

Traces: one server span per RPC, exported over OTLP/gRPC when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (otherwise recorded and dropped). Metrics: RPC counts
and latencies by method and status, plus the gauges domain code registers, served for
Prometheus at `:<metrics_port>/metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import start_http_server

_configured = False


def configure_telemetry(
    service_name: str, metrics_port: int, metrics_host: str = "127.0.0.1"
) -> None:
    """Installs the global tracer and meter providers once per process."""
    global _configured
    if _configured:
        return
    _configured = True
    resource = Resource.create({"service.name": service_name})
    tracer_provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        # The exporter reads endpoint, headers and TLS from the standard OTEL_* variables.
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    readers = []
    if metrics_port:
        readers.append(PrometheusMetricReader())
        start_http_server(metrics_port, addr=metrics_host)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))


def observe_gauge(name: str, description: str, read: Callable[[], float]) -> None:
    """Registers a gauge read at scrape time (e.g. events waiting for commit)."""

    def callback(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(read())

    metrics.get_meter("bilten.analytics").create_observable_gauge(
        name, callbacks=[callback], description=description
    )
